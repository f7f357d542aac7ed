"""fused_linear_dpo_loss / FusedLinearDPOLoss against the naive TRL-style path (materialized logits)."""

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign import FusedLinearDPOLoss, dpo_loss, fused_linear_dpo_loss
from fastalign.ops.logprobs.api import IMPLS
from fastalign.testing import assert_close_to_ref

B, D, V = 2, 24, 67  # V and D deliberately not multiples of any block size
LOSS = dict(beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])


def naive_sequence_logps(hidden, weight, bias, labels, cu):
    """TRL-style: logits = hidden @ W.T + b in the inputs' dtype, log_softmax in float32 (float64), gather, sum."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = logits.to(acc).log_softmax(-1)
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0).long()[..., None])[..., 0] * mask
    if cu is None:
        return tok.sum(-1), mask.sum(-1)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    return torch.stack([tok[a:b].sum() for a, b in bounds]), torch.stack([mask[a:b].sum() for a, b in bounds])


def naive_loss(hidden, weight, bias, labels, cu, ref, loss_options):
    sums, lengths = naive_sequence_logps(hidden, weight, bias, labels, cu)
    if ref is None:
        rc = rr = None
    elif isinstance(ref, tuple) and len(ref) == 2:
        rc, rr = ref
    else:
        with torch.no_grad():
            ref_sums, _ = naive_sequence_logps(*ref, labels, cu)
        rc, rr = ref_sums[:B], ref_sums[B:]
    return dpo_loss(sums[:B], sums[B:], rc, rr, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
                    **loss_options)


def make_batch(layout, dtype, with_bias=True):
    """Random policy and reference LM-head inputs; labels with prompts and (padded) trailing padding ignored."""
    if layout == "padded":
        T = 7
        labels = torch.randint(0, V, (2 * B, T))
        for i in range(2 * B):
            prompt, pad = int(torch.randint(0, 3, ())), int(torch.randint(0, 3, ()))
            labels[i, :prompt] = -100
            labels[i, T - pad:] = -100
        cu = None
        shape = (2 * B, T, D)
    else:
        lengths = torch.randint(2, 9, (2 * B,))
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        labels = torch.randint(0, V, (int(cu[-1]),))
        for a in cu[:-1].tolist():
            labels[a:a + int(torch.randint(0, 2, ()))] = -100
        shape = (int(cu[-1]), D)
    hidden = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn(V, D, dtype=torch.float64) * 0.3
    bias = torch.randn(V, dtype=torch.float64) * 0.5 if with_bias else None
    ref = (hidden + 0.3 * torch.randn(shape, dtype=torch.float64),
           weight + 0.05 * torch.randn(V, D, dtype=torch.float64),
           None if bias is None else bias + 0.05 * torch.randn(V, dtype=torch.float64))
    cast = lambda t: None if t is None else t.to(dtype)
    return [cast(t) for t in (hidden, weight, bias)], labels, cu, tuple(cast(t) for t in ref)


def loss_and_grads(fn, hidden, weight, bias):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, metrics = fn(*leaves)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("ref_mode", ["precomputed", "on_the_fly"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_naive_path(impl, layout, ref_mode, dtype, impl_on):
    impl_on(impl, "cpu")
    (h, w, b), labels, cu, ref = make_batch(layout, dtype)
    ref64_model = tuple(None if t is None else t.double() for t in ref)
    if ref_mode == "precomputed":
        ref_sums, _ = naive_sequence_logps(*ref64_model, labels, cu)
        ref_args = dict(ref_chosen_logps=ref_sums[:B].float(), ref_rejected_logps=ref_sums[B:].float())
        naive_ref = (ref_sums[:B].float(), ref_sums[B:].float())
        naive_ref64 = (ref_sums[:B].float().double(), ref_sums[B:].float().double())
    else:
        ref_args = dict(ref_hidden=ref[0], ref_weight=ref[1], ref_bias=ref[2])
        naive_ref, naive_ref64 = ref, ref64_model

    ours = loss_and_grads(lambda h_, w_, b_: fused_linear_dpo_loss(h_, w_, labels, b_, cu_seqlens=cu, impl=impl,
                                                                    **ref_args, **LOSS), h, w, b)
    ref64 = loss_and_grads(lambda h_, w_, b_: naive_loss(h_, w_, b_, labels, cu, naive_ref64, LOSS),
                           h.double(), w.double(), b.double())
    ref_lowp = loss_and_grads(lambda h_, w_, b_: naive_loss(h_, w_, b_, labels, cu, naive_ref, LOSS), h, w, b)
    assert ours[0].dtype == torch.float32
    assert_close_to_ref(ours[0], ref64[0], ref_lowp[0], atol=1e-5 * (1 + ref64[0].abs().item()), name="loss")
    for name, o, r, rl in zip(("grad hidden", "grad weight", "grad bias"), ours[2], ref64[2], ref_lowp[2]):
        assert o.dtype == dtype
        assert_close_to_ref(o, r, rl, atol=1e-6 * (1 + r.abs().max().item()), name=name)
    for k, v in ref64[1].items():
        assert_close_to_ref(ours[1][k], v, ref_lowp[1][k], atol=1e-5 * (1 + abs(v.item())), name=k)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("loss_type", ["simpo", "ipo", "orpo"])
def test_fused_reference_free_and_length_normalized(layout, loss_type):
    (h, w, _), labels, cu, ref = make_batch(layout, torch.float64, with_bias=False)
    opts = dict(beta=2.0, loss_type=loss_type, simpo_gamma=0.3)
    ref_args = {} if loss_type in ("simpo", "orpo") else dict(ref_hidden=ref[0], ref_weight=ref[1])
    ours = loss_and_grads(lambda h_, w_, b_: fused_linear_dpo_loss(h_, w_, labels, cu_seqlens=cu, **ref_args,
                                                                    **opts), h, w, None)
    naive_ref = None if not ref_args else (ref[0], ref[1], None)
    ref64 = loss_and_grads(lambda h_, w_, b_: naive_loss(h_, w_, None, labels, cu, naive_ref, opts), h, w, None)
    assert_close_to_ref(ours[0], ref64[0], atol=1e-12, name="loss")
    for name, o, r in zip(("grad hidden", "grad weight"), ours[2], ref64[2]):
        assert_close_to_ref(o, r, atol=1e-12, name=name)


def test_average_log_prob_divides_by_completion_lengths():
    (h, w, b), labels, cu, ref = make_batch("padded", torch.float64)
    loss, m = fused_linear_dpo_loss(h, w, labels, b, ref_hidden=ref[0], ref_weight=ref[1], ref_bias=ref[2],
                                    average_log_prob=True, beta=0.5)
    sums, n = naive_sequence_logps(h, w, b, labels, None)
    ref_sums, _ = naive_sequence_logps(*ref, labels, None)
    a, ra = sums / n, ref_sums / n
    expected, em = dpo_loss(a[:B], a[B:], ra[:B], ra[B:], beta=0.5)
    assert_close_to_ref(loss, expected, atol=1e-12)
    assert_close_to_ref(m["logps/chosen"], em["logps/chosen"], atol=1e-12)


def test_module_matches_functional_and_keeps_bco_state():
    (h, w, b), labels, cu, ref = make_batch("padded", torch.float32)
    assert FusedLinearDPOLoss(beta=0.2, loss_type="bco_pair").bco_state is None  # TRL's bco_pair: no shift
    module = FusedLinearDPOLoss(beta=0.2, loss_type=["bco_pair", "sigmoid"], loss_weights=[1.0, 0.3],
                                bco_shift=True)
    assert "bco_pair" in repr(module)
    for step in range(2):
        got, _ = module(h, w, labels, b, ref_hidden=ref[0], ref_weight=ref[1], ref_bias=ref[2])
        assert module.bco_state.count == step + 1
    sums, _ = naive_sequence_logps(h, w, b, labels, None)
    ref_sums, _ = naive_sequence_logps(*ref, labels, None)
    from fastalign import BCORunningMean

    state = BCORunningMean()
    for _ in range(2):
        expected, _ = dpo_loss(sums[:B], sums[B:], ref_sums[:B], ref_sums[B:], beta=0.2,
                               loss_type=["bco_pair", "sigmoid"], loss_weights=[1.0, 0.3], bco_state=state,
                               bco_shift=True)
    assert_close_to_ref(got, expected, atol=1e-5)
    resumed = FusedLinearDPOLoss(beta=0.2, loss_type=["bco_pair", "sigmoid"], loss_weights=[1.0, 0.3],
                                 bco_shift=True)
    resumed.load_state_dict(module.state_dict())
    assert resumed.bco_state.count == 2
    assert float(resumed.bco_state.mean) == float(module.bco_state.mean)


def test_reference_is_evaluated_without_grad():
    (h, w, b), labels, cu, ref = make_batch("padded", torch.float32)
    ref_h, ref_w = ref[0].clone().requires_grad_(), ref[1].clone().requires_grad_()
    loss, _ = fused_linear_dpo_loss(h.requires_grad_(), w, labels, b, ref_hidden=ref_h, ref_weight=ref_w)
    loss.backward()
    assert ref_h.grad is None and ref_w.grad is None and h.grad is not None


@pytest.mark.parametrize("loss_type", ["sigmoid", "apo_zero", "apo_down", "sppo_hard", "nca_pair"])
def test_against_liger_fused_dpo_when_installed(loss_type):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    (h, w, b), labels, cu, ref = make_batch("padded", torch.float32)
    kwargs = dict(ignore_index=-100, beta=0.2, compute_nll_loss=False, use_ref_model=True)
    params = inspect.signature(chunked.LigerFusedLinearDPOLoss).parameters
    if "compiled" in params:
        kwargs["compiled"] = False
    if "average_log_prob" in params:
        kwargs["average_log_prob"] = False
    if "loss_type" in params:
        kwargs["loss_type"] = loss_type
    elif loss_type != "sigmoid":
        pytest.skip(f"this liger-kernel version has only the sigmoid DPO loss, not {loss_type}")
    liger = chunked.LigerFusedLinearDPOLoss(**kwargs)
    theirs = loss_and_grads(lambda h_, w_, b_: (liger(w_, h_, labels, b_, ref_input=ref[0], ref_weight=ref[1],
                                                      ref_bias=ref[2])[0], None), h, w, b)
    ours = loss_and_grads(lambda h_, w_, b_: fused_linear_dpo_loss(h_, w_, labels, b_, ref_hidden=ref[0],
                                                                    ref_weight=ref[1], ref_bias=ref[2], beta=0.2,
                                                                    loss_type=loss_type), h, w, b)
    assert_close_to_ref(theirs[0], ours[0].double(), atol=1e-4 * (1 + abs(ours[0].item())), name=loss_type)
    for o, t in zip(ours[2], theirs[2]):
        assert_close_to_ref(t, o.double(), atol=1e-4 * (1 + o.abs().max().item()), name=f"{loss_type} grad")


@pytest.mark.parametrize("change, error, match", [
    (lambda h, lab, ref: dict(hidden=h[:3], labels=lab[:3]), ValueError,
     r"hidden.shape\[0\] .* must be even and > 0.*got 3"),
    (lambda h, lab, ref: dict(hidden=h.reshape(-1, D), labels=lab.reshape(-1),
                              cu_seqlens=torch.tensor([0, 7, 14, 28])), ValueError,
     "number of cu_seqlens segments .* must be even.*got 3"),
    (lambda h, lab, ref: dict(hidden=h.reshape(-1, D), labels=lab.reshape(-1), cu_seqlens=torch.tensor([0, 7, 14])),
     ValueError, "cu_seqlens must end at the number of tokens"),
    (lambda h, lab, ref: dict(hidden=h.reshape(-1, D), labels=lab.reshape(-1)), ValueError,
     r"hidden must be \[2B, T, D\]"),
    (lambda h, lab, ref: dict(cu_seqlens=torch.tensor([0, 7, 14, 21, 28])), ValueError,
     r"hidden must be \[N, D\] \(packed tokens\)"),
    (lambda h, lab, ref: dict(labels=lab[:, :-1]), ValueError, "labels must have shape hidden.shape"),
    (lambda h, lab, ref: dict(labels=lab.float()), TypeError, "labels must have dtype"),
    (lambda h, lab, ref: dict(labels=torch.where(torch.arange(4)[:, None] == 3, -100, lab)), ValueError,
     "every sequence at least one completion token.*sequence 3 \\(rejected of pair 1\\) has none"),
    (lambda h, lab, ref: dict(ref_chosen_logps=torch.zeros(3)), ValueError,
     r"ref_chosen_logps must have the batch size .*\[2\]"),
    (lambda h, lab, ref: dict(ref_hidden=ref[0], ref_weight=ref[1]), ValueError, "not both"),
    (lambda h, lab, ref: dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden=ref[0]), ValueError,
     "needs both ref_hidden and ref_weight"),
    (lambda h, lab, ref: dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden=ref[0][:, :-1],
                              ref_weight=ref[1]), ValueError, "ref_hidden must cover the same tokens"),
    (lambda h, lab, ref: dict(ref_chosen_logps=None, ref_rejected_logps=None), ValueError,
     "needs ref_chosen_logps and ref_rejected_logps"),
    (lambda h, lab, ref: dict(beta=0), ValueError, "beta must be > 0"),
    (lambda h, lab, ref: dict(loss_type="dpo"), ValueError, "'dpo' is unknown; valid loss types are sigmoid, hinge"),
    (lambda h, lab, ref: dict(weight=torch.randn(V, D + 1)), ValueError, r"weight must be \[V, D\]"),
])
def test_bad_input_raises_clear_errors(change, error, match):
    (h, w, b), labels, cu, ref = make_batch("padded", torch.float32)
    args = dict(hidden=h, weight=w, labels=labels, bias=b, ref_chosen_logps=torch.zeros(B),
                ref_rejected_logps=torch.zeros(B))
    args.update(change(h, labels, ref))
    with pytest.raises(error, match=match):
        fused_linear_dpo_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), args.pop("bias"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_on_cuda_equals_naive_path(layout, dtype):
    (h, w, b), labels, cu, ref = make_batch(layout, dtype)
    cuda = lambda t: None if t is None else t.cuda()
    ref_cuda = tuple(cuda(t) for t in ref)
    ours = loss_and_grads(lambda h_, w_, b_: fused_linear_dpo_loss(
        h_, w_, cuda(labels), b_, cu_seqlens=cuda(cu), ref_hidden=ref_cuda[0], ref_weight=ref_cuda[1],
        ref_bias=ref_cuda[2], **LOSS), cuda(h), cuda(w), cuda(b))
    ref64 = loss_and_grads(lambda h_, w_, b_: naive_loss(h_, w_, b_, labels, cu, tuple(t.double() for t in ref), LOSS),
                           h.double(), w.double(), b.double())
    ref_lowp = loss_and_grads(lambda h_, w_, b_: naive_loss(h_, w_, b_, labels, cu, ref, LOSS), h, w, b)
    assert_close_to_ref(ours[0], ref64[0], ref_lowp[0], atol=1e-5 * (1 + ref64[0].abs().item()), name="loss")
    for name, o, r, rl in zip(("grad hidden", "grad weight", "grad bias"), ours[2], ref64[2], ref_lowp[2]):
        assert_close_to_ref(o, r, rl, atol=1e-6 * (1 + r.abs().max().item()), name=name)


def test_logit_processing_and_impl_pass_through(monkeypatch):
    (h, w, b), labels, cu, ref = make_batch("packed", torch.float64)
    opts = dict(temperature=0.7, softcap=5.0, logit_scale=1.3)

    def processed(hidden, weight, bias):  # z = softcap * tanh(scale * (hW^T + b) / softcap) / temperature
        return opts["softcap"] * torch.tanh(opts["logit_scale"] * (hidden @ weight.T + bias) / opts["softcap"]) \
            / opts["temperature"]

    # The naive path on processed logits: an identity "LM head" over the processed logits.
    eye = torch.eye(V, dtype=torch.float64)
    sums, n = naive_sequence_logps(processed(h, w, b), eye, None, labels, cu)
    ref_sums, _ = naive_sequence_logps(processed(*ref), eye, None, labels, cu)
    expected, _ = dpo_loss(sums[:B], sums[B:], ref_sums[:B], ref_sums[B:], chosen_lengths=n[:B],
                           rejected_lengths=n[B:], **LOSS)
    seen = []
    import fastalign.losses.sequence as sequence  # the per-sequence sums the fused loss is built on

    real = sequence.linear_logprobs
    monkeypatch.setattr(sequence, "linear_logprobs", lambda *a, **k: seen.append(k["impl"]) or real(*a, **k))
    loss, _ = fused_linear_dpo_loss(h, w, labels, b, cu_seqlens=cu, ref_hidden=ref[0], ref_weight=ref[1],
                                    ref_bias=ref[2], impl="torch", **opts, **LOSS)
    assert_close_to_ref(loss, expected, atol=1e-12)
    assert seen == ["torch", "torch"]


@settings(max_examples=12, deadline=None)
@given(pairs=st.integers(1, 3), T=st.integers(1, 6), packed=st.booleans(), seed=st.integers(0, 2**31 - 1),
       loss_type=st.sampled_from(["sigmoid", "ipo", "aot", "bco_pair", "simpo"]))
def test_property_fused_equals_naive_over_shapes(pairs, T, packed, seed, loss_type):
    g = torch.Generator().manual_seed(seed)
    S, Dh, Vh = 2 * pairs, 5, 11
    lengths = torch.randint(1, T + 1, (S,), generator=g) if packed else torch.full((S,), T)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    labels = torch.randint(0, Vh, (int(cu[-1]),), generator=g)
    for a, n in zip(cu[:-1].tolist(), lengths.tolist()):  # a prompt of up to n-1 tokens: >= 1 completion token
        labels[a:a + int(torch.randint(0, n, (), generator=g))] = -100
    hidden = torch.randn(int(cu[-1]), Dh, generator=g, dtype=torch.float64)
    weight, ref_weight = (torch.randn(Vh, Dh, generator=g, dtype=torch.float64) for _ in range(2))
    if not packed:
        hidden, labels = hidden.reshape(S, T, Dh), labels.reshape(S, T)
    cu_arg = cu if packed else None
    opts = dict(beta=0.5, loss_type=loss_type)
    ref = {} if loss_type == "simpo" else dict(ref_hidden=hidden, ref_weight=ref_weight)
    loss, _ = fused_linear_dpo_loss(hidden, weight, labels, cu_seqlens=cu_arg, **ref, **opts)
    sums, n = naive_sequence_logps(hidden.reshape(-1, Dh), weight, None, labels.reshape(-1), cu)
    B_ = pairs
    if ref:
        ref_sums, _ = naive_sequence_logps(hidden.reshape(-1, Dh), ref_weight, None, labels.reshape(-1), cu)
        rc, rr = ref_sums[:B_], ref_sums[B_:]
    else:
        rc = rr = None
    expected, _ = dpo_loss(sums[:B_], sums[B_:], rc, rr, chosen_lengths=n[:B_], rejected_lengths=n[B_:], **opts)
    assert_close_to_ref(loss, expected, atol=1e-12)
