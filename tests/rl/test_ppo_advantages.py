import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from fastalign.rl import AdaptiveKLController, FixedKLController, ema_update_, ppo_advantages
from fastalign.testing import assert_close_to_ref

LENGTHS = [1, 7, 3, 1, 12, 5]


def _inputs(lengths, dtype=torch.float32):
    N = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0)
    scores = torch.randn(len(lengths), dtype=dtype) * 2
    logprobs = (-torch.rand(N) * 3).to(dtype)
    ref_logprobs = (logprobs.double() + torch.randn(N, dtype=torch.float64) * 0.5).to(dtype)
    values = torch.randn(N, dtype=dtype)
    return scores, logprobs, ref_logprobs, values, cu


def _reference(scores, logprobs, ref_logprobs, values, cu, kl_coef, kind, gamma, lam, whiten, dtype):
    """The per-rollout PPO computation written plainly: a reverse loop per sequence, whitening by hand."""
    s, lp, rf, v = (t.to(dtype) for t in (scores, logprobs, ref_logprobs, values))
    log_ratio = lp - rf
    kl = log_ratio if kind == "k1" else torch.exp(-log_ratio) - 1 + log_ratio
    rewards = -kl_coef * kl
    adv = torch.zeros_like(rewards)
    kl_sums = []
    for i in range(len(s)):
        a, b = int(cu[i]), int(cu[i + 1])
        rewards[b - 1] += s[i]
        kl_sums.append(float(kl[a:b].sum()))
        last_adv, next_value = 0.0, 0.0
        for t in reversed(range(a, b)):
            delta = rewards[t] + gamma * next_value - v[t]
            last_adv = delta + gamma * lam * last_adv
            adv[t], next_value = last_adv, v[t]
    returns = adv + v
    if whiten:
        mean = adv.mean()
        var = ((adv - mean) ** 2).sum() / (adv.numel() - 1)
        adv = (adv - mean) / torch.sqrt(var + 1e-8)
    mean_kl = sum(kl_sums) / len(kl_sums)
    stats = {"objective/kl": mean_kl, "objective/non_score_reward": -kl_coef * mean_kl,
             "objective/scores": float(s.mean()), "objective/rlhf_reward": float(s.mean()) - kl_coef * mean_kl}
    return adv, returns, rewards, stats


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("kind", ["k1", "k3"])
@pytest.mark.parametrize("whiten", [True, False])
def test_matches_plain_reference(impl, kind, whiten, impl_on):
    impl_on(impl, "cpu")
    inputs = _inputs(LENGTHS)
    opts = dict(kl_coef=0.07, gamma=0.97, lam=0.9)
    adv, ret, rew, stats = ppo_advantages(*inputs, kl_estimator=kind, whiten_advantages=whiten, impl=impl, **opts)
    ref64 = _reference(*inputs, kind=kind, whiten=whiten, dtype=torch.float64, **opts)
    ref32 = _reference(*inputs, kind=kind, whiten=whiten, dtype=torch.float32, **opts)
    for name, out, r64, r32 in zip(("advantages", "returns", "rewards"), (adv, ret, rew), ref64, ref32):
        assert out.dtype == torch.float32 and out.shape == (sum(LENGTHS),)
        assert_close_to_ref(out, r64, r32, atol=1e-6, name=name)
    if whiten:  # whitened: zero mean, unit (unbiased) variance over all tokens
        assert abs(float(adv.double().mean())) < 1e-6 and abs(float(adv.double().var()) - 1) < 1e-5
    else:  # returns are taken before whitening: advantages + values
        assert_close_to_ref(ret, adv.double() + inputs[3].double(), atol=1e-6, name="returns = adv + values")
    assert set(stats) == set(ref64[3]) | {"objective/kl_coef"} and stats["objective/kl_coef"] == 0.07
    for k, v in ref64[3].items():
        assert isinstance(stats[k], float)
        assert math.isclose(stats[k], v, rel_tol=1e-5, abs_tol=1e-6), (k, stats[k], v)


def test_float64_inputs_give_float64_stats_and_the_same_tensors():
    inputs = _inputs(LENGTHS, torch.float64)
    adv, ret, rew, stats = ppo_advantages(*inputs, kl_coef=0.2, kl_estimator="k3", impl="torch")
    ref = _reference(*inputs, kl_coef=0.2, kind="k3", gamma=1.0, lam=0.95, whiten=True, dtype=torch.float64)
    ref32 = _reference(*inputs, kl_coef=0.2, kind="k3", gamma=1.0, lam=0.95, whiten=True, dtype=torch.float32)
    assert_close_to_ref(adv, ref[0], ref32[0], atol=1e-6, name="advantages")
    for k, v in ref[3].items():  # the stats' arithmetic stays in float64
        assert math.isclose(stats[k], v, rel_tol=1e-12, abs_tol=1e-12), (k, stats[k], v)


