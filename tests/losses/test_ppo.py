import pytest
import torch

from fastalign.losses.ppo import AGG_MODES, aggregate, fused_linear_ppo_loss, ppo_policy_loss, ppo_value_loss
from fastalign.ops.logprobs import api as logprobs_api
from fastalign.testing import assert_close_to_ref


def _agg_ref(x, m, mode):
    """Loops over rows: the aggregation modes spelled out, float64."""
    x, m = x.double(), m.bool()
    if mode == "token-mean":
        return x[m].sum() / m.sum()
    per_seq = []
    for row, mrow in zip(x, m):
        if mrow.any():
            per_seq.append(row[mrow].sum() if mode == "seq-mean-token-sum" else row[mrow].mean())
    return torch.stack(per_seq).mean()


def _policy_ref(lp, old, adv, m, clip_low, clip_high, dual_clip, agg, entropy=None, entropy_coef=0.0,
                ref_lp=None, kl_coef=0.0):
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    loss = _agg_ref(pg, m, agg)
    if entropy is not None:
        loss = loss - entropy_coef * _agg_ref(entropy, m, agg)
    if ref_lp is not None:
        loss = loss + kl_coef * _agg_ref(torch.exp(ref_lp - lp) - 1 - (ref_lp - lp), m, agg)
    return loss


def _inputs(B=4, T=9, dtype=torch.float32):
    old = -torch.rand(B, T, dtype=torch.float64) * 3
    lp = (old + torch.randn(B, T, dtype=torch.float64) * 0.3).to(dtype)  # ratios on both sides of the clips
    adv = torch.randn(B, T, dtype=torch.float64).to(dtype)
    m = torch.rand(B, T) > 0.3
    m[0] = False  # an empty sequence
    return lp, old.to(dtype), adv, m


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clips", [(0.2, None, None), (0.2, 0.28, None), (0.1, 0.3, 3.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_formula_values_and_grads(agg, clips, dtype):
    clip_low, clip_high, dual_clip = clips
    lp, old, adv, m = _inputs(dtype=dtype)
    ent, ref_lp = torch.rand(4, 9).to(dtype), (-torch.rand(4, 9) * 3).to(dtype)
    lp.requires_grad_()
    ent.requires_grad_()
    loss, metrics = ppo_policy_loss(lp, old, adv, m, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                                    agg=agg, entropy=ent, entropy_coef=0.01, ref_logprobs=ref_lp, kl_coef=0.05)
    loss.backward()
    ch = clip_low if clip_high is None else clip_high
    d = lambda t: t.detach().double().requires_grad_()
    lp64, ent64 = d(lp), d(ent)
    ref64 = _policy_ref(lp64, old.double(), adv.double(), m, clip_low, ch, dual_clip, agg, ent64, 0.01,
                        ref_lp.double(), 0.05)
    ref64.backward()
    # The low-precision reference: the same formula from leaves of the input dtype (so its gradients are
    # rounded to that dtype too), computed in float32.
    lp_lo, ent_lo = lp.detach().clone().requires_grad_(), ent.detach().clone().requires_grad_()
    f = lambda t: t.float()
    ref32 = _policy_ref(f(lp_lo), f(old), f(adv), m, clip_low, ch, dual_clip, agg, f(ent_lo), 0.01, f(ref_lp), 0.05)
    ref32.backward()
    assert_close_to_ref(loss, ref64, ref32, atol=1e-6, name=f"policy loss {agg}")
    assert_close_to_ref(lp.grad, lp64.grad, lp_lo.grad, atol=1e-6, name="d logprobs")
    assert_close_to_ref(ent.grad, ent64.grad, ent_lo.grad, atol=1e-7, name="d entropy")
    assert (lp.grad[~m] == 0).all()


def test_policy_metrics_are_trl_named_and_correct():
    lp, old, adv, m = _inputs(dtype=torch.float64)
    loss, metrics = ppo_policy_loss(lp, old, adv, m, clip_low=0.2, dual_clip=2.0, entropy=torch.ones_like(lp))
    lr = (lp - old)[m]
    ratio = lr.exp()
    a = adv[m]
    pg1, pg2 = -a * ratio, -a * ratio.clamp(0.8, 1.2)
    expected = {
        "loss/policy_avg": loss,
        "policy/approxkl_avg": 0.5 * (lr**2).mean(),
        "policy/clipfrac_avg": (pg2 > pg1).double().mean(),
        "val/ratio": ratio.mean(),
        "val/ratio_var": ratio.var(unbiased=False),
        "policy/entropy_avg": torch.tensor(1.0, dtype=torch.float64),
        "policy/dual_clipfrac_avg": ((a < 0) & (torch.maximum(pg1, pg2) > -a * 2.0)).double().mean(),
    }
    assert set(metrics) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(metrics[k], v.detach().double(), msg=k)
        assert not metrics[k].requires_grad
    assert 0 < float(metrics["policy/clipfrac_avg"]) < 1  # the inputs do exercise the clip


