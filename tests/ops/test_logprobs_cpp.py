"""The ``cpp`` impl of linear_logprobs: its launchers (``ops/logprobs/cpu.py``) and raw ops against the reference.

Shapes are chosen against the kernel's tiling (64-row blocks, 512-row vocabulary tiles grouped into chunks):
V = 1100 is three tiles (the last partial) in three chunks, N = 150 is three row blocks (the last padded),
D = 50 is not a power of two.
"""

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastalign.ops.logprobs import api, naive
from fastalign.ops.logprobs.api import LogprobsParams
from fastalign.testing import assert_close_to_ref

N, D, V = 150, 50, 1100
IGNORE = -100

OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "temperature": {"temperature": 0.7},
    "softcap": {"softcap": 4.0},
    "logit_scale": {"logit_scale": 1.7},
    "entropy": {"return_entropy": True},
    "all": {"bias": True, "temperature": 1.3, "softcap": 6.0, "logit_scale": 0.6, "return_entropy": True},
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# atol relative to the reference's magnitude: float64 runs have no low-precision reference to scale from,
# and in float32 the reference's own error can happen to be tiny on a given element.
ATOL = {torch.float64: 1e-11, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


@pytest.fixture(autouse=True)
def _needs_cpp(impl_on):
    impl_on("cpp", "cpu")


def _cpu():
    from fastalign.ops.logprobs import cpu

    return cpu


def _inputs(n, d, v, dtype, *, bias=False, ignore_frac=0.2, scale=1.0):
    h = (torch.randn(n, d, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(v, d, dtype=torch.float64) / d**0.5 * 3).to(dtype)
    b = torch.randn(v, dtype=torch.float64).to(dtype) if bias else None
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < ignore_frac] = IGNORE
    return h, w, y, b


def _params(opts):
    return LogprobsParams(**{k: v for k, v in opts.items() if k != "bias"})


def _naive_outputs(h, w, y, b, params, g, e):
    """Reference logprobs, entropy and their gradients (autograd through naive.py), in h's dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, w)] + \
        ([b.detach().clone().requires_grad_()] if b is not None else [])
    lp, ent = naive.linear_logprobs(leaves[0], leaves[1], y, leaves[2] if b is not None else None,
                                    params.temperature, params.softcap, params.logit_scale, params.ignore_index,
                                    return_entropy=True)
    loss = (lp * g.to(lp.dtype)).sum()
    if params.return_entropy:
        loss = loss + (ent * e.to(ent.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return lp.detach(), ent.detach(), list(grads) + ([None] if b is None else [])


def _run_cpp(h, w, y, b, params, g, e):
    cpu = _cpu()
    lse, zt, spz = cpu.linear_logprobs_fwd(h, w, y, b, params)
    gh, gw, gb = cpu.linear_logprobs_bwd(h, w, y, b, lse, spz, g.to(lse.dtype),
                                         e.to(lse.dtype) if params.return_entropy else None, params)
    return lse, zt, spz, [gh, gw, gb]


def _check_against_reference(h, w, y, b, params, *, atol_scale=1.0, name=""):
    valid = y != IGNORE
    g = torch.randn(h.shape[0], dtype=torch.float64) * valid
    e = torch.randn(h.shape[0], dtype=torch.float64) * valid
    lse, zt, spz, grads = _run_cpp(h, w, y, b, params, g, e)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    assert lse.dtype == torch.float64 and zt.dtype == acc and (spz is None) == (not params.return_entropy)
    lp = torch.where(valid, zt - lse, 0.0)
    up = lambda t: None if t is None else t.double()
    lp64, ent64, grads64 = _naive_outputs(up(h), up(w), y, up(b), params, g, e)
    ref_lp, ref_ent, ref_grads = (None, None, [None] * 3) if h.dtype == torch.float64 else \
        _naive_outputs(h, w, y, b, params, g, e)
    atol = ATOL[h.dtype] * atol_scale
    scale = lambda t: atol * (1 + float(t.abs().max())) if t.numel() else atol
    assert_close_to_ref(lp, lp64, ref_lp, atol=scale(lp64), name=f"{name} logprobs")
    lse64 = torch.logsumexp(naive.processed_logits(up(h), up(w), up(b), params.temperature, params.softcap,
                                                   params.logit_scale), -1)
    # lse has no low-precision reference: the kernel upcasts its inputs exactly and accumulates in float32.
    assert_close_to_ref(torch.where(valid, lse, 0.0), torch.where(valid, lse64, 0.0), atol=4 * scale(lse64),
                        name=f"{name} lse")
    if params.return_entropy:
        ent = torch.where(valid, lse - spz, 0.0)
        assert spz.dtype == torch.float64  # lse - sum_pz must not cancel at large logits (test_extreme_logits)
        assert_close_to_ref(ent, ent64, ref_ent, atol=scale(ent64), name=f"{name} entropy")
    for what, out, r64, rlow in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, grads64, ref_grads):
        if r64 is None:
            assert out is None
            continue
        assert out.dtype == h.dtype and out.shape == r64.shape
        assert_close_to_ref(out, r64, rlow, atol=scale(r64), name=f"{name} {what}")
    return lse, zt, spz, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_reference_values_and_grads(dtype, option):
    opts = OPTIONS[option]
    h, w, y, b = _inputs(N, D, V, dtype, bias=opts.get("bias", False))
    _check_against_reference(h, w, y, b, _params(opts), name=f"{dtype} {option}")


@pytest.mark.parametrize("n, d, v", [(1, 7, 1), (1, 33, 513), (64, 64, 512), (65, 3, 2000), (3, 130, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_awkward_shapes(n, d, v, dtype):
    h, w, y, b = _inputs(n, d, v, dtype, bias=True, ignore_frac=0.0)
    _check_against_reference(h, w, y, b, LogprobsParams(return_entropy=True, softcap=5.0), name=f"{n}x{d}x{v}")


@pytest.mark.parametrize("how", ["all_ignored", "empty"])
def test_no_valid_rows_gives_zeros(how):
    n = 0 if how == "empty" else 70
    h, w, y, b = _inputs(n, D, V, torch.float32, bias=True)
    y[:] = IGNORE
    params = LogprobsParams(return_entropy=True)
    lse, zt, spz, (gh, gw, gb) = _run_cpp(h, w, y, b, params, torch.randn(n), torch.randn(n))
    for t in (lse, zt, spz, gh, gw, gb):
        assert t.numel() == 0 or (t == 0).all()
    assert gh.shape == (n, D) and gw.shape == (V, D) and gb.shape == (V,)


def test_ignored_rows_get_zero_outputs_and_grads():
    h, w, y, b = _inputs(N, D, V, torch.float32)
    y[::3] = IGNORE
    g = torch.randn(N)  # nonzero on ignored rows too: the kernel must skip them
    params = LogprobsParams(return_entropy=True)
    lse, zt, spz, (gh, _, _) = _run_cpp(h, w, y, b, params, g, torch.randn(N))
    ig = y == IGNORE
    assert (lse[ig] == 0).all() and (zt[ig] == 0).all() and (spz[ig] == 0).all() and (gh[ig] == 0).all()
    assert (lse[~ig] != 0).all() and (gh[~ig] != 0).any()


def test_extreme_logits():
    # Logits of order 1e4 (one token dominates each row), and a row where all logits are very negative.
    h, w, y, _ = _inputs(20, D, V, torch.float32, ignore_frac=0.0, scale=2000.0)
    h[0] = 0
    b = torch.full((V,), -5e3)
    y[1] = int((h[1].double() @ w.double().T).argmax())  # a row whose target is the dominant token
    lse, zt, spz, _ = _check_against_reference(h, w, y, b, LogprobsParams(return_entropy=True), name="extreme")
    assert (zt - lse <= 0).all() and (lse - spz >= -1e-3 * lse.abs()).all()
    assert float(zt[1] - lse[1]) > -1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocab_shards_combine_to_the_unsharded_op(dtype):
    """Two vocabulary shards (vocab_start != 0 for the second), combined as the vocab-parallel API does."""
    h, w, y, b = _inputs(N, D, V, dtype, bias=True)
    valid = y != IGNORE
    g, e = torch.randn(N) * valid, torch.randn(N) * valid
    cut = 700  # not a tile boundary
    shards = [(0, w[:cut], b[:cut]), (cut, w[cut:], b[cut:])]
    cpu = _cpu()
    shard_params = lambda start: LogprobsParams(return_entropy=True, vocab_start=start, vocab_size=V)
    outs = [cpu.linear_logprobs_fwd(h, ws, y, bs, shard_params(s)) for s, ws, bs in shards]
    lse = torch.logsumexp(torch.stack([o[0] for o in outs]), 0)
    zt = sum(o[1] for o in outs)
    spz = sum(torch.exp(o[0] - lse) * o[2] for o in outs)
    grads = [cpu.linear_logprobs_bwd(h, ws, y, bs, lse, spz, g, e, shard_params(s)) for s, ws, bs in shards]
    gh = sum(gr[0].float() for gr in grads).to(dtype)
    gw = torch.cat([gr[1] for gr in grads])
    gb = torch.cat([gr[2] for gr in grads])
    full = _run_cpp(h, w, y, b, LogprobsParams(return_entropy=True), g, e)
    up = lambda t: t.double()
    lp64, ent64, grads64 = _naive_outputs(up(h), up(w), y, up(b), LogprobsParams(return_entropy=True), g, e)
    # The sharded result is as close to float64 as the unsharded cpp result is (plus float32 rounding).
    masked = lambda t: torch.where(valid, t, 0.0)
    for out, ref64, unsharded in [(masked(zt - lse), lp64, masked(full[1] - full[0])),
                                  (masked(lse - spz), ent64, masked(full[0] - full[2])),
                                  (gh, grads64[0], full[3][0]), (gw, grads64[1], full[3][1]),
                                  (gb, grads64[2], full[3][2])]:
        assert_close_to_ref(out, ref64, unsharded, atol=1e-5 * (1 + float(ref64.abs().max())), name="sharded")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("v", [300, V])  # one vocabulary chunk (its gemms run outside a parallel region), three
def test_batch_invariance_bitwise(dtype, softcap, v):
    """A row's outputs do not depend on N, the other rows, its position, or the thread count."""
    h, w, y, b = _inputs(N, D, v, dtype, bias=True, ignore_frac=0.0)
    params = LogprobsParams(return_entropy=True, softcap=softcap)
    fwd = _cpu().linear_logprobs_fwd
    lse, zt, spz = fwd(h, w, y, b, params)
    perm = torch.randperm(N)
    outs = fwd(h[perm], w, y[perm], b, params)
    for full, other in zip((lse, zt, spz), outs):
        assert torch.equal(full[perm], other)
    for i in (0, 63, 64, 149):  # alone (N = 1), and among fresh rows at another position
        single = fwd(h[i:i + 1], w, y[i:i + 1], b, params)
        others, yo = torch.randn(100, D).to(dtype), torch.randint(0, v, (100,))
        mixed = fwd(torch.cat([others[:37], h[i:i + 1], others[37:]]), w, torch.cat([yo[:37], y[i:i + 1], yo[37:]]),
                    b, params)
        for full, one, mix in zip((lse, zt, spz), single, mixed):
            assert torch.equal(full[i:i + 1], one) and torch.equal(full[i:i + 1], mix[37:38])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        outs = fwd(h, w, y, b, params)
    finally:
        torch.set_num_threads(threads)
    for full, other in zip((lse, zt, spz), outs):
        assert torch.equal(full, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_bitwise_reproducible(dtype):
    h, w, y, b = _inputs(N, D, V, dtype, bias=True)
    params = LogprobsParams(return_entropy=True, softcap=5.0, deterministic=True)
    g, e = torch.randn(N), torch.randn(N)
    cpu = _cpu()
    lse, _, spz = cpu.linear_logprobs_fwd(h, w, y, b, params)
    first = cpu.linear_logprobs_bwd(h, w, y, b, lse, spz, g, e, params)
    threads = torch.get_num_threads()
    try:
        for n_threads in (threads, 1):
            torch.set_num_threads(n_threads)
            again = cpu.linear_logprobs_bwd(h, w, y, b, lse, spz, g, e, params)
            for a, c in zip(first, again):
                assert torch.equal(a, c)
    finally:
        torch.set_num_threads(threads)


def test_int32_targets_and_noncontiguous_inputs():
    h, w, y, b = _inputs(N, D, V, torch.float32, bias=True)
    params = LogprobsParams(return_entropy=True)
    cpu = _cpu()
    ref = cpu.linear_logprobs_fwd(h, w, y, b, params)
    ht = h.T.contiguous().T  # same values, column-major
    out = cpu.linear_logprobs_fwd(ht, w, y.int(), b, params)
    for a, c in zip(ref, out):
        assert torch.equal(a, c)


def _op_args(dtype=torch.float32, n=5, entropy=True):
    h, w, y, b = _inputs(n, 12, 40, dtype, bias=True, ignore_frac=0.0)
    lse, _, spz = torch.ops.fastalign.linear_logprobs_fwd(h, w, y, b, 1.0, None, 1.0, IGNORE, 0, 0)
    return h, w, y, b, lse, spz, torch.randn(n), torch.randn(n) if entropy else None


def test_opcheck_schema_and_fake_tensor():
    _cpu()  # registers the fake impls
    h, w, y, b, lse, spz, g, e = _op_args()
    for bias in (b, None):
        torch.library.opcheck(torch.ops.fastalign.linear_logprobs_fwd.default,
                              (h, w, y, bias, 0.9, 3.0, 1.1, IGNORE, 0, 0),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.fastalign.linear_logprobs_bwd.default,
                              (h, w, y, bias, lse, spz, g, e, 0.9, 3.0, 1.1, IGNORE, 0, 0, True),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastalign.linear_logprobs_bwd.default,
                          (h.bfloat16(), w.bfloat16(), y, None, lse, None, g, None, 1.0, None, 1.0, IGNORE, 0, 0,
                           False),
                          test_utils=("test_schema", "test_faketensor"))


FWD_BAD = [
    (lambda a: {**a, "hidden": a["hidden"][0]}, ValueError, "hidden must be 2-D"),
    (lambda a: {**a, "hidden": a["hidden"].long()}, TypeError, "hidden must be float32"),
    (lambda a: {**a, "weight": a["weight"].double()}, TypeError, "weight must have the dtype of hidden"),
    (lambda a: {**a, "weight": a["weight"][:, :5]}, ValueError, r"weight must be \[V, D\] with D"),
    (lambda a: {**a, "weight": a["weight"][:0], "bias": None}, ValueError, "at least one vocabulary row"),
    (lambda a: {**a, "targets": a["targets"][:3]}, ValueError, r"targets must be \[N\]"),
    (lambda a: {**a, "targets": a["targets"].float()}, TypeError, "targets must be int32 or int64"),
    (lambda a: {**a, "targets": torch.tensor([0, 1, -5, 2, 3])}, ValueError, r"in \[0, 40\) .* got -5 at row 2"),
    (lambda a: {**a, "targets": torch.tensor([0, 1, 2, 40, 3])}, ValueError, r"in \[0, 40\) .* got 40 at row 3"),
    (lambda a: {**a, "vocab_start": 40, "targets": torch.tensor([0, 79, 80, 2, 3])}, ValueError,
     r"in \[0, 80\) .* got 80 at row 2"),
    (lambda a: {**a, "vocab_size": 100, "targets": torch.tensor([0, 99, 100, 2, 3])}, ValueError,
     r"in \[0, 100\) .* got 100 at row 2"),
    (lambda a: {**a, "vocab_start": 70, "vocab_size": 100}, ValueError, r"vocab_size must be 0 .* \[70, 110\)"),
    (lambda a: {**a, "bias": a["bias"][:7]}, ValueError, r"bias must be \[V\]"),
    (lambda a: {**a, "bias": a["bias"].half()}, TypeError, "bias must have the dtype of weight"),
    (lambda a: {**a, "temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    (lambda a: {**a, "temperature": float("nan")}, ValueError, "temperature must be a finite number > 0"),
    (lambda a: {**a, "softcap": -1.0}, ValueError, "softcap must be None or a finite number > 0"),
    (lambda a: {**a, "logit_scale": float("inf")}, ValueError, "logit_scale must be finite"),
    (lambda a: {**a, "vocab_start": -1}, ValueError, "vocab_start must be >= 0"),
]


@pytest.mark.parametrize("bad, exc, match", FWD_BAD)
@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_raw_ops_reject_bad_arguments(bad, exc, match, op):
    """Straight into the C++ ops, bypassing all Python validation: they must raise, never crash."""
    h, w, y, b, lse, spz, g, e = _op_args()
    args = bad({"hidden": h, "weight": w, "targets": y, "bias": b, "temperature": 1.0, "softcap": None,
                "logit_scale": 1.0, "ignore_index": IGNORE, "vocab_start": 0, "vocab_size": 0})
    with pytest.raises(exc, match=match):
        if op == "fwd":
            torch.ops.fastalign.linear_logprobs_fwd(*args.values())
        else:
            a = list(args.values())
            torch.ops.fastalign.linear_logprobs_bwd(*a[:4], lse, spz, g, e, *a[4:], True)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda lse, spz, g, e: (lse[:2], spz, g, e), ValueError, r"lse must be \[N\]"),
    (lambda lse, spz, g, e: (lse.half(), spz, g, e), TypeError, "lse must be float32 or float64"),
    (lambda lse, spz, g, e: (lse, spz, g[None], e), ValueError, "grad_logprobs must be 1-D"),
    (lambda lse, spz, g, e: (lse, None, g, e), ValueError, "sum_pz must be given with grad_entropy"),
    (lambda lse, spz, g, e: (lse, spz[:1], g, e), ValueError, r"sum_pz must be \[N\]"),
    (lambda lse, spz, g, e: (lse, spz, g, e.long()), TypeError, "grad_entropy must be float32 or float64"),
])
def test_raw_backward_rejects_bad_saved_and_upstream_tensors(bad, exc, match):
    h, w, y, b, lse, spz, g, e = _op_args()
    with pytest.raises(exc, match=match):
        torch.ops.fastalign.linear_logprobs_bwd(h, w, y, b, *bad(lse, spz, g, e), 1.0, None, 1.0, IGNORE, 0, 0, True)


def test_frozen_head_skips_grad_weight():
    h, w, y, b = _inputs(N, D, V, torch.bfloat16, bias=True)
    g, e = torch.randn(N), torch.randn(N)
    params = LogprobsParams(return_entropy=True, softcap=5.0)
    cpu = _cpu()
    lse, _, spz = cpu.linear_logprobs_fwd(h, w, y, b, params)
    full = cpu.linear_logprobs_bwd(h, w, y, b, lse, spz, g, e, params)
    frozen = cpu.linear_logprobs_bwd(h, w, y, b, lse, spz, g, e, replace(params, compute_grad_weight=False))
    assert frozen[1] is None and full[1] is not None
    assert torch.equal(frozen[0], full[0]) and torch.equal(frozen[2], full[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_through_the_autograd_function(dtype):
    """The path ``linear_logprobs(..., impl="cpp")`` takes once "cpp" is in api.IMPLS: the autograd Function
    over these launchers, against the reference's values and autograd gradients."""
    h, w, y, b = _inputs(N, D, V, dtype, bias=True)
    valid = y != IGNORE
    g, e = torch.randn(N) * valid, torch.randn(N) * valid
    params = LogprobsParams(return_entropy=True, temperature=0.8, softcap=6.0, impl="cpp")
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    lp, ent = api.LinearLogprobsFunction.apply(leaves[0], leaves[1], y, leaves[2], params)
    ((lp * g).sum() + (ent * e).sum()).backward()
    lp64, ent64, grads64 = _naive_outputs(h.double(), w.double(), y, b.double(), params, g, e)
    ref_lp, ref_ent, ref_grads = _naive_outputs(h, w, y, b, params, g, e)
    for out, r64, rlow, what in [(lp, lp64, ref_lp, "logprobs"), (ent, ent64, ref_ent, "entropy")] + \
            [(t.grad, r, rl, "grad") for t, r, rl in zip(leaves, grads64, ref_grads)]:
        assert_close_to_ref(out, r64, rlow, atol=2e-6 * (1 + float(r64.abs().max())), name=f"Function {what}")


@pytest.mark.parametrize("entropy", [False, True])
def test_rows_without_gradient_are_left_out_of_the_backward(entropy, monkeypatch):
    """Rows whose incoming gradient is zero (PPO's clipped tokens) reach the kernel as ignored, so it does no
    work for them; the gradients stay those of the reference. The cpp launcher does this, not the (impl-agnostic)
    autograd Function, which passes the targets on as given."""
    h, w, y, b = _inputs(N, D, V, torch.float32, bias=True)
    valid = y != IGNORE
    g = torch.randn(N) * valid
    e = torch.randn(N) * valid if entropy else None
    dead = torch.rand(N) < 0.5
    g[dead] = 0.0
    if entropy:
        e[dead & (torch.rand(N) < 0.5)] = 0.0  # a row with only an entropy gradient still has work
    seen, given = [], []
    launchers, kernel = api._launchers, torch.ops.fastalign.linear_logprobs_bwd

    def spy(impl):
        fwd, bwd = launchers(impl)
        return fwd, lambda hh, ww, yy, *rest: (given.append(yy.clone()), bwd(hh, ww, yy, *rest))[1]

    monkeypatch.setattr(api, "_launchers", spy)
    monkeypatch.setattr(torch.ops.fastalign, "linear_logprobs_bwd",
                        lambda hh, ww, yy, *rest: (seen.append(yy.clone()), kernel(hh, ww, yy, *rest))[1])
    params = LogprobsParams(return_entropy=entropy, impl="cpp")
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    out = api.LinearLogprobsFunction.apply(leaves[0], leaves[1], y, leaves[2], params)
    lp, ent = out if entropy else (out, None)
    ((lp * g).sum() + ((ent * e).sum() if entropy else 0)).backward()
    assert torch.equal(given[0], y)
    live = (g != 0) | (e != 0) if entropy else g != 0
    assert torch.equal(seen[0], torch.where(live, y, IGNORE)) and (live != valid).any()
    assert (leaves[0].grad[~live] == 0).all() and (leaves[0].grad[live] != 0).all()
    _, _, grads64 = _naive_outputs(h.double(), w.double(), y, b.double(), params, g, e)
    _, _, grads32 = _naive_outputs(h, w, y, b, params, g, e)
    for t, r64, r32, name in zip(leaves, grads64, grads32, ("hidden", "weight", "bias")):
        assert_close_to_ref(t.grad, r64, r32, atol=2e-6 * (1 + float(r64.abs().max())), name=name)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 140), d=st.integers(1, 70), v=st.integers(1, 1600), bias=st.booleans(),
       temperature=st.sampled_from([1.0, 0.6]), softcap=st.sampled_from([None, 3.0]),
       ignore_frac=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_property_shapes_and_options_match_reference(n, d, v, bias, temperature, softcap, ignore_frac, seed):
    """Shapes across the kernel's block boundaries (rows: 64, vocabulary tiles: 512), options and ignored rows."""
    torch.manual_seed(seed)
    h, w, y, b = _inputs(n, d, v, torch.float32, bias=bias, ignore_frac=ignore_frac)
    params = LogprobsParams(return_entropy=True, temperature=temperature, softcap=softcap)
    _check_against_reference(h, w, y, b, params, name=f"n={n} d={d} v={v}")


@pytest.mark.parametrize("expand", ["row", "scalar", "column"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expanded_weight_is_read_in_place_not_copied(dtype, expand):
    """A weight with a zero stride (``expand``ed from one row, one element or one column) is read tile by tile:
    no allocation reaches half of a [V, D] float32 copy (it used to be copied whole: 8 GiB from 4 bytes), and the
    results equal those of the materialized weight."""
    from torch.profiler import ProfilerActivity, profile

    n, d, v = 70, 64, 8192
    src = {"row": torch.randn(1, d), "scalar": torch.randn(1, 1), "column": torch.randn(v, 1)}[expand].to(dtype)
    w = src.expand(v, d)
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (n,))
    opts = dict(return_entropy=True, softcap=5.0, impl="cpp")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lp, ent = api.linear_logprobs(h, w, y, **opts)
        gh, = torch.autograd.grad((lp + ent).sum(), h)
    assert max(e.cpu_memory_usage for e in prof.events()) < v * d * 4 // 2
    lp2, ent2 = api.linear_logprobs(h, w.contiguous(), y, **opts)
    gh2, = torch.autograd.grad((lp2 + ent2).sum(), h)
    for got, want in ((lp, lp2), (ent, ent2), (gh, gh2)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_raw_ops_reject_zero_hidden_size():
    match = r"hidden must have a hidden size D = hidden.size\(1\) >= 1; got shape \[4, 0\]"
    with pytest.raises(ValueError, match=match):
        torch.ops.fastalign.linear_logprobs_fwd(torch.randn(4, 0), torch.randn(10, 0), torch.zeros(4).long(), None,
                                                1.0, None, 1.0, -100, 0, 0)
