"""The DPO family of preference losses on per-sequence log-probabilities.

:func:`dpo_loss` replaces the ``dpo_loss`` method of TRL's ``DPOTrainer`` (every ``DPOConfig.loss_type``, combined
with weights) and the reference-free losses of TRL's ``CPOTrainer`` / ``ORPOTrainer`` (SimPO, CPO, ORPO). It takes
per-sequence log-probabilities (sums over the completion tokens, or their per-token averages), so it works with
any way of computing them; :func:`fastalign.fused_linear_dpo_loss` computes them from hidden states without logits.

Each loss type is one small function in the table :data:`LOSSES`, with its formula, source and TRL's name; the
table of :func:`dpo_loss`'s docstring and the page ``docs/dpo_loss_types.md`` (written by
``python bench/gen_dpo_table.py``) are generated from it.
"""

from __future__ import annotations

import math
import numbers
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastalign._utils import FLOAT_DTYPES, check_same_device, check_tensor

NOTATION = ("`pi_c, pi_r` are the policy's log-probabilities of the chosen and rejected completions, `ref_c, ref_r` "
            "the reference model's, `|y_c|, |y_r|` the completion lengths (tokens), `l_c = pi_c - ref_c` and "
            "`l_r = pi_r - ref_r` the log-ratios, `d = l_c - l_r`, `b` = `beta`, `e` = `label_smoothing`, `s` the "
            "logistic sigmoid and `log s` its logarithm.")


def _wrap(text: str, width: int, indent: str = "", tick: str = "``") -> list[str]:
    """``textwrap.wrap`` that never breaks inside a code span (delimited by ``tick``)."""
    parts = text.split(tick)
    text = tick.join(part.replace(" ", "\0") if i % 2 else part for i, part in enumerate(parts))
    lines = textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent, break_long_words=False,
                          break_on_hyphens=False)
    return [line.replace("\0", " ") for line in lines]


def _rst(text: str) -> str:
    return text.replace("`", "``")


if __doc__:  # (None under python -OO)
    __doc__ += "\n" + "\n".join(_wrap(_rst("Notation used in the docstrings: " + NOTATION), 116)) + "\n"


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


@dataclass(frozen=True)
class DPOLossParams:
    """The non-tensor options of :func:`dpo_loss`, validated once (see :meth:`make`)."""

    beta: float = 0.1
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    discopop_tau: float = 0.05
    average_log_prob: bool = False
    bco_shift: bool = False

    @classmethod
    def make(cls, *, beta=0.1, loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, simpo_gamma=0.5,
             cpo_alpha=1.0, discopop_tau=0.05, average_log_prob=False, bco_shift=False) -> DPOLossParams:
        """Validate the options (raising ``TypeError``/``ValueError`` naming the argument) and freeze them."""
        beta = _number(beta, "beta")
        if beta <= 0:
            raise ValueError(f"beta must be > 0; got {beta}")
        types = (loss_type,) if isinstance(loss_type, str) else loss_type
        if not isinstance(types, (list, tuple)) or not types:
            raise TypeError(f"loss_type must be a string or a non-empty list of strings; got {loss_type!r}")
        for t in types:
            if t not in LOSSES:
                raise ValueError(f"loss_type {t!r} is unknown; valid loss types are {', '.join(LOSS_TYPES)}")
        if len(set(types)) != len(types):
            raise ValueError(f"loss_type must not repeat a type; got {list(types)}")
        if loss_weights is None:
            weights = (1.0,) * len(types)
        else:
            if isinstance(loss_weights, numbers.Real):
                loss_weights = [loss_weights]
            weights = tuple(_number(w, "loss_weights") for w in loss_weights)
            if len(weights) != len(types):
                raise ValueError(f"loss_weights must have one weight per loss type ({len(types)}: {list(types)}); "
                                 f"got {len(weights)}")
        label_smoothing = _number(label_smoothing, "label_smoothing")
        if "robust" in types and not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) with loss_type robust; got {label_smoothing}")
        if not 0.0 <= label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5]; got {label_smoothing}")
        discopop_tau = _number(discopop_tau, "discopop_tau")
        if discopop_tau <= 0:
            raise ValueError(f"discopop_tau must be > 0; got {discopop_tau}")
        if not isinstance(bco_shift, bool):
            raise TypeError(f"bco_shift must be a bool; got {type(bco_shift).__name__}")
        return cls(beta=beta, loss_type=tuple(types), loss_weights=weights, label_smoothing=label_smoothing,
                   simpo_gamma=_number(simpo_gamma, "simpo_gamma"), cpo_alpha=_number(cpo_alpha, "cpo_alpha"),
                   discopop_tau=discopop_tau, average_log_prob=bool(average_log_prob), bco_shift=bco_shift)

    @property
    def needs_reference(self) -> bool:
        return any(t not in REFERENCE_FREE for t in self.loss_type)


