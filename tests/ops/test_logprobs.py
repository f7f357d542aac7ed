"""linear_logprobs: every impl of ``api.IMPLS`` against the float64 reference, values and gradients.

Shapes are tiny (the Triton kernels run under TRITON_INTERPRET=1 here) but cross several N-, V- and D-blocks
of the interpreter's block sizes (16 x 32 x 16): V=300 is no multiple of any block and D=40 no power of two.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastalign import ImplUnavailableError, LinearLogprobs, linear_logprobs
from fastalign.ops.logprobs import api, naive
from fastalign.testing import assert_close_to_ref

IMPLS = list(api.IMPLS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
N, D, V = 21, 40, 300
IGNORED = (3, 11)  # rows whose target is ignore_index in every batch below

OPTIONS = {
    "plain": {},
    "temperature": {"temperature": 0.6},
    "softcap": {"softcap": 4.0},
    "logit_scale": {"logit_scale": 2.5},
    "bias": {"bias": True},
    "no_entropy": {"return_entropy": False},
    "all": {"bias": True, "temperature": 1.7, "softcap": 3.0, "logit_scale": 0.8},
}


def _inputs(n, d, v, dtype, device, *, bias=False, ignored=IGNORED, scale=3.0):
    """Random inputs with logits of spread ~``scale``; leaf tensors of ``dtype`` that require grad."""
    h = torch.randn(n, d, device=device).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=device) * (scale / math.sqrt(d))).to(dtype).requires_grad_()
    b = torch.randn(v, device=device).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), device=device)
    t[[i for i in ignored if i < n]] = -100
    return h, w, t, b


def _split(options, **defaults):
    """``(options without the keys of defaults, their values or the defaults)``."""
    rest = {k: v for k, v in options.items() if k not in defaults}
    return rest, [options.get(k, v) for k, v in defaults.items()]


def _reference(h, w, t, b, opts, cast=None):
    """The reference on copies of the inputs (cast to ``cast``, e.g. float64), and those copies."""
    leaves = [None if x is None else x.detach().to(cast or x.dtype).requires_grad_() for x in (h, w, b)]
    out = naive.linear_logprobs(leaves[0], leaves[1], t, leaves[2], return_entropy=True, **opts)
    return out, leaves


def _grads(outputs, upstream, leaves):
    loss = sum((o.double() * g).sum() for o, g in zip(outputs, upstream) if g is not None)
    present = [x for x in leaves if x is not None]
    return list(torch.autograd.grad(loss, present))


def check_against_reference(impl, h, w, t, b, *, atol=1e-5, entropy=True, name="", **opts):
    """Values and gradients (hidden, weight, bias; through logprob and entropy with random upstream gradients)
    within the tolerance rule, plus the invariants: logprob <= 0, entropy >= 0, ignored rows exactly 0 with no
    gradient. Returns the outputs."""
    out = linear_logprobs(h, w, t, b, return_entropy=entropy, impl=impl, **opts)
    outs = list(out) if entropy else [out]
    ref64, leaves64 = _reference(h, w, t, b, opts, torch.float64)
    reflo, leaveslo = _reference(h, w, t, b, opts)
    n = t.shape[0]
    upstream = [torch.randn(n, dtype=torch.float64, device=h.device) for _ in range(2)]
    if not entropy:
        upstream[1] = None
    for i, what in enumerate(["logprobs", "entropy"][:len(outs)]):
        assert outs[i].dtype == torch.float32
        assert_close_to_ref(outs[i], ref64[i], reflo[i], atol=atol, name=f"{name} {what}")
    valid = t != -100
    assert (outs[0] <= 0).all() and (outs[0][~valid] == 0).all()
    if entropy:
        assert (outs[1] >= 0).all() and (outs[1][~valid] == 0).all()
    if n == 0:
        return outs
    present = [x for x in (h, w, b) if x is not None]
    got = _grads(outs, upstream, present)
    want64 = _grads(ref64, upstream, leaves64)
    wantlo = _grads(reflo, upstream, leaveslo)
    for g, g64, glo, what in zip(got, want64, wantlo, ["grad_hidden", "grad_weight", "grad_bias"]):
        assert g.dtype == h.dtype
        assert_close_to_ref(g, g64, glo, atol=atol * (1 + float(g64.abs().max())), name=f"{name} {what}")
    assert (got[0][~valid] == 0).all()
    return outs


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, dtype, opts, device, impl_on):
    impl_on(impl, device)
    opts, (bias, entropy) = _split(opts, bias=False, return_entropy=True)
    h, w, t, b = _inputs(N, D, V, dtype, device, bias=bias)
    check_against_reference(impl, h, w, t, b, entropy=entropy, name=f"{impl} {dtype}", **opts)


@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_tiny_batches(impl, n, device, impl_on):
    impl_on(impl, device)
    h, w, t, b = _inputs(n, D, V, torch.float32, device, bias=True, ignored=())
    check_against_reference(impl, h, w, t, b, name=f"{impl} N={n}", softcap=5.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_rows_give_zero_and_no_gradient(impl, device, impl_on):
    impl_on(impl, device)
    h, w, t, b = _inputs(7, D, V, torch.bfloat16, device, bias=True, ignored=range(7))
    lp, ent = linear_logprobs(h, w, t, b, return_entropy=True, impl=impl)
    assert not lp.any() and not ent.any()
    (lp.sum() + 2 * ent.sum()).backward()
    assert not h.grad.any() and not w.grad.any() and not b.grad.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_shape_and_gradient_through_entropy_alone(impl, device, impl_on):
    impl_on(impl, device)
    h, w, t, _ = _inputs(2 * 5, D, 70, torch.float32, device)
    h3 = h.detach().reshape(2, 5, D).requires_grad_()
    lp, ent = linear_logprobs(h3, w, t.reshape(2, 5), return_entropy=True, impl=impl)
    assert lp.shape == ent.shape == (2, 5)
    ent.sum().backward()  # the logprob output gets no gradient at all
    ref, (h64, w64, _) = _reference(h3.reshape(-1, D), w, t, None, {}, torch.float64)
    g64 = torch.autograd.grad(ref[1].sum(), [h64, w64])
    assert_close_to_ref(h3.grad.reshape(-1, D), g64[0], atol=1e-5, name="grad_hidden")
    assert_close_to_ref(w.grad, g64[1], atol=1e-5, name="grad_weight")


EXTREMES = {
    # every logit near -1e4: the lse must not underflow to -inf
    "all_very_negative": dict(bias_value=-1e4),
    # one vocabulary entry far above the rest: softmax ~ one-hot, other targets near -1e4
    "one_dominant": dict(dominant=1e4),
    # logits scaled to +-1e4
    "scale_1e4": dict(logit_scale=3e3),
    "scale_1e4_softcap": dict(logit_scale=3e3, softcap=30.0),
}


@pytest.mark.parametrize("case", EXTREMES.values(), ids=EXTREMES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits(impl, dtype, case, device, impl_on):
    impl_on(impl, device)
    case, (bias_value, dominant) = _split(case, bias_value=None, dominant=None)
    h, w, t, b = _inputs(N, D, V, dtype, device, bias=True)
    with torch.no_grad():
        if bias_value is not None:
            b.fill_(bias_value)
        if dominant is not None:
            b.zero_()
            b[123] = dominant
            t[:4] = 123
    # The logits reach ~1e4, where one float32 ulp is ~1e-3: the reference's own error sets the bound.
    outs = check_against_reference(impl, h, w, t, b, atol=1e-4, name=f"{impl} {dtype}", **case)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_batch_invariance_is_bitwise(impl, dtype, device, impl_on):
    impl_on(impl, device)
    opts = dict(bias=None, softcap=7.0, temperature=0.9, return_entropy=True, impl=impl)
    h, w, t, b = _inputs(40, D, V, dtype, device, bias=True)
    opts["bias"] = b
    lp, ent = linear_logprobs(h, w, t, **opts)
    idx = torch.tensor([33, 2, 17, 0, 39, 8], device=device)
    # the same rows, in another order, among other rows of other values, and alone
    others = torch.randn(9, D, device=device).to(dtype)
    mixed_h = torch.cat([others[:4], h[idx], others[4:]])
    mixed_t = torch.cat([t[:4], t[idx], t[4:9]])
    lp2, ent2 = linear_logprobs(mixed_h, w, mixed_t, **opts)
    assert torch.equal(lp2[4:4 + len(idx)], lp[idx]) and torch.equal(ent2[4:4 + len(idx)], ent[idx])
    for i in (0, 17, 39):
        lp1, ent1 = linear_logprobs(h[i:i + 1], w, t[i:i + 1], **opts)
        assert torch.equal(lp1, lp[i:i + 1]) and torch.equal(ent1, ent[i:i + 1])


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_backward_is_bitwise_reproducible(impl, device, impl_on):
    impl_on(impl, device)
    h, w, t, b = _inputs(N, D, V, torch.bfloat16, device, bias=True)
    gl, ge = torch.randn(N, device=device), torch.randn(N, device=device)
    runs = []
    for _ in range(2):
        lp, ent = linear_logprobs(h, w, t, b, return_entropy=True, deterministic=True, softcap=5.0, impl=impl)
        runs.append(torch.autograd.grad((lp * gl + ent * ge).sum(), [h, w, b]))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("impl", IMPLS)
def test_targets_of_other_shards_give_zero_target_logit(impl, device, impl_on):
    """A shard's launcher gives z_target = 0 for targets outside ``[vocab_start, vocab_start + V)``, also for those
    just past the shard, which fall in the padding of its last V-block (V=75 is no multiple of any block size)."""
    impl_on(impl, device)
    Vs, start = 75, 75
    h, w, _, b = _inputs(8, D, Vs, torch.float32, device, bias=True)
    t = torch.tensor([0, 74, 75, 76, 100, 149, 150, 200], device=device)  # 75 ... 149 are this shard's
    params = api.LogprobsParams(vocab_start=start, vocab_size=300, impl=impl)
    fwd, _ = api._launchers(impl)
    with torch.no_grad():
        _, z_target, _ = fwd(h, w, t, b, params)
        z = naive.processed_logits(h, w, b)
    mine = (t >= start) & (t < start + Vs)
    expected = torch.where(mine, z.gather(1, (t - start).clamp(0, Vs - 1)[:, None]).squeeze(1), 0.0)
    assert_close_to_ref(z_target.float(), expected, atol=1e-5, name="z_target")
    assert (z_target[~mine] == 0).all()


def test_deterministic_torch_impl_on_cuda_needs_a_reproducible_cublas(monkeypatch):
    cuda = torch.device("cuda")  # only a device object: nothing runs on it
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match=r"impl='torch' on CUDA needs CUBLAS_WORKSPACE_CONFIG .*got None"):
        api._check_deterministic("torch", cuda)
    with pytest.warns(UserWarning, match="CUBLAS_WORKSPACE_CONFIG"):
        api._check_deterministic("torch", cuda, strict=False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(RuntimeError, match="got ':0:0'"):
        api._check_deterministic("torch", cuda)
    for impl, device in [("triton", cuda), ("cpp", torch.device("cpu")), ("torch", torch.device("cpu"))]:
        api._check_deterministic(impl, device)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    api._check_deterministic("torch", cuda)


def test_deterministic_flag_and_torch_mode_reach_the_check(monkeypatch):
    calls = []
    monkeypatch.setattr(api, "_check_deterministic", lambda impl, device, strict: calls.append((impl, strict)))
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 9])
    linear_logprobs(h, w, t, impl="torch")
    assert calls == []
    linear_logprobs(h, w, t, deterministic=True, impl="torch")
    assert calls == [("torch", True)]
    for warn_only in (False, True):
        try:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)
            linear_logprobs(h, w, t, impl="torch")
        finally:
            torch.use_deterministic_algorithms(False)
    assert calls[1:] == [("torch", True), ("torch", False)]


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_gets_no_weight_gradient(impl, device, impl_on):
    impl_on(impl, device)
    h, w, t, _ = _inputs(9, D, 50, torch.float32, device)
    w.requires_grad_(False)
    linear_logprobs(h, w, t, impl=impl).sum().backward()
    ref, (h64, _, _) = _reference(h, w, t, None, {}, torch.float64)
    assert w.grad is None
    assert_close_to_ref(h.grad, torch.autograd.grad(ref[0].sum(), h64)[0], atol=1e-5, name="grad_hidden")


def _bad_calls():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 9])
    return [
        ("hidden int", (h.long(), w, t), {}, TypeError, "hidden must have dtype"),
        ("weight dtype", (h, w.double(), t), {}, TypeError, "weight must have the dtype of hidden"),
        ("weight D", (h, torch.randn(10, 7), t), {}, ValueError, r"weight must be \[V, D\] with D = .* = 8"),
        ("weight 1-D", (h, w[0], t), {}, ValueError, "weight must be 2-D"),
        ("targets shape", (h, w, t[:3]), {}, ValueError, r"targets must have shape .*\(4,\); got \(3,\)"),
        ("targets float", (h, w, t.float()), {}, TypeError, "targets must have dtype"),
        ("target too big", (h, w, torch.tensor([1, 10, 0, 0])), {}, ValueError,
         r"targets must be in \[0, 10\) or ignore_index=-100; got 10 at row 1"),
        ("target negative", (h, w, torch.tensor([1, 2, -5, 0])), {}, ValueError, "got -5 at row 2"),
        ("ignore_index moved", (h, w, t), {"ignore_index": -1}, ValueError, "got -100 at row 2"),
        ("bias shape", (h, w, t, torch.randn(9)), {}, ValueError, r"bias must be \[V\] with V = .* = 10"),
        ("bias dtype", (h, w, t, torch.randn(10).half()), {}, TypeError, "bias must have the dtype of weight"),
        ("temperature 0", (h, w, t), {"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ("temperature nan", (h, w, t), {"temperature": math.nan}, ValueError, "temperature must be"),
        ("softcap 0", (h, w, t), {"softcap": 0.0}, ValueError, "softcap must be None or a finite number > 0"),
        ("softcap negative", (h, w, t), {"softcap": -30.0}, ValueError, "softcap must be None"),
        ("logit_scale inf", (h, w, t), {"logit_scale": math.inf}, ValueError, "logit_scale must be finite"),
        ("devices", (h, w.to("meta"), t), {}, ValueError, "hidden and weight must be on the same device"),
        ("impl unknown", (h, w, t), {"impl": "cuBLAS"}, ValueError, "impl must be one of"),
        ("hidden list", (h.tolist(), w, t), {}, TypeError, "hidden must be a torch.Tensor; got list"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_inputs_raise_clear_errors(case):
    _, args, kwargs, error, match = case
    with pytest.raises(error, match=match):
        linear_logprobs(*args, **{"impl": "torch", **kwargs})


def test_triton_rejects_float64_and_unavailable_impls_raise():
    h, w, t = torch.randn(4, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64), torch.zeros(4).long()
    try:
        linear_logprobs(h, w, t, impl="triton")
    except ImplUnavailableError:
        pass  # Triton not importable here: the named impl must raise, never fall back
    except TypeError as e:
        assert "float64" in str(e)
    else:
        raise AssertionError("impl='triton' accepted float64 inputs")


@pytest.mark.parametrize("impl", IMPLS)
def test_module_wraps_an_lm_head(impl, device, impl_on):
    impl_on(impl, device)
    head = torch.nn.Linear(D, 60, device=device)
    module = LinearLogprobs(head, softcap=9.0, return_entropy=True, impl=impl)
    assert "softcap=9.0" in repr(module)
    h, _, t, _ = _inputs(6, D, 60, torch.float32, device)
    lp, ent = module(h, t)
    ref = naive.linear_logprobs(h.double(), head.weight.double(), t, head.bias.double(), softcap=9.0,
                                return_entropy=True)
    assert_close_to_ref(lp, ref[0], atol=1e-5)
    assert_close_to_ref(ent, ref[1], atol=1e-5)
    lp.sum().backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    with pytest.raises(TypeError, match="lm_head must be a module with a weight"):
        LinearLogprobs(torch.nn.ReLU())


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 9), d=st.integers(1, 24), v=st.integers(1, 80), temperature=st.sampled_from([1.0, 0.5]),
       softcap=st.sampled_from([None, 2.0]), logit_scale=st.sampled_from([1.0, -1.5]), bias=st.booleans(),
       entropy=st.booleans(), n_ignored=st.integers(0, 3))
def test_property_over_shapes_and_options(impl, impl_on, n, d, v, temperature, softcap, logit_scale, bias, entropy,
                                          n_ignored):
    impl_on(impl, "cpu")
    h, w, t, b = _inputs(n, d, v, torch.float32, "cpu", bias=bias, ignored=range(min(n_ignored, n)))
    check_against_reference(impl, h, w, t, b, entropy=entropy, name=impl, temperature=temperature,
                            softcap=softcap, logit_scale=logit_scale)


@pytest.mark.gpu
def test_out_of_range_target_on_gpu_is_a_device_side_assert(tmp_path):
    """On CUDA the range check runs on the device (no host sync) and fails at the next synchronization.
    In a subprocess: a device-side assert poisons the CUDA context."""
    import subprocess
    import sys

    code = ("import torch, fastalign\n"
            "h, w = torch.randn(4, 8, device='cuda'), torch.randn(10, 8, device='cuda')\n"
            "lp = fastalign.linear_logprobs(h, w, torch.tensor([1, 2, 3, 10], device='cuda'))\n"
            "torch.cuda.synchronize()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "targets must be in [0, 10)" in out.stderr


@pytest.mark.parametrize("impl", IMPLS)
def test_traceable_by_torch_compile(impl, impl_on):
    impl_on(impl, "cpu")
    h, w, t, b = _inputs(6, 8, 40, torch.float32, "cpu", bias=True)
    fn = lambda h, w, t, b: linear_logprobs(h, w, t, b, softcap=3.0, return_entropy=True, impl=impl)
    eager = fn(h, w, t, b)  # (the first call imports the impl's module, outside any trace)
    want = torch.autograd.grad(eager[0].sum() + eager[1].sum(), [h, w, b])
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(h, w, t, b)
    got = torch.autograd.grad(out[0].sum() + out[1].sum(), [h, w, b])
    for x, y in zip(list(out) + list(got), list(eager) + list(want)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_triton_custom_ops_pass_opcheck(impl_on):
    impl_on("triton", "cpu")
    h, w, t, b = (x.detach() if x is not None else x for x in _inputs(5, 8, 40, torch.float32, "cpu", bias=True))
    lse, spz, g = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64), torch.randn(5)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastalign.linear_logprobs_triton_fwd.default,
                          (h, w, t, b, 1.0, 3.0, 1.0, True, 0), test_utils=checks)
    torch.library.opcheck(torch.ops.fastalign.linear_logprobs_triton_bwd.default,
                          (h, w, t, b, lse, spz, g, g, 1.0, None, 1.0, 0, True), test_utils=checks)


_COMPILE_FOR_GPU = r"""
import sys, torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fastalign.ops.logprobs import triton as T

