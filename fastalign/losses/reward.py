"""The reward-model (Bradley-Terry) loss on scalar rewards of chosen and rejected completions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign._utils import FLOAT_DTYPES, check_same_device, check_tensor
from fastalign.losses.dpo import _number


def _as_vector(x, name: str) -> torch.Tensor:
    check_tensor(x, name, dtypes=FLOAT_DTYPES)
    if x.dim() == 2 and x.shape[1] == 1:  # a value head's [B, 1] output
        x = x[:, 0]
    if x.dim() != 1:
        raise ValueError(f"{name} must be [B] or [B, 1]; got shape {tuple(x.shape)}")
    return x


def reward_model_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                      margin: torch.Tensor | float | None = None,
                      center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry reward-model loss and its metrics.

    ``loss = mean(-log sigmoid(r_c - r_r - margin)) + coef * mean((r_c + r_r)^2)``: the pairwise logistic loss of
    InstructGPT (Ouyang et al. 2022, eq. 1), the per-pair margin of Llama 2 (Touvron et al. 2023, eq. 2) and the
    centering term of Eisenstein et al. 2023 ("Helping or Herding?") that keeps rewards near zero. Same as the loss
    of TRL's ``RewardTrainer`` (``center_rewards_coefficient``, a ``margin`` column).

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` (or a value head's ``[B, 1]``) scalar rewards of each pair.
        margin: None, a number or a ``[B]`` tensor of per-pair margins (no gradient flows into it).
        center_rewards_coefficient: None or the weight of the centering term (>= 0).

    Returns:
        ``(loss, metrics)``: the scalar loss (float32, float64 for float64 rewards) and detached scalars
        ``accuracy`` (fraction of pairs with ``r_c > r_r``), ``margin`` (mean ``r_c - r_r``), ``mean_reward``,
        ``min_reward`` and ``max_reward`` (over chosen and rejected rewards together).

    Example:
        >>> loss, metrics = reward_model_loss(torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.4]), margin=0.1)
    """
    rc, rr = _as_vector(chosen_rewards, "chosen_rewards"), _as_vector(rejected_rewards, "rejected_rewards")
    if rc.shape != rr.shape:
        raise ValueError(f"chosen_rewards and rejected_rewards must have one reward per pair (the same shape); got "
                         f"{tuple(rc.shape)} and {tuple(rr.shape)}")
    if rc.numel() == 0:
        raise ValueError("chosen_rewards must hold at least one pair; got an empty batch")
    if isinstance(margin, torch.Tensor):
        margin = _as_vector(margin, "margin")
        if margin.shape != rc.shape:
            raise ValueError(f"margin must be a number or one value per pair {tuple(rc.shape)}; "
                             f"got shape {tuple(margin.shape)}")
        check_same_device(chosen_rewards=rc, rejected_rewards=rr, margin=margin)
    else:
        check_same_device(chosen_rewards=rc, rejected_rewards=rr)
        margin = 0.0 if margin is None else _number(margin, "margin")
    if center_rewards_coefficient is not None:
        center_rewards_coefficient = _number(center_rewards_coefficient, "center_rewards_coefficient")
        if center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0; got {center_rewards_coefficient}")
    acc = torch.float64 if torch.float64 in (rc.dtype, rr.dtype) else torch.float32
    rc, rr = rc.to(acc), rr.to(acc)
    if isinstance(margin, torch.Tensor):
        margin = margin.detach().to(acc)
    loss = -F.logsigmoid(rc - rr - margin).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((rc + rr) ** 2).mean()
    with torch.no_grad():
        both = torch.cat([rc, rr])
        metrics = {"accuracy": (rc > rr).to(acc).mean(), "margin": (rc - rr).mean(), "mean_reward": both.mean(),
                   "min_reward": both.min(), "max_reward": both.max()}
    return loss, metrics