class BCORunningMean:
    """The shift ``delta`` of ``bco_pair`` with ``bco_shift=True``: the running mean of each batch's mean reward
    (the BCO paper's, and older TRL's ``RunningMoments``; TRL 1.16's ``bco_pair`` has no shift, the default).

    Keep one instance for a training run and pass it to every :func:`dpo_loss` call (``bco_state=``); each call
    with ``bco_shift=True`` first folds its batch mean ``mean(beta * l_c, beta * l_r)`` (no gradient) in, then uses
    the updated mean. With ``bco_shift=True`` and no state, ``delta`` is the current batch's mean. Without
    ``bco_shift`` the state is neither read nor updated. Single-process: it does not all-reduce.
    """

    def __init__(self):
        self.mean: torch.Tensor | None = None
        self.count = 0

    def update(self, batch_mean: torch.Tensor) -> torch.Tensor:
        batch_mean = batch_mean.detach()
        self.count += 1
        self.mean = batch_mean if self.mean is None else self.mean + (batch_mean - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": None if self.mean is None else float(self.mean), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean = None if state["mean"] is None else torch.tensor(state["mean"], dtype=torch.float64)
        self.count = int(state["count"])


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed_sigmoid(z: torch.Tensor, e: float) -> torch.Tensor:
    return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z) if e else -F.logsigmoid(z)