INTS = ("N", "V", "D", "stride_h", "stride_w", "vocab_start")
for dtype, name in [(torch.bfloat16, "bf16"), (torch.float32, "fp32")]:
    BN, BV, BD, num_warps = T.block_sizes(4096, 128256, dtype)
    constexprs = dict(HAS_BIAS=True, HAS_SOFTCAP=True, ENTROPY=True, INTERP=False, BN=BN, BV=BV, BD=BD,
                      PREC="ieee" if dtype == torch.float32 else "tf32")
    fwd = {"p_lse": "*fp64", "p_zt": "*fp32", "p_spz": "*fp64"}
    for kernel in (T._fwd_kernel, T._bwd_dh_kernel, T._bwd_dw_kernel):
        names = kernel.arg_names
        ptrs = {"p_h": "*" + name, "p_w": "*" + name, "p_b": "*" + name, "p_t": "*i64",
                **(fwd if kernel is T._fwd_kernel else {})}
        signature = {n: "constexpr" if n in constexprs else ptrs.get(n, "*fp32" if n.startswith("p_") else
                     "i64" if n in INTS else "fp32") for n in names}
        src = ASTSource(fn=kernel, signature=signature,
                        constexprs={(names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", int(sys.argv[1]), 32),
                                  options={"num_warps": num_warps, "num_stages": 3})
        # bf16 tiles go to the tensor cores; float32 (IEEE products, for accuracy) to FMAs
        assert ("mma" in compiled.asm["ptx"]) == (name == "bf16"), f"{kernel.__name__} {name}: unexpected PTX"
print("compiled")
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpus(arch, tmp_path):
    """The GPU compilation (Triton -> PTX -> cubin with ptxas) of the kernels at the GPU block sizes, with every
    option on, without a GPU: catches what the interpreter accepts and the compiler does not."""
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("triton")
    if shutil.which("ptxas") is None and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("ptxas not found")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU, str(arch)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


def _degenerate_calls():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 9])
    return [
        ("D=0", (torch.randn(4, 0), torch.randn(10, 0), t), {}, ValueError,
         r"hidden must have a hidden size D = hidden.shape\[-1\] >= 1; got shape \(4, 0\)"),
        ("V=0", (h, torch.randn(0, 8), torch.full((4,), -100)), {}, ValueError,
         r"weight must hold at least one vocabulary row \(V >= 1\); got shape \(0, 8\)"),
        ("ignore_index 2**63", (h, w, t), {"ignore_index": 2**63}, ValueError,
         r"ignore_index must be an integer in \[-2\*\*63, 2\*\*63\); got 9223372036854775808"),
        ("ignore_index float", (h, w, t), {"ignore_index": -100.5}, TypeError,
         "ignore_index must be an integer; got float"),
    ]


@pytest.mark.parametrize("case", _degenerate_calls(), ids=lambda c: c[0])
@pytest.mark.parametrize("impl", IMPLS)
def test_degenerate_shapes_and_options_raise_the_same_clear_error_on_every_impl(impl, case, impl_on):
    impl_on(impl, "cpu")
    _, args, kwargs, error, match = case
    with pytest.raises(error, match=match):
        linear_logprobs(*args, impl=impl, **kwargs)
