import pytest
import torch

from fastalign import rl
from fastalign.ops.gae import naive
from fastalign.testing import assert_close_to_ref


def _groups_ref(scores, ids):
    """Per-response (mean, unbiased std, count) of its group, by a plain loop over groups, float64."""
    s = scores.double()
    mean, std, count = torch.empty_like(s), torch.empty_like(s), torch.empty_like(s)
    for g in ids.unique():
        sel = ids == g
        mean[sel], count[sel] = s[sel].mean(), sel.sum()
        std[sel] = s[sel].std() if sel.sum() > 1 else 1.0
    return mean, std, count


def _layouts(B=12, G=3):
    scores = torch.randn(B, dtype=torch.float64)
    yield dict(group_size=G), scores, torch.arange(B) // G
    ids = torch.randint(0, 5, (B,))
    ids[0] = 17  # a group of one
    ids[1:] = torch.where(ids[1:] == 17, 0, ids[1:])
    yield dict(group_ids=ids), scores, ids


@pytest.mark.parametrize("estimator", ["grpo", "grpo_nostd", "dr_grpo", "rloo"])
def test_group_estimators_match_formulas_with_grads(estimator):
    for groups, scores, ids in _layouts():
        s = scores.clone().requires_grad_()
        s_ref = scores.clone().requires_grad_()
        mean, std, count = _groups_ref(s_ref, ids)
        if estimator == "grpo":
            out, ref = rl.grpo(s, **groups), (s_ref - mean) / (std + 1e-6)
        elif estimator in ("grpo_nostd", "dr_grpo"):
            fn = (lambda x, **k: rl.grpo(x, scale_by_std=False, **k)) if estimator == "grpo_nostd" else rl.dr_grpo
            out, ref = fn(s, **groups), s_ref - mean
        else:
            others = (mean * count - s_ref) / (count - 1).clamp(min=1)
            out, ref = rl.rloo(s, **groups), torch.where(count > 1, s_ref - others, 0.0)
        assert_close_to_ref(out, ref, atol=1e-10, name=estimator)
        g = torch.randn_like(scores)
        (out * g).sum().backward()
        (ref * g).sum().backward()
        assert_close_to_ref(s.grad, s_ref.grad, atol=1e-10, name=f"{estimator} grad")


def test_grpo_matches_trl_view_formula_and_broadcasts_over_mask():
    s = torch.randn(8)
    G = 4
    mean = s.view(-1, G).mean(1).repeat_interleave(G)
    std = s.view(-1, G).std(1).repeat_interleave(G)
    torch.testing.assert_close(rl.grpo(s, group_size=G), (s - mean) / (std + 1e-6))
    m = torch.rand(8, 5) > 0.4
    out = rl.grpo(s, group_size=G, mask=m)
    torch.testing.assert_close(out, torch.where(m, ((s - mean) / (std + 1e-6))[:, None], 0.0))


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(), ValueError, "exactly one of group_size"),
    (dict(group_size=2, group_ids=torch.zeros(6, dtype=torch.long)), ValueError, "exactly one of group_size"),
    (dict(group_size=4), ValueError, "multiple of group_size \\(4\\)"),
    (dict(group_size=0), ValueError, "group_size must be an int >= 1; got 0"),
    (dict(group_ids=torch.zeros(5, dtype=torch.long)), ValueError, "group_ids must be \\[B\\] with B = 6"),
    (dict(group_ids=torch.zeros(6)), TypeError, "group_ids must have dtype"),
])
def test_group_arguments_are_checked(kwargs, err, match):
    with pytest.raises(err, match=match):
        rl.grpo(torch.randn(6), **kwargs)


def test_reinforce_pp_without_and_with_baseline():
    B, T = 6, 7
    r, m = torch.randn(B, T), torch.rand(B, T) > 0.3
    m[:, 0] = True
    got = rl.reinforce_pp(r, m, gamma=0.9)
    returns = naive.discounted_returns(r.double(), m, None, 0.9)
    v = returns[m]
    ref = torch.where(m, (returns - v.mean()) / torch.sqrt(v.var() + 1e-8), 0.0)
    assert_close_to_ref(got, ref, atol=1e-5, name="reinforce++")
    got = rl.reinforce_pp(r, m, group_size=3)
    totals = torch.where(m, r.double(), 0.0).sum(1)
    centered = totals - totals.view(-1, 3).mean(1).repeat_interleave(3)
    x = torch.where(m, centered[:, None], 0.0)
    v = x[m]
    ref = torch.where(m, (x - v.mean()) / torch.sqrt(v.var() + 1e-8), 0.0)
    assert_close_to_ref(got, ref, atol=1e-5, name="reinforce++ baseline")


def test_rl_gae_whitens_the_op_output():
    r, v, m = torch.randn(3, 10), torch.randn(3, 10), torch.rand(3, 10) > 0.2
    adv, ret = rl.gae(r, v, mask=m, gamma=0.99, lam=0.9, whiten_advantages=True)
    adv64, ret64 = naive.gae(r.double(), v.double(), m, None, 0.99, 0.9)
    vals = adv64[m]
    assert_close_to_ref(adv, torch.where(m, (adv64 - vals.mean()) / (vals.var() + 1e-8).sqrt(), 0.0), atol=1e-5)
    assert_close_to_ref(ret, ret64, atol=1e-5)


def test_identical_scores_and_singletons_give_zero_advantage_and_finite_grads():
    s = torch.tensor([1.0, 1.0, 1.0, 2.0, 5.0, 3.0], requires_grad=True)
    ids = torch.tensor([0, 0, 0, 1, 2, 2])
    for fn in (rl.grpo, rl.rloo, rl.dr_grpo):
        out = fn(s, group_ids=ids)
        assert (out[:4] == 0).all()
        out.sum().backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None