def test_score_lands_on_the_last_token_and_empty_sequences_count_only_in_stats():
    lp = -torch.rand(4)
    scores = torch.tensor([0.5, 3.0, -2.0])
    cu = torch.tensor([0, 2, 2, 4])  # the middle sequence has no tokens
    _, _, rew, stats = ppo_advantages(scores, lp, lp, torch.randn(4), cu, kl_coef=0.5, whiten_advantages=False)
    assert rew.tolist() == [0.0, 0.5, 0.0, -2.0]  # zero KL: only the scores, on each sequence's last token
    assert math.isclose(stats["objective/scores"], 0.5, rel_tol=1e-6) and stats["objective/kl"] == 0.0


def test_bad_inputs_raise_naming_the_argument():
    scores, lp, ref, v, cu = _inputs([2, 3])
    ok = dict(kl_coef=0.1)
    cases = [
        ((scores[:1], lp, ref, v, cu), ok, "scores must hold one score per sequence .*S = .* = 2.*got shape \\(1,\\)"),
        ((scores, lp, ref[:4], v, cu), ok, "ref_logprobs must have the shape of logprobs \\(5,\\); got \\(4,\\)"),
        ((scores, lp, ref, v[None], cu), ok, "values must be 1-D; got shape \\(1, 5\\)"),
        ((scores, lp, ref, v, torch.tensor([0, 2, 4])), ok, "cu_seqlens must end at the number of tokens \\(5\\)"),
        ((scores, lp, ref, v, cu), dict(kl_coef=-0.1), "kl_coef must be finite and >= 0.0; got -0.1"),
        ((scores, lp, ref, v, cu), dict(kl_coef=float("nan")), "kl_coef must be finite"),
        ((scores, lp, ref, v, cu), dict(kl_coef=0.1, kl_estimator="k4"), "kl_estimator must be one of"),
        ((scores, lp, ref, v, cu), dict(kl_coef=0.1, lam=1.5), "lam must be in \\[0, 1\\]; got 1.5"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ppo_advantages(*args, **kw)
    with pytest.raises(TypeError, match="logprobs must have dtype"):
        ppo_advantages(scores, lp.long(), ref, v, cu, kl_coef=0.1)
    with pytest.raises(TypeError, match="whiten_advantages must be a bool"):
        ppo_advantages(scores, lp, ref, v, cu, kl_coef=0.1, whiten_advantages=1)


def _ppo_worker(rank, world, init, per_rank, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    adv, ret, _, stats = ppo_advantages(*per_rank[rank], kl_coef=0.1, kl_estimator="k3",
                                        process_group=dist.group.WORLD, impl="torch")
    torch.save({"adv": adv, "ret": ret, "stats": stats}, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_on_the_concatenation(tmp_path):
    per_rank = [_inputs([4, 1, 6]), _inputs([2, 9])]
    init = f"file://{tmp_path / 'rendezvous'}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ppo_worker, args=(2, init, per_rank, str(tmp_path / "res")), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"res.{r}") for r in range(2)]
    (s0, lp0, rf0, v0, cu0), (s1, lp1, rf1, v1, cu1) = per_rank
    cat = (torch.cat([s0, s1]), torch.cat([lp0, lp1]), torch.cat([rf0, rf1]), torch.cat([v0, v1]),
           torch.cat([cu0, cu1[1:] + cu0[-1]]))
    adv, ret, _, stats = ppo_advantages(*cat, kl_coef=0.1, kl_estimator="k3", impl="torch")
    assert_close_to_ref(torch.cat([g["adv"] for g in got]), adv, atol=1e-6, name="distributed advantages")
    assert_close_to_ref(torch.cat([g["ret"] for g in got]), ret, atol=1e-6, name="distributed returns")
    for g in got:
        for k, v in stats.items():
            assert math.isclose(g["stats"][k], v, rel_tol=1e-6), (k, g["stats"][k], v)
    # A rank alone is not the global result (the test can fail).
    assert not torch.allclose(ppo_advantages(*per_rank[0], kl_coef=0.1, kl_estimator="k3")[0], adv[:11])


def test_adaptive_controller_follows_its_formula_and_resumes():
    ctl = AdaptiveKLController(0.05, target=4.0, horizon=2000)
    expected = 0.05
    kls = [6.5, 4.4, 1.0, 3.7, 9.0, 0.2]  # above, slightly above, far below (clipped), below, clipped, clipped
    for i, kl in enumerate(kls[:3]):
        n = 64 * (i + 1)
        expected *= 1 + min(max(kl / 4.0 - 1, -0.2), 0.2) * n / 2000
        assert math.isclose(ctl.update(kl, n), expected, rel_tol=1e-15)
    state = json.loads(json.dumps(ctl.state_dict()))  # plain floats
    resumed = AdaptiveKLController(0.5, target=4.0, horizon=2000)
    resumed.load_state_dict(state)
    for kl in kls[3:]:
        expected *= 1 + min(max(kl / 4.0 - 1, -0.2), 0.2) * 256 / 2000
        assert math.isclose(resumed.update(kl, 256), expected, rel_tol=1e-15)
    assert resumed.value == expected and expected != 0.05
    with pytest.raises(ValueError, match="target must be finite and > 0.0; got 0.0"):
        AdaptiveKLController(0.1, target=0, horizon=10)
    with pytest.raises(ValueError, match="horizon must be finite and > 0.0; got -5.0"):
        AdaptiveKLController(0.1, target=1, horizon=-5)
    with pytest.raises(ValueError, match="current_kl must be finite"):
        ctl.update(float("nan"), 64)
    with pytest.raises(ValueError, match="state must be a dict with the single key 'value'; got \\['kl'\\]"):
        ctl.load_state_dict({"kl": 1.0})


def test_fixed_controller_has_the_same_interface_and_never_moves():
    ctl = FixedKLController(0.03)
    assert ctl.update(100.0, 512) == 0.03 and ctl.update(-1.0, 512) == 0.03
    other = FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.03 and ctl.state_dict() == {"value": 0.03}
    with pytest.raises(ValueError, match="n_steps must be finite and >= 0.0; got -1.0"):
        ctl.update(1.0, -1)


@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.bfloat16])
def test_ema_equals_its_formula(ref_dtype):
    pol = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    ref = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2)).to(ref_dtype)
    before = [p.detach().clone() for p in ref.parameters()]
    ema_update_(ref, pol, 0.9)
    for r, r0, p in zip(ref.parameters(), before, pol.parameters()):
        want64 = 0.9 * r0.double() + 0.1 * p.detach().double()
        want_lowp = (0.9 * r0.float() + 0.1 * p.detach().float()).to(ref_dtype)
        assert r.dtype == ref_dtype and not r.requires_grad or r.grad is None
        assert_close_to_ref(r.detach(), want64, want_lowp, atol=1e-7, name="ema")
    # decay 1 keeps the reference, decay 0 copies the policy (lists of tensors work too).
    a, b = [torch.randn(4)], [torch.randn(4)]
    a0 = a[0].clone()
    ema_update_(a, b, 1.0)
    assert torch.equal(a[0], a0)
    ema_update_(a, b, 0.0)
    assert torch.equal(a[0], b[0])


