"""linear_logprobs with logits of zero probability: -inf logits (a -inf bias masking vocabulary entries, as users do
for banned tokens) and logits so far below the row's maximum that their difference overflows to -inf.

``p log p`` is 0 at ``p = 0``, so such entries must contribute nothing to the entropy or to any gradient: the
result equals that of the same op on the vocabulary without them, and their weight and bias rows get exactly zero
gradient. The comparison is against the float64 reference on the reduced vocabulary (finite logits only), so it
does not rely on the reference's own handling of -inf.
"""

import math

import pytest
import torch

from fastalign import linear_logprobs
from fastalign.ops.logprobs import api, naive
from fastalign.testing import assert_close_to_ref

IMPLS = list(api.IMPLS)
N, D = 9, 24
BIG = 3e38  # float32 and bfloat16 hold it; BIG - (-BIG) overflows to -inf in both

# name -> (V, builder of the bias [V] in float64 given V, indices whose probability is exactly 0)
MASKS = {
    # scattered -inf entries, about a third of the vocabulary
    "scattered": (100, lambda v: torch.arange(v)[torch.randperm(v)[: v // 3]]),
    # a contiguous run covering whole V-blocks of the triton impl (32 under the interpreter): a block whose every
    # logit is -inf must not poison the online logsumexp
    "leading_run": (100, lambda v: torch.arange(0, 70)),
    # whole 512-row tiles of the cpp impl masked (V = 1100 is three tiles)
    "whole_tiles": (1100, lambda v: torch.arange(0, 1030)),
    # every entry but one: entropy 0, logprob 0
    "all_but_one": (100, lambda v: torch.cat([torch.arange(0, 57), torch.arange(58, v)])),
}


def _inputs(v, dtype, masked, *, value=-math.inf, dominant=None):
    h = torch.randn(N, D).to(dtype)
    w = (torch.randn(v, D) * (3.0 / math.sqrt(D))).to(dtype)
    b = torch.randn(v, dtype=torch.float64)
    b[masked] = value
    if dominant is not None:
        b[dominant] = BIG
    keep = torch.ones(v, dtype=torch.bool)
    keep[masked] = False
    kept = keep.nonzero().squeeze(1)
    # targets among the kept entries (a masked target's logprob is -inf, correctly, and is tested separately)
    t = kept[torch.randint(0, kept.numel(), (N,))]
    t[4] = -100
    if dominant is not None:
        t[:] = dominant
        t[4] = -100
    return h, w, b.to(dtype), t, keep


def _run(impl, h, w, b, t, upstream, **opts):
    """Outputs and gradients of ``impl`` (or of the reference ``naive.linear_logprobs`` for impl=None)."""
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    if impl is None:
        lp, ent = naive.linear_logprobs(leaves[0], leaves[1], t, leaves[2], return_entropy=True, **opts)
    else:
        lp, ent = linear_logprobs(leaves[0], leaves[1], t, leaves[2], return_entropy=True, impl=impl, **opts)
    loss = (lp.double() * upstream[0]).sum() + (ent.double() * upstream[1]).sum()
    return (lp, ent), torch.autograd.grad(loss, leaves)


def _check_equals_reduced_vocabulary(impl, h, w, b, t, keep, **opts):
    """Outputs and gradients against the float64 reference on the kept vocabulary (tolerance rule of DESIGN.md);
    the masked weight and bias rows get exactly zero gradient."""
    upstream = [torch.randn(N, dtype=torch.float64) for _ in range(2)]
    outs, grads = _run(impl, h, w, b, t, upstream, **opts)
    for x in list(outs) + list(grads):
        assert torch.isfinite(x).all(), f"{impl}: non-finite output or gradient"
    remap = torch.cumsum(keep.long(), 0) - 1
    t_kept = torch.where(t == -100, t, remap[t.clamp(min=0)])
    want = {}
    for name, dtype in (("64", torch.float64), ("lo", h.dtype)):
        want[name] = _run(None, h.to(dtype), w[keep].to(dtype), b[keep].to(dtype), t_kept, upstream, **opts)
    for i, what in enumerate(["logprobs", "entropy"]):
        assert_close_to_ref(outs[i], want["64"][0][i], want["lo"][0][i], atol=1e-5, name=f"{impl} {what}")
    g64, glo = want["64"][1], want["lo"][1]
    atol = lambda g: 1e-5 * (1 + float(g.abs().max()))
    assert_close_to_ref(grads[0], g64[0], glo[0], atol=atol(g64[0]), name=f"{impl} grad_hidden")
    assert_close_to_ref(grads[1][keep], g64[1], glo[1], atol=atol(g64[1]), name=f"{impl} grad_weight")
    assert_close_to_ref(grads[2][keep], g64[2], glo[2], atol=atol(g64[2]), name=f"{impl} grad_bias")
    assert (grads[1][~keep] == 0).all() and (grads[2][~keep] == 0).all()
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MASKS, ids=MASKS.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_bias_entries_contribute_nothing(impl, case, dtype, impl_on):
    impl_on(impl, "cpu")
    v, masked = MASKS[case]
    h, w, b, t, keep = _inputs(v, dtype, masked(v))
    outs = _check_equals_reduced_vocabulary(impl, h, w, b, t, keep, temperature=0.8, logit_scale=1.3)
    if case == "all_but_one":
        valid = t != -100
        assert (outs[0][valid] == 0).all() and (outs[1] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_logit_differences_that_overflow_to_minus_inf(impl, impl_on):
    """One logit near +3e38 and others near -3e38: ``z - max`` overflows to -inf in float32 though every logit is
    finite; softmax is one-hot, so entropy, logprob of the dominant target and every gradient are 0."""
    impl_on(impl, "cpu")
    masked = torch.arange(10, 40)
    h, w, b, t, keep = _inputs(100, torch.float32, masked, value=-BIG, dominant=77)
    keep[77] = True
    outs = _check_equals_reduced_vocabulary(impl, h, w, b, t, keep)
    assert (outs[1] == 0).all() and (outs[0] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_target_gives_minus_inf_logprob_and_finite_gradients(impl, impl_on):
    impl_on(impl, "cpu")
    h, w, b, t, keep = _inputs(100, torch.float32, torch.arange(0, 30))
    t[2] = 5  # a banned token as target: probability 0
    upstream = [torch.randn(N, dtype=torch.float64) for _ in range(2)]
    (lp, ent), grads = _run(impl, h, w, b, t, upstream)
    assert lp[2] == -math.inf and torch.isfinite(lp[torch.arange(N) != 2]).all() and torch.isfinite(ent).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_bias_with_softcap_is_finite_and_matches_reference(impl, impl_on):
    """With a softcap, -inf becomes -softcap: a finite logit of nonzero probability, compared with the reference."""
    impl_on(impl, "cpu")
    h, w, b, t, _ = _inputs(100, torch.float32, torch.arange(0, 50))
    upstream = [torch.randn(N, dtype=torch.float64) for _ in range(2)]
    outs, grads = _run(impl, h, w, b, t, upstream, softcap=4.0)
    ref, ref_grads = _run(None, h.double(), w.double(), b.double(), t, upstream, softcap=4.0)
    for got, want, what in zip(list(outs) + list(grads), list(ref) + list(ref_grads),
                               ["logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias"]):
        assert_close_to_ref(got, want, atol=1e-4 * (1 + float(want.abs().max())), name=f"{impl} {what}")


def test_reference_entropy_is_finite_with_minus_inf_logits():
    """The spec itself (``naive.linear_logprobs``, autograd through log_softmax) defines ``p log p = 0`` at p = 0."""
    h, w, b, t, keep = _inputs(100, torch.float64, torch.arange(0, 60))
    leaves = [x.requires_grad_() for x in (h, w, b)]
    lp, ent = naive.linear_logprobs(*leaves[:2], t, leaves[2], return_entropy=True)
    lp_k, ent_k = naive.linear_logprobs(h, w[keep], torch.where(t == -100, t, t - 60), b[keep], return_entropy=True)
    torch.testing.assert_close(ent, ent_k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp, lp_k, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(ent.sum() + lp.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[1][:60] == 0).all() and (grads[2][:60] == 0).all()