@dataclass(frozen=True)
class Pairs:
    """What a loss type reads, for one call: ``[B]`` tensors in the accumulation dtype (float32, or float64)."""

    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor  # zeros without a reference
    rr: torch.Tensor
    lc: torch.Tensor  # pc - rc
    lr: torch.Tensor  # pr - rr
    d: torch.Tensor  # lc - lr
    n_c: torch.Tensor | None  # completion lengths; None when the log-probabilities are averages already
    n_r: torch.Tensor | None
    nll: torch.Tensor | None  # scalar: the chosen tokens' mean NLL, when a type in the call needs it
    bco_state: BCORunningMean | None

    def avg_c(self, x: torch.Tensor) -> torch.Tensor:
        """``x / |y_c|`` (``x`` when the log-probabilities are averages)."""
        return x if self.n_c is None else x / self.n_c

    def avg_r(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.n_r is None else x / self.n_r


@dataclass(frozen=True)
class LossType:
    """One row of :data:`LOSSES`: ``fn(pairs, params) -> [B]`` per-pair loss, and what the docs say about it.

    ``formula`` and ``source`` mark code with single backticks (Markdown; doubled for the docstring).
    """

    fn: Callable[[Pairs, DPOLossParams], torch.Tensor]
    formula: str
    source: str
    trl: str
    reference_free: bool  # reads no reference log-probabilities
    averages: bool  # reads per-token averages pi/|y| (lengths needed unless average_log_prob)
    nll: bool  # includes the chosen tokens' NLL (chosen lengths needed unless average_log_prob)


# name -> LossType, in the order of the docs and of the error message for an unknown type.
LOSSES: dict[str, LossType] = {}


def _loss_type(name: str, formula: str, source: str, *, trl: str | None = None, reference_free: bool = False,
               averages: bool = False, nll: bool = False):
    """Add the decorated function to :data:`LOSSES` as loss type ``name``; ``trl`` defaults to TRL's
    ``DPOConfig(loss_type=name)``."""
    trl = f'`DPOConfig(loss_type="{name}")`' if trl is None else trl

    def add(fn):
        LOSSES[name] = LossType(fn, formula, source, trl, reference_free, averages, nll)
        return fn
    return add


@_loss_type("sigmoid", "`-(1-e) log s(b d) - e log s(-b d)`",
            "DPO, Rafailov et al. 2023 (arXiv:2305.18290); e > 0 is conservative DPO (cDPO), Mitchell 2023")
def _sigmoid(x: Pairs, p: DPOLossParams):
    return _smoothed_sigmoid(p.beta * x.d, p.label_smoothing)


@_loss_type("hinge", "`relu(1 - b d)`", "SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425)")
def _hinge(x: Pairs, p: DPOLossParams):
    return torch.relu(1 - p.beta * x.d)


@_loss_type("ipo", "`(l_c/|y_c| - l_r/|y_r| - 1/(2b))^2`, on length-averaged log-ratios",
            "IPO, Azar et al. 2023 (arXiv:2310.12036), eq. 17", averages=True)
def _ipo(x: Pairs, p: DPOLossParams):
    return (x.avg_c(x.lc) - x.avg_r(x.lr) - 1 / (2 * p.beta)) ** 2


@_loss_type("exo_pair", "`s(b d) (log s(b d) - log(1-e)) + s(-b d) (log s(-b d) - log e)`, e = 1e-3 when 0",
            "EXO, Ji et al. 2024 (arXiv:2402.00856), eq. 16")
def _exo_pair(x: Pairs, p: DPOLossParams):
    b, eps = p.beta, p.label_smoothing if p.label_smoothing > 0 else 1e-3
    return (torch.sigmoid(b * x.d) * (F.logsigmoid(b * x.d) - math.log1p(-eps))
            + torch.sigmoid(-b * x.d) * (F.logsigmoid(-b * x.d) - math.log(eps)))


@_loss_type("nca_pair", "`-log s(b l_c) - 0.5 log s(-b l_c) - 0.5 log s(-b l_r)`",
            "NCA, Chen et al. 2024 (arXiv:2402.05369)")
def _nca_pair(x: Pairs, p: DPOLossParams):
    b = p.beta
    return -F.logsigmoid(b * x.lc) - 0.5 * F.logsigmoid(-b * x.lc) - 0.5 * F.logsigmoid(-b * x.lr)


@_loss_type("robust", "`(-(1-e) log s(b d) + e log s(-b d)) / (1 - 2e)`, e < 0.5",
            "Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409)")
def _robust(x: Pairs, p: DPOLossParams):
    b, e = p.beta, p.label_smoothing
    return (-(1 - e) * F.logsigmoid(b * x.d) + e * F.logsigmoid(-b * x.d)) / (1 - 2 * e)


@_loss_type("bco_pair", "`-log s(b l_c - delta) - log s(-(b l_r - delta))` with delta = 0 (TRL 1.16); with "
            "`bco_shift=True`, delta = the running mean (`bco_state`) of the batch mean reward `mean(b l_c, b l_r)` "
            "(the paper's shift)", "BCO, Jung et al. 2024 (arXiv:2404.04656)")
def _bco_pair(x: Pairs, p: DPOLossParams):
    b = p.beta
    if not p.bco_shift:
        return -F.logsigmoid(b * x.lc) - F.logsigmoid(-b * x.lr)
    batch_mean = torch.cat([b * x.lc, b * x.lr]).mean().detach()
    delta = batch_mean if x.bco_state is None else x.bco_state.update(batch_mean).to(x.pc.dtype)
    return -F.logsigmoid(b * x.lc - delta) - F.logsigmoid(-(b * x.lr - delta))


@_loss_type("sppo_hard", "`(l_c - 1/(2b))^2 + (l_r + 1/(2b))^2`",
            "SPPO with hard win probabilities, Wu et al. 2024 (arXiv:2405.00675)")
def _sppo_hard(x: Pairs, p: DPOLossParams):
    return (x.lc - 0.5 / p.beta) ** 2 + (x.lr + 0.5 / p.beta) ** 2


@_loss_type("aot", "sigmoid loss of `b (sort(pi_c - pi_r) - sort(ref_c - ref_r))` (sorted over the batch)",
            "AOT, Melnyk et al. 2024 (arXiv:2406.05882)")
def _aot(x: Pairs, p: DPOLossParams):
    return _smoothed_sigmoid(p.beta * (torch.sort(x.pc - x.pr).values - torch.sort(x.rc - x.rr).values),
                             p.label_smoothing)


@_loss_type("aot_unpaired", "sigmoid loss of `b (sort(l_c) - sort(l_r))` (sorted over the batch)",
            "AOT for unpaired data, Melnyk et al. 2024 (arXiv:2406.05882)", trl='`DPOConfig(loss_type="aot_pair")`')
def _aot_unpaired(x: Pairs, p: DPOLossParams):
    return _smoothed_sigmoid(p.beta * (torch.sort(x.lc).values - torch.sort(x.lr).values), p.label_smoothing)


@_loss_type("apo_zero", "`1 - s(b l_c) + s(b l_r)`", "APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266), eq. 7")
def _apo_zero(x: Pairs, p: DPOLossParams):
    return 1 - torch.sigmoid(p.beta * x.lc) + torch.sigmoid(p.beta * x.lr)


@_loss_type("apo_down", "`s(b l_c) + 1 - s(b d)`", "APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266), eq. 8")
def _apo_down(x: Pairs, p: DPOLossParams):
    return torch.sigmoid(p.beta * x.lc) + 1 - torch.sigmoid(p.beta * x.d)


@_loss_type("discopop", "`(1 - m) (-log s(b d)) + m exp(-b d)`, `m = s(b d / tau)` (`discopop_tau`)",
            "DiscoPOP (log-ratio modulated loss), Lu et al. 2024 (arXiv:2406.08414), eq. 5")
def _discopop(x: Pairs, p: DPOLossParams):
    b = p.beta
    m = torch.sigmoid(b * x.d / p.discopop_tau)
    return (1 - m) * -F.logsigmoid(b * x.d) + m * torch.exp(-b * x.d)


@_loss_type("sft", "`NLL = -sum(pi_c) / sum(|y_c|)`, the chosen tokens' mean negative log-likelihood (the mean "
            "over pairs of `-pi_c` with `average_log_prob`)",
            'The NLL term of RPO, Pang et al. 2024 (arXiv:2404.19733): `loss_type=["sigmoid", "sft"], '
            "loss_weights=[1, alpha]`", reference_free=True, nll=True)
def _sft(x: Pairs, p: DPOLossParams):
    return x.nll.expand_as(x.pc)


@_loss_type("sigmoid_norm", "`-log s(b (l_c/|y_c| - l_r/|y_r|))`", "Length-normalized DPO, as in TRL",
            averages=True)
def _sigmoid_norm(x: Pairs, p: DPOLossParams):
    return -F.logsigmoid(p.beta * (x.avg_c(x.lc) - x.avg_r(x.lr)))


@_loss_type("simpo", "`-(1-e) log s(z) - e log s(-z)`, `z = b (pi_c/|y_c| - pi_r/|y_r|) - gamma` (`simpo_gamma`)",
            "SimPO, Meng et al. 2024 (arXiv:2405.14734), eq. 6", trl='`CPOConfig(loss_type="simpo")`',
            reference_free=True, averages=True)
def _simpo(x: Pairs, p: DPOLossParams):
    return _smoothed_sigmoid(p.beta * (x.avg_c(x.pc) - x.avg_r(x.pr)) - p.simpo_gamma, p.label_smoothing)


@_loss_type("cpo", "`-(1-e) log s(b (pi_c - pi_r)) - e log s(-b (pi_c - pi_r)) + cpo_alpha NLL`",
            "CPO, Xu et al. 2024 (arXiv:2401.08417), eq. 6", trl='`CPOConfig(loss_type="sigmoid")`',
            reference_free=True, nll=True)
def _cpo(x: Pairs, p: DPOLossParams):
    return _smoothed_sigmoid(p.beta * (x.pc - x.pr), p.label_smoothing) + p.cpo_alpha * x.nll


@_loss_type("orpo", "`NLL - b log s(log odds_c - log odds_r)`, `log odds = a - log(1 - exp(a))`, `a = pi/|y|`",
            "ORPO, Hong et al. 2024 (arXiv:2403.07691), eqs. 6-7; `beta` is the paper's lambda",
            trl="`ORPOTrainer`", reference_free=True, averages=True, nll=True)
def _orpo(x: Pairs, p: DPOLossParams):
    a_c, a_r = x.avg_c(x.pc), x.avg_r(x.pr)
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    return x.nll - p.beta * F.logsigmoid(log_odds)


LOSS_TYPES = tuple(LOSSES)
REFERENCE_FREE = tuple(name for name, t in LOSSES.items() if t.reference_free)
NEEDS_AVERAGES = tuple(name for name, t in LOSSES.items() if t.averages)
NEEDS_NLL = tuple(name for name, t in LOSSES.items() if t.nll)


def _check_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_lengths, rejected_lengths, params: DPOLossParams):
    check_tensor(policy_chosen_logps, "policy_chosen_logps", ndim=1, dtypes=FLOAT_DTYPES)
    B = policy_chosen_logps.shape[0]
    named = {"policy_rejected_logps": policy_rejected_logps, "ref_chosen_logps": ref_chosen_logps,
             "ref_rejected_logps": ref_rejected_logps}
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must be given together; got only "
                         f"{'ref_chosen_logps' if ref_rejected_logps is None else 'ref_rejected_logps'}")
    if ref_chosen_logps is None and params.needs_reference:
        need = [t for t in params.loss_type if t not in REFERENCE_FREE]
        raise ValueError(f"loss_type {need} needs ref_chosen_logps and ref_rejected_logps; only "
                         f"{', '.join(REFERENCE_FREE)} are reference-free")
    for name, x in list(named.items()) + [("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)]:
        if x is None:
            continue
        lengths = name.endswith("lengths")
        check_tensor(x, name, ndim=1, dtypes=FLOAT_DTYPES + (torch.int32, torch.int64) if lengths else FLOAT_DTYPES)
        if x.shape[0] != B:
            raise ValueError(f"{name} must have the batch size of policy_chosen_logps ([{B}]: one entry per pair, "
                             f"chosen and rejected halves must match); got shape {tuple(x.shape)}")
    check_same_device(policy_chosen_logps=policy_chosen_logps, **named, chosen_lengths=chosen_lengths,
                      rejected_lengths=rejected_lengths)
    if B == 0:
        raise ValueError("policy_chosen_logps must hold at least one pair; got an empty batch")
    needs_lengths = any(t in NEEDS_AVERAGES for t in params.loss_type) or any(t in NEEDS_NLL for t in params.loss_type)
    if needs_lengths and not params.average_log_prob and (chosen_lengths is None or rejected_lengths is None):
        need = [t for t in params.loss_type if t in NEEDS_AVERAGES + NEEDS_NLL]
        raise ValueError(f"loss_type {need} needs per-token averages: pass chosen_lengths and rejected_lengths "
                         "(completion tokens per sequence), or average_log_prob=True with averaged log-probs")
    for name, x in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if x is not None and not bool((x > 0).all()):
            row = int((x <= 0).nonzero()[0])
            raise ValueError(f"{name} must be > 0 (every sequence needs completion tokens); got {x[row].item()} "
                             f"at pair {row}")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None, *,
             beta: float = 0.1, loss_type: str | list[str] = "sigmoid", loss_weights: list[float] | None = None,
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5, cpo_alpha: float = 1.0,
             discopop_tau: float = 0.05, average_log_prob: bool = False,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             bco_state: BCORunningMean | None = None,
             bco_shift: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family preference loss from per-sequence log-probabilities, and TRL's metrics.

    Replaces TRL's ``DPOTrainer.dpo_loss`` (``DPOConfig.loss_type``, ``loss_weights``, ``label_smoothing``,
    ``discopop_tau``) and the losses of ``CPOTrainer`` (``loss_type="simpo"``, ``cpo_alpha``, ``simpo_gamma``)
    and ``ORPOTrainer``. The loss is ``sum_k loss_weights[k] * mean_over_pairs(loss_k)``.

    Loss types (notation in the module docstring; ``pi`` are the log-probabilities as given, sums unless
    ``average_log_prob``), generated from :data:`LOSSES`:

{loss_types}

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` policy log-probabilities of the chosen / rejected
            completions (sums over completion tokens, or averages with ``average_log_prob=True``).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the reference model's (no gradient expected); may be None
            when every loss type is reference-free (see the table).
        beta: > 0, the temperature of the implicit reward.
        loss_type: one type or a list of types (see the table); combined as a weighted sum.
        loss_weights: one weight per type (default all 1).
        label_smoothing: ``e`` above (the probability that a label is flipped), in [0, 0.5] ([0, 0.5) with robust).
        simpo_gamma: SimPO's target margin ``gamma``.
        cpo_alpha: weight of the NLL term of cpo.
        discopop_tau: DiscoPOP's ``tau`` (> 0).
        average_log_prob: the given log-probabilities (policy and reference) are per-token averages.
        chosen_lengths, rejected_lengths: ``[B]`` completion tokens per sequence (> 0).
        bco_state: a :class:`BCORunningMean` carried across steps for bco_pair with ``bco_shift=True``.
        bco_shift: bco_pair subtracts the running mean reward ``delta`` (the BCO paper, older TRL); False (the
            default) gives TRL 1.16's ``bco_pair``, with no shift.

    Returns:
        ``(loss, metrics)``: the scalar loss (float32, float64 for float64 inputs) and a dict of detached scalars
        named as TRL names them: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
        ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (and ``nll_loss`` when an NLL term is used).
        Rewards are ``beta * (pi - ref)`` from the log-probabilities as given (``beta * pi`` without reference).

    Example:
        >>> pc, pr = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.5])
        >>> rc, rr = torch.tensor([-10.5, -12.0]), torch.tensor([-10.5, -11.0])
        >>> loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)
        >>> loss, metrics = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
        ...                          chosen_lengths=torch.tensor([5, 6]), rejected_lengths=torch.tensor([4, 7]))
    """
    params = DPOLossParams.make(beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                                label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha,
                                discopop_tau=discopop_tau, average_log_prob=average_log_prob,
                                bco_shift=bco_shift)
    _check_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_lengths, rejected_lengths, params)
    return dpo_loss_from_params(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                chosen_lengths, rejected_lengths, params, bco_state)


def dpo_loss_from_params(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         chosen_lengths, rejected_lengths, params: DPOLossParams,
                         bco_state: BCORunningMean | None = None):
    """:func:`dpo_loss` on already validated inputs and options (for callers that validated them)."""
    dtypes = [t.dtype for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps) if t is not None]
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    pc, pr = policy_chosen_logps.to(acc), policy_rejected_logps.to(acc)
    has_ref = ref_chosen_logps is not None
    rc = ref_chosen_logps.to(acc) if has_ref else torch.zeros_like(pc)
    rr = ref_rejected_logps.to(acc) if has_ref else torch.zeros_like(pr)
    lc, lr = pc - rc, pr - rr
    n_c = n_r = None
    if not params.average_log_prob:
        n_c = None if chosen_lengths is None else chosen_lengths.to(acc)
        n_r = None if rejected_lengths is None else rejected_lengths.to(acc)
    nll = None
    if any(t in NEEDS_NLL for t in params.loss_type):
        nll = -pc.mean() if params.average_log_prob else -pc.sum() / n_c.sum()
    pairs = Pairs(pc, pr, rc, rr, lc, lr, lc - lr, n_c, n_r, nll, bco_state)

    loss = pc.new_zeros(())
    for kind, weight in zip(params.loss_type, params.loss_weights):
        loss = loss + weight * LOSSES[kind].fn(pairs, params).mean()

    with torch.no_grad():
        b = params.beta
        reward_c, reward_r = b * (pc - rc), b * (pr - rr)
        metrics = {
            "rewards/chosen": reward_c.mean(),
            "rewards/rejected": reward_r.mean(),
            "rewards/accuracies": (reward_c > reward_r).to(acc).mean(),
            "rewards/margins": (reward_c - reward_r).mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
        }
        if nll is not None:
            metrics["nll_loss"] = nll.detach()
    return loss, metrics


def _docstring_table() -> str:
    """:data:`LOSSES` as the reStructuredText table (and its note) in :func:`dpo_loss`'s docstring."""
    indent, name_w, width = " " * 4, 16, 116
    rule = f"{indent}{'=' * (name_w - 2)}  {'=' * (width - len(indent) - name_w)}"
    lines = [rule]
    for name, t in LOSSES.items():
        text = _rst(f"{t.formula}{', reference-free' if t.reference_free else ''}. {t.source}")
        body = _wrap(text, width - len(indent) - name_w)
        lines += [f"{indent}{name:<{name_w}}{body[0]}"] + [f"{indent}{'':<{name_w}}{line}" for line in body[1:]]
    lines.append(rule)
    note = (f"The types {', '.join(NEEDS_AVERAGES)} use per-token averages ``pi/|y|`` (the lengths are required "
            f"unless ``average_log_prob``); {', '.join(NEEDS_NLL)} need the chosen lengths for the token-mean NLL "
            "(with ``average_log_prob`` it is the mean over pairs of ``-pi_c``).")
    return "\n".join(lines + [""] + _wrap(note, width, indent))


if dpo_loss.__doc__:  # (None under python -OO)
    dpo_loss.__doc__ = dpo_loss.__doc__.replace("{loss_types}", _docstring_table())


DOC_PAGE = "docs/dpo_loss_types.md"
DOC_COMMAND = "python bench/gen_dpo_table.py"


def loss_types_markdown() -> str:
    """The page ``docs/dpo_loss_types.md``: :data:`LOSSES` as a Markdown table (``DOC_COMMAND`` writes it)."""
    cell = lambda s: s.replace("|", "\\|")
    rows = [f"| `{name}` | {cell(t.formula)} | {'yes' if t.reference_free else 'no'} | {cell(t.trl)} | "
            f"{cell(t.source)} |" for name, t in LOSSES.items()]
    return "\n".join([
        "# DPO loss types",
        "",
        f"<!-- Generated from `fastalign.losses.dpo.LOSSES` by `{DOC_COMMAND}`; do not edit by hand. -->",
        "",
        "The `loss_type` values of `fastalign.dpo_loss`, `fastalign.fused_linear_dpo_loss` and `train_dpo`. A list of "
        "types is combined as `sum_k loss_weights[k] * mean_over_pairs(loss_k)`. Types with per-token averages "
        f"({', '.join(NEEDS_AVERAGES)}) or the chosen tokens' NLL ({', '.join(NEEDS_NLL)}) need `chosen_lengths` and "
        "`rejected_lengths`, unless `average_log_prob=True` (the log-probabilities are averages already).",
        "",
        f"Notation: {NOTATION}",
        "",
        "| loss type | per-pair loss | reference-free | TRL's name | source |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
