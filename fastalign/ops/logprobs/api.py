"""linear_logprobs: per-token log-probabilities (and entropy) from hidden states, never building logits.

Layers (STYLE.md 2): the impl modules' launchers ``linear_logprobs_fwd`` / ``linear_logprobs_bwd`` (no
autograd) -> :class:`LinearLogprobsFunction` -> :func:`linear_logprobs` (validation, docs, dispatch).

Launcher contract (``triton.py``, ``cpu.py``), for ``hidden [N, D]``, ``weight [V, D]``, ``targets [N]`` int64,
``bias [V] | None`` and :class:`LogprobsParams`:

- ``linear_logprobs_fwd(hidden, weight, targets, bias, params) -> (lse, z_target, sum_pz)``, float32 ``[N]``
  each: the logsumexp of the processed logits ``z`` over this weight's vocabulary, the processed logit of the
  target when ``targets - params.vocab_start`` falls in ``[0, V)`` (else 0), and ``sum_v softmax(z)_v z_v``
  (``None`` unless ``params.return_entropy``). Rows whose target is ``ignore_index`` may hold anything finite.
- ``linear_logprobs_bwd(hidden, weight, targets, bias, lse, sum_pz, grad_logprobs, grad_entropy, params)
  -> (grad_hidden, grad_weight, grad_bias)`` given the full-vocabulary ``lse`` and ``sum_pz`` and the
  upstream gradients (already zero on ignored rows; ``grad_entropy`` is None without entropy). Gradients are
  accumulated in float32; ``grad_bias`` is None without bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastalign._backend import resolve_impl
from fastalign._utils import FLOAT_DTYPES, check_same_device, check_tensor
from fastalign.ops.logprobs import naive

IMPLS = ("torch",)


@dataclass(frozen=True)
class LogprobsParams:
    """Non-tensor options of linear_logprobs, passed as one object through every layer."""

    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0
    ignore_index: int = -100
    return_entropy: bool = False
    deterministic: bool = False
    vocab_start: int = 0
    impl: str = "torch"


def _check_args(hidden, weight, targets, bias, params: LogprobsParams):
    check_tensor(hidden, "hidden", min_ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor(weight, "weight", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(targets, "targets", dtypes=(torch.int32, torch.int64))
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}); got {weight.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}; "
                         f"got shape {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; "
                         f"got {tuple(targets.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=FLOAT_DTYPES)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] with V = weight.shape[0] = {weight.shape[0]}; "
                             f"got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the dtype of weight ({weight.dtype}); got {bias.dtype}")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if not (math.isfinite(params.temperature) and params.temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {params.temperature}")
    if params.softcap is not None and not (math.isfinite(params.softcap) and params.softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0; got {params.softcap}")
    if not math.isfinite(params.logit_scale):
        raise ValueError(f"logit_scale must be finite; got {params.logit_scale}")
    if targets.device.type == "cpu" and targets.numel():
        V = weight.shape[0]
        bad = (targets != params.ignore_index) & ((targets < 0) | (targets >= V))
        if bad.any():
            row = int(bad.reshape(-1).nonzero()[0])
            raise ValueError(f"targets must be in [0, {V}) or ignore_index={params.ignore_index}; "
                             f"got {int(targets.reshape(-1)[row])} at row {row}")


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, *, temperature: float = 1.0, softcap: float | None = None,
                    logit_scale: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    impl: str = "auto"):
    """Per-token log-probabilities of ``targets`` (and the entropy) under ``softmax(hidden @ weight.T)``.

    Same as ``torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[..., None])[..., 0]``
    (with the logit processing below), without building the ``[N, V]`` logits on the fused impls.

    Per row, ``z = softcap * tanh(logit_scale * (h @ W.T + b) / softcap) / temperature``;
    ``logprob = z[target] - logsumexp(z)``; ``entropy = logsumexp(z) - sum(softmax(z) * z)``.

    Args:
        hidden: ``[..., D]`` float32/bfloat16/float16/float64 final hidden states.
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``.
        targets: ``[...]`` int32/int64 token ids in ``[0, V)``, or ``ignore_index`` (gives 0 and no gradient).
        bias: optional ``[V]`` LM-head bias, same dtype as ``weight``.
        temperature: divides the processed logits; > 0.
        softcap: ``c`` of ``c * tanh(x / c)`` (Gemma-2 style final-logit soft-capping); None disables it.
        logit_scale: multiplies the raw logits before the softcap (e.g. Cohere's ``logit_scale``).
        ignore_index: target value of rows to skip.
        return_entropy: also return the entropy of each row's distribution.
        impl: ``"auto"`` or one of the implementations (see ``fastalign._backend``).

    Returns:
        ``logprobs [...]`` float32, or ``(logprobs, entropy)`` when ``return_entropy``.

    Example:
        >>> h, W = torch.randn(4, 8), torch.randn(10, 8)
        >>> lp = linear_logprobs(h, W, torch.tensor([1, 2, -100, 9]))
    """
    params = LogprobsParams(temperature=float(temperature), softcap=None if softcap is None else float(softcap),
                            logit_scale=float(logit_scale), ignore_index=int(ignore_index),
                            return_entropy=bool(return_entropy))
    _check_args(hidden, weight, targets, bias, params)
    impl = resolve_impl(impl, hidden.device, op="linear_logprobs", impls=IMPLS)
    lead = hidden.shape[:-1]
    h2, t1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = naive.linear_logprobs(h2, weight, t1, bias, params.temperature, params.softcap, params.logit_scale,
                                params.ignore_index, params.return_entropy)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