def test_ema_bad_inputs():
    with pytest.raises(ValueError, match="decay must be in \\[0, 1\\]; got 1.5"):
        ema_update_([torch.zeros(2)], [torch.ones(2)], 1.5)
    with pytest.raises(ValueError, match="same number of tensors; got 1 and 2"):
        ema_update_([torch.zeros(2)], [torch.ones(2), torch.ones(2)], 0.5)
    with pytest.raises(ValueError, match="ref_params\\[0\\] and params\\[0\\] must have the same shape; got \\(2,\\)"):
        ema_update_([torch.zeros(2)], [torch.ones(3)], 0.5)


def _ema_worker(rank, world, init, full_ref, full_pol, out_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    # Private copies: spawn shares the arguments' memory between processes, and a shard may alias its source.
    full_ref, full_pol = full_ref.clone(), full_pol.clone()
    pol = distribute_tensor(full_pol, mesh, [Shard(0)])
    sharded_ref = distribute_tensor(full_ref, mesh, [Shard(0)])   # same placement: shard-local update
    plain_ref = full_ref.clone()                                    # plain reference: the policy is gathered
    other_ref = distribute_tensor(full_ref, mesh, [Replicate()])   # another placement: redistributed
    ema_update_([sharded_ref, plain_ref, other_ref], [pol, pol, pol], 0.8)
    out = {"sharded": sharded_ref.full_tensor(), "plain": plain_ref, "other": other_ref.full_tensor()}
    torch.save(out, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_ema_on_fsdp2_dtensors_in_two_gloo_processes(tmp_path):
    full_ref, full_pol = torch.randn(6, 3), torch.randn(6, 3)
    init = f"file://{tmp_path / 'rendezvous'}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ema_worker, args=(2, init, full_ref, full_pol, str(tmp_path / "res")), nprocs=2, join=True)
    want64 = 0.8 * full_ref.double() + 0.2 * full_pol.double()
    want32 = 0.8 * full_ref + 0.2 * full_pol
    for r in range(2):
        got = torch.load(tmp_path / f"res.{r}")
        for name, t in got.items():
            assert_close_to_ref(t, want64, want32, atol=1e-7, name=f"ema {name} rank {r}")


def test_running_moments_equal_the_moments_of_the_concatenation():
    from fastalign.rl import RunningMoments

    chunks = [torch.randn(n, dtype=torch.float64) * 3 + 2 for n in (5, 1, 17, 8)]
    m = RunningMoments()
    x = torch.randn(4)
    assert torch.equal(m.normalize(x), x) and torch.equal(m.denormalize(x), x)  # identity before any update
    for k, c in enumerate(chunks, 1):
        m.update(c)
        seen = torch.cat(chunks[:k])
        assert m.mean == pytest.approx(float(seen.mean()), rel=1e-12, abs=1e-12)
        assert m.std == pytest.approx(float(seen.std(unbiased=False)), rel=1e-12)
    y = torch.randn(6, dtype=torch.float64)
    assert torch.allclose(m.denormalize(m.normalize(y)), y)
    restored = RunningMoments()
    restored.load_state_dict(m.state_dict())
    assert restored.state_dict() == m.state_dict()