@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_value_loss_matches_formula(clip, agg):
    v = torch.randn(4, 9, requires_grad=True)
    old, ret = v.detach() + torch.randn(4, 9) * 0.3, torch.randn(4, 9)
    m = torch.rand(4, 9) > 0.3
    loss, metrics = ppo_value_loss(v, old, ret, m, clip=clip, agg=agg)
    loss.backward()
    v64 = v.detach().double().requires_grad_()
    vf1 = (v64 - ret.double()) ** 2
    vf = vf1 if clip is None else torch.maximum(vf1, (old.double() + (v64 - old.double()).clamp(-clip, clip) -
                                                      ret.double()) ** 2)
    ref = 0.5 * _agg_ref(vf, m, agg)
    ref.backward()
    assert_close_to_ref(loss, ref, atol=1e-6, name="value loss")
    assert_close_to_ref(v.grad, v64.grad, atol=1e-6, name="d values")
    assert set(metrics) == {"loss/value_avg", "val/clipfrac_avg", "val/vpred", "val/error"}
    torch.testing.assert_close(metrics["val/error"], vf1[m].mean().float().detach())
    if clip is not None:
        assert 0 < float(metrics["val/clipfrac_avg"]) < 1


@pytest.mark.parametrize("agg", AGG_MODES)
def test_packed_layout_equals_padded(agg):
    lp, old, adv, m = _inputs(dtype=torch.float64)
    lengths = m.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    padded, _ = ppo_policy_loss(lp, old, adv, m, agg=agg, dual_clip=3.0)
    packed, _ = ppo_policy_loss(lp[m], old[m], adv[m], cu_seqlens=cu, agg=agg, dual_clip=3.0)
    torch.testing.assert_close(packed, padded)
    x = torch.randn(int(lengths.sum()), dtype=torch.float64)
    xp = torch.zeros(m.shape, dtype=torch.float64).masked_scatter(m, x)
    torch.testing.assert_close(aggregate(x, cu_seqlens=cu, mode=agg), aggregate(xp, m, mode=agg))


def test_masked_nan_is_ignored():
    lp, old, adv, m = _inputs()
    lp = torch.where(m, lp, float("nan"))
    loss, _ = ppo_policy_loss(lp, old, adv, m)
    assert torch.isfinite(loss)


