"""PPO with a critic, the per-rollout parts: KL-shaped rewards and GAE on packed tokens, the KL coefficient
controllers, and the exponential-moving-average update of the reference model.

Packed layout: the completion tokens of ``S`` sequences concatenated into ``[N]`` tensors, sequence ``s`` holding
tokens ``cu_seqlens[s]:cu_seqlens[s + 1]`` (no padding anywhere, the layout of :func:`fastalign.gae`).
"""

from __future__ import annotations

import math
import numbers

import torch

from fastalign._utils import FLOAT_DTYPES, check_cu_seqlens, check_same_device, check_tensor
from fastalign.ops.gae.naive import compute_dtype
from fastalign.rl.advantages import gae as _gae_whitened
from fastalign.rl.kl import KINDS, kl_estimate
from fastalign.rl.whiten import _all_reduce_sum

__all__ = ["AdaptiveKLController", "FixedKLController", "RunningMoments", "ema_update_", "ppo_advantages"]


def _check_real(x, name: str, *, low: float = 0.0, low_open: bool = False) -> float:
    """``x`` as a finite float ``>= low`` (``> low`` when ``low_open``), else a clear TypeError/ValueError."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or x < low or (low_open and x == low):
        raise ValueError(f"{name} must be finite and {'>' if low_open else '>='} {low}; got {x}")
    return x


@torch.no_grad()
def ppo_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                   cu_seqlens: torch.Tensor, *, kl_coef: float, kl_estimator: str = "k1", gamma: float = 1.0,
                   lam: float = 0.95, whiten_advantages: bool = True, process_group=None,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """PPO's advantages and value targets for one rollout batch of packed completion tokens.

    Replaces the padded per-rollout code of TRL's ``PPOTrainer`` (there on ``[B, T]`` with a Python GAE loop)::

        kl = logprobs - ref_logprobs                     # k1; k3: exp(-kl) - 1 + kl
        rewards = -kl_coef * kl                          # the non-score reward, every token
        rewards[last token of each sequence] += scores   # the score (reward model / reward function)
        advantages, returns = gae(rewards, values)       # per sequence, terminated (value 0 after the end)
        advantages = whiten(advantages)                  # over all tokens (of all ranks with process_group)

    ``returns = advantages + values`` is taken before whitening (the critic's regression target). Everything is
    computed without gradient (these are targets).

    Args:
        scores: ``[S]`` one score per sequence. logprobs, ref_logprobs, values: ``[N]`` the policy's and the
            reference's log-probabilities of the sampled tokens and the critic's values, packed.
        cu_seqlens: ``[S + 1]`` int32/int64 offsets (0, non-decreasing, ending at ``N``; values checked for CPU
            tensors). A sequence with no tokens has no token to carry its score: it only counts in the stats.
        kl_coef: the KL penalty coefficient >= 0 (the ``.value`` of a :class:`AdaptiveKLController`).
        kl_estimator: ``"k1"`` (TRL's default) or ``"k3"`` (``"k2"`` is accepted too); see :func:`kl_estimate`.
        gamma, lam: GAE's discount and lambda in [0, 1]. impl: GAE's implementation (see :func:`fastalign.gae`).
        whiten_advantages: whiten the advantages over all tokens (unbiased variance, mean shifted to 0).
        process_group: a ``torch.distributed`` group: whitening and the stats cover the tokens and sequences of
            every rank (each rank must call this); None for this process alone.

    Returns:
        ``(advantages, returns, rewards, stats)``: ``[N]`` float32 tensors, and a dict of Python floats named as
        TRL names them: ``objective/kl`` (the mean over sequences of the summed per-token KL estimate),
        ``objective/non_score_reward`` (``-kl_coef * objective/kl``), ``objective/scores`` (the mean score),
        ``objective/rlhf_reward`` (``objective/scores + objective/non_score_reward``), and ``objective/kl_coef``.
        The KL and reward arithmetic is float64 when every input is float64, float32 otherwise; GAE itself runs
        in float32 (the op's contract), so the three tensors are float32.

    Example:
        >>> cu = torch.tensor([0, 3, 4])
        >>> adv, ret, rew, stats = ppo_advantages(torch.tensor([1.0, -1.0]), torch.full((4,), -1.0),
        ...                                       torch.full((4,), -1.2), torch.zeros(4), cu, kl_coef=0.1)
        >>> rew
        tensor([-0.0200, -0.0200,  0.9800, -1.0200])
    """
    check_tensor(scores, "scores", ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor(logprobs, "logprobs", ndim=1, dtypes=FLOAT_DTYPES)
    for name, t in (("ref_logprobs", ref_logprobs), ("values", values)):
        check_tensor(t, name, ndim=1, dtypes=FLOAT_DTYPES)
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(logprobs.shape)}; got {tuple(t.shape)}")
    N = logprobs.shape[0]
    check_cu_seqlens(cu_seqlens, N)
    S = cu_seqlens.shape[0] - 1
    if scores.shape[0] != S:
        raise ValueError(f"scores must hold one score per sequence ([S] with S = len(cu_seqlens) - 1 = {S}); "
                         f"got shape {tuple(scores.shape)}")
    device = check_same_device(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                               cu_seqlens=cu_seqlens)
    kl_coef = _check_real(kl_coef, "kl_coef")
    if kl_estimator not in KINDS:
        raise ValueError(f"kl_estimator must be one of {KINDS}; got {kl_estimator!r}")
    if not isinstance(whiten_advantages, bool):
        raise TypeError(f"whiten_advantages must be a bool; got {type(whiten_advantages).__name__}")

    acc = compute_dtype(scores, logprobs, ref_logprobs, values)
    cu = cu_seqlens.long()
    lengths = cu.diff()
    seq = torch.repeat_interleave(torch.arange(S, device=device), lengths, output_size=N)  # [N] sequence of token
    is_last = torch.arange(N, device=device) == cu[1:][seq] - 1
    kl = kl_estimate(logprobs.to(acc), ref_logprobs.to(acc), kl_estimator).to(acc)
    rewards = -kl_coef * kl + torch.where(is_last, scores.to(acc)[seq], 0.0)
    advantages, returns = _gae_whitened(rewards, values, cu_seqlens=cu_seqlens, gamma=gamma, lam=lam,
                                        whiten_advantages=whiten_advantages, process_group=process_group, impl=impl)

    kl_per_seq = torch.zeros(S, dtype=acc, device=device).index_add_(0, seq, kl)
    totals = _all_reduce_sum(torch.stack([torch.tensor(float(S), dtype=acc, device=device), kl_per_seq.sum(),
                                          scores.to(acc).sum()]), process_group).tolist()
    count = max(totals[0], 1.0)
    mean_kl, mean_score = totals[1] / count, totals[2] / count
    stats = {"objective/kl": mean_kl, "objective/non_score_reward": -kl_coef * mean_kl,
             "objective/scores": mean_score, "objective/rlhf_reward": mean_score - kl_coef * mean_kl,
             "objective/kl_coef": kl_coef}
    return advantages, returns, rewards.float(), stats


class FixedKLController:
    """A constant KL coefficient with the interface of :class:`AdaptiveKLController` (``update`` changes nothing).

    Example:
        >>> ctl = FixedKLController(0.05); ctl.update(3.0, 64); ctl.value
        0.05
    """

    def __init__(self, kl_coef: float):
        self.value = _check_real(kl_coef, "kl_coef")

    def update(self, current_kl: float, n_steps: int) -> float:
        """Check the arguments as the adaptive controller does; return the (unchanged) coefficient."""
        _check_real(current_kl, "current_kl", low=-math.inf)
        _check_real(n_steps, "n_steps")
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"value"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a dict with the single key 'value'; got {got}")
        self.value = _check_real(state["value"], "state['value']")


class AdaptiveKLController(FixedKLController):
    """The adaptive KL coefficient of Ziegler et al. 2019 (TRL's ``AdaptiveKLController``).

    After each rollout batch of ``n_steps`` samples with measured KL ``current_kl`` (``objective/kl``)::

        kl_coef *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon

    so the coefficient grows while the KL is above ``target`` and shrinks below it, by at most 20% per
    ``horizon`` samples.

    Args:
        init_kl_coef: the starting coefficient >= 0. target: the KL to hold (> 0). horizon: samples (> 0).

    Example:
        >>> ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
        >>> ctl.update(12.0, n_steps=1000)      # KL twice the target: +20% of 1000/10000
        0.10200000000000001
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        super().__init__(init_kl_coef)
        self.target = _check_real(target, "target", low_open=True)
        self.horizon = _check_real(horizon, "horizon", low_open=True)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one update; return the new coefficient. A non-finite ``current_kl`` raises (it would stick)."""
        current_kl = _check_real(current_kl, "current_kl", low=-math.inf)
        n_steps = _check_real(n_steps, "n_steps")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class RunningMoments:
    """Running mean and standard deviation of a stream of values (value normalization of the critic's targets).

    ``update(x)`` merges a batch (all elements, of all ranks with ``process_group``) into the running moments by
    Chan et al.'s parallel formula, exact over everything seen so far: after batches ``x_1..x_k`` the mean and the
    (population) std are those of their concatenation. ``normalize(x) = (x - mean) / std`` and ``denormalize``
    undo each other; before any update they are the identity. ``state_dict`` holds three plain floats.

    Example:
        >>> m = RunningMoments(); m.update(torch.tensor([1.0, 3.0])); m.update(torch.tensor([5.0]))
        >>> round(m.mean, 6), round(m.std, 6)
        (3.0, 1.632993)
    """

    def __init__(self):
        self.count, self.mean, self.var = 0.0, 0.0, 1.0

    @property
    def std(self) -> float:
        return max(self.var, 1e-12) ** 0.5

    @torch.no_grad()
    def update(self, x: torch.Tensor, process_group=None) -> None:
        x = x.detach().double().reshape(-1)
        n, s = _all_reduce_sum(torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
                                            x.sum()]), process_group).tolist()
        if n == 0:
            return
        mean = s / n
        (ss,) = _all_reduce_sum(((x - mean) ** 2).sum().reshape(1), process_group).tolist()
        total = self.count + n
        delta = mean - self.mean
        m2 = (self.var * self.count if self.count else 0.0) + ss + delta**2 * self.count * n / total
        self.count, self.mean, self.var = total, self.mean + delta * n / total, m2 / total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.count else x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean if self.count else x

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.var = (float(state[k]) for k in ("count", "mean", "var"))


@torch.no_grad()
def ema_update_(ref_params, params, decay: float) -> None:
    """``ref = decay * ref + (1 - decay) * policy`` in place, parameter by parameter (an EMA reference model).

    Replaces ``for r, p in zip(ref.parameters(), policy.parameters()): r.mul_(decay).add_(p, alpha=1 - decay)``,
    computed in float32 (float64 for float64 references) and rounded once into the reference's dtype, so a
    bfloat16 reference does not lose every small step. FSDP2 parameters (DTensors): when both are sharded the
    same way each rank updates its own shard with no communication; a sharded policy with a plain reference is
    gathered (``full_tensor()``; every rank must call this, in the same order); a sharded reference takes the
    policy redistributed to its own placement.

    Args:
        ref_params, params: iterables of tensors (or ``nn.Module``s, meaning their ``parameters()``) of equal length
            and matching shapes, in the same order. decay: in [0, 1]; 1 leaves the reference unchanged.

    Example:
        >>> ref, pol = [torch.zeros(2)], [torch.ones(2)]
        >>> ema_update_(ref, pol, 0.75); ref[0]
        tensor([0.2500, 0.2500])
    """
    decay = _check_real(decay, "decay")
    if decay > 1.0:
        raise ValueError(f"decay must be in [0, 1]; got {decay}")
    as_list = lambda x: list(x.parameters()) if isinstance(x, torch.nn.Module) else list(x)
    refs, pols = as_list(ref_params), as_list(params)
    if len(refs) != len(pols):
        raise ValueError(f"ref_params and params must have the same number of tensors; got {len(refs)} and "
                         f"{len(pols)}")
    for i, (r, p) in enumerate(zip(refs, pols)):
        check_tensor(r, f"ref_params[{i}]", dtypes=FLOAT_DTYPES)
        check_tensor(p, f"params[{i}]", dtypes=FLOAT_DTYPES)
        if r.shape != p.shape:
            raise ValueError(f"ref_params[{i}] and params[{i}] must have the same shape; got {tuple(r.shape)} and "
                             f"{tuple(p.shape)}")
        if hasattr(r, "to_local"):  # a sharded reference: bring the policy to its placement, update the shard
            if not hasattr(p, "to_local"):
                raise ValueError(f"ref_params[{i}] is a DTensor but params[{i}] is a plain tensor; shard both or "
                                 "neither, or give a sharded policy with a plain reference")
            if (p.device_mesh, p.placements) != (r.device_mesh, r.placements):
                p = p.redistribute(r.device_mesh, r.placements)
            r, p = r.to_local(), p.to_local()
        elif hasattr(p, "full_tensor"):
            p = p.full_tensor()
        acc = torch.float64 if r.dtype == torch.float64 else torch.float32
        r.copy_(decay * r.to(acc) + (1.0 - decay) * p.to(device=r.device, dtype=acc))