def _dirty(x, m, bad):
    return torch.where(m, x, bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_masked_nonfinite_inputs_give_no_value_and_no_gradient(agg, layout, bad):
    """NaN/inf at masked positions of any per-token input (logprobs, old logprobs, advantages, entropy, reference
    logprobs; values, old values, returns) must reach neither the loss, the metrics nor any gradient."""
    lp, old, adv, m = _inputs(dtype=torch.float64)
    ent, ref = torch.rand_like(lp), lp - 0.1 * torch.randn_like(lp)
    cu = None
    if layout == "packed":  # packed tokens with a mask of their own
        cu = torch.tensor([0, 9, 18, 27, 36])
        lp, old, adv, ent, ref, m = (x.reshape(-1) for x in (lp, old, adv, ent, ref, m))
    opts = dict(cu_seqlens=cu, agg=agg, dual_clip=3.0, entropy_coef=0.01, kl_coef=0.1)
    v = torch.randn_like(lp)
    results = []
    for value in (None, bad):
        leaves = [x.clone().requires_grad_() for x in (lp if value is None else _dirty(lp, m, value), ent)]
        args = [x if value is None else _dirty(x, m, value) for x in (old, adv, ref)]
        loss, metrics = ppo_policy_loss(leaves[0], args[0], args[1], m, entropy=leaves[1], ref_logprobs=args[2],
                                        **opts)
        grads = torch.autograd.grad(loss, leaves)
        vleaf = (v if value is None else _dirty(v, m, value)).clone().requires_grad_()
        vargs = [x if value is None else _dirty(x, m, value) for x in (v + 0.1, adv)]
        vloss, vmetrics = ppo_value_loss(vleaf, vargs[0], vargs[1], m, cu_seqlens=cu, agg=agg)
        grads += torch.autograd.grad(vloss, vleaf)
        results.append((loss, vloss, {**metrics, **vmetrics}, grads))
    (loss, vloss, metrics, grads), (loss_d, vloss_d, metrics_d, grads_d) = results
    assert torch.equal(loss_d, loss) and torch.equal(vloss_d, vloss)
    for k in metrics:
        assert torch.equal(metrics_d[k], metrics[k]), k
    for g, g_d in zip(grads, grads_d):
        assert torch.isfinite(g_d).all() and torch.equal(g_d, g) and (g_d[~m] == 0).all()


@pytest.mark.parametrize("impl", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_loss_equals_naive_loss_on_materialized_logits(impl, layout, impl_on):
    if impl not in logprobs_api.IMPLS:
        pytest.skip(f"linear_logprobs has no {impl!r} impl on this branch")
    impl_on(impl, "cpu")
    B, T, D, V = 2, 5, 16, 37
    h = torch.randn(B, T, D, requires_grad=True)
    W = (torch.randn(V, D) * 0.3).requires_grad_()
    y = torch.randint(0, V, (B, T))
    y[1, 3] = -100
    old, adv, ref_lp = -torch.rand(B, T) * 4, torch.randn(B, T), -torch.rand(B, T) * 4
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 4] = False
    opts = dict(temperature=0.7, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean",
                entropy_coef=0.01, ref_logprobs=ref_lp, kl_coef=0.05)
    if layout == "padded":
        loss, metrics = fused_linear_ppo_loss(h, W, y, old, adv, m, impl=impl, **opts)
    else:
        cu = torch.tensor([0, T, 2 * T], dtype=torch.int32)
        packed = {k: (v.reshape(-1) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
        loss, metrics = fused_linear_ppo_loss(h.reshape(-1, D), W, y.reshape(-1), old.reshape(-1), adv.reshape(-1),
                                              m.reshape(-1), cu_seqlens=cu, impl=impl, **packed)
    loss.backward()

    def naive(dtype):
        """The loss on materialized logits, and its gradients, with inputs and math in ``dtype``."""
        h_, W_ = h.detach().to(dtype).requires_grad_(), W.detach().to(dtype).requires_grad_()
        logp = torch.log_softmax((h_ @ W_.T) / 0.7, dim=-1)
        valid = m & (y != -100)
        lp_ = torch.where(valid, logp.gather(-1, y.clamp(min=0)[..., None])[..., 0], 0.0)
        ent_ = -(logp.exp() * logp).sum(-1)
        out = _policy_ref(lp_, old.to(dtype), adv.to(dtype), valid, 0.2, 0.28, 3.0, "seq-mean-token-mean", ent_,
                          0.01, ref_lp.to(dtype), 0.05)
        out.backward()
        return out, h_.grad, W_.grad

    ref, dh, dW = naive(torch.float64)
    ref32, dh32, dW32 = naive(torch.float32)
    assert_close_to_ref(loss, ref, ref32, atol=1e-6, name="fused ppo loss")
    assert_close_to_ref(h.grad, dh, dh32, atol=1e-6, name="d hidden")
    assert_close_to_ref(W.grad, dW, dW32, atol=1e-6, name="d weight")
    assert float(metrics["policy/entropy_avg"]) > 0


@pytest.mark.parametrize("call, err, match", [
    (lambda a: ppo_policy_loss(*a, agg="sum"), ValueError, "agg must be one of"),
    (lambda a: ppo_policy_loss(*a, clip_low=1.0), ValueError, "clip_low must be in \\[0, 1\\); got 1.0"),
    (lambda a: ppo_policy_loss(*a, clip_high=-0.1), ValueError, "clip_high must be a finite number >= 0"),
    (lambda a: ppo_policy_loss(*a, dual_clip=1.0), ValueError, "dual_clip must be None or a finite number > 1"),
    (lambda a: ppo_policy_loss(a[0], a[1][:, :3], a[2], a[3]), ValueError,
     "old_logprobs must have the shape of logprobs \\(4, 9\\); got \\(4, 3\\)"),
    (lambda a: ppo_policy_loss(*a[:3], a[3][:2]), ValueError, "mask must have the shape"),
    (lambda a: ppo_policy_loss(*a[:3], a[3].float() * 2), ValueError, "mask must hold only 0 and 1"),
    (lambda a: ppo_policy_loss(*a[:3], cu_seqlens=torch.tensor([0, 36])), ValueError, "must be 1-D packed tokens"),
    (lambda a: ppo_policy_loss(*(x.reshape(-1) for x in a[:3]), cu_seqlens=torch.tensor([0, 30])), ValueError,
     "must end at the number of tokens"),
    (lambda a: ppo_value_loss(*a[:3], clip=0.0), ValueError, "clip must be None \\(plain MSE\\)"),
    (lambda a: aggregate(a[0], a[3], mode="mean"), ValueError, "agg mode must be one of"),
])
def test_bad_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call(_inputs())
