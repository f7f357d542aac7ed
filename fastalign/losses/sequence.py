"""Per-sequence sums of token log-probabilities from hidden states: the one path from ``(hidden, weight, labels)``
to sequence log-probabilities that the DPO losses and the trainer's :class:`fastalign.hf.SequenceLogps` share.

:func:`fastalign.linear_logprobs` (float32 token log-probabilities, no ``[tokens, V]`` logits on the fused impls)
then :func:`fastalign.segment_sum` (float64 accumulation per sequence, rounded once to float32).
"""

from __future__ import annotations

import torch

from fastalign.ops.logprobs import linear_logprobs
from fastalign.ops.segment_sum import segment_sum


def _sequence_offsets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Packed offsets of the sequences: ``cu_seqlens`` itself, or ``[0, T, 2T, ...]`` for padded ``[S, T]``."""
    if cu_seqlens is not None:
        return cu_seqlens
    S, T = labels.shape
    return torch.arange(0, S * T + 1, T, device=labels.device, dtype=torch.int64)


def _completion_lengths(labels: torch.Tensor, offsets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Tokens per sequence whose label is not ``ignore_index``, as exact int64 counts ``[S]``."""
    tokens_before = torch.cat([labels.new_zeros(1, dtype=torch.int64),
                               (labels.reshape(-1) != ignore_index).cumsum(0)])
    return tokens_before[offsets[1:].long()] - tokens_before[offsets[:-1].long()]


def _sequence_sums(hidden, weight, labels, bias, offsets, ignore_index, temperature, softcap, logit_scale, impl):
    token_logps = linear_logprobs(hidden, weight, labels, bias, temperature=temperature, softcap=softcap,
                                  logit_scale=logit_scale, ignore_index=ignore_index, impl=impl)
    return segment_sum(token_logps.reshape(-1), offsets, impl="torch" if impl == "torch" else "auto")


def sequence_logps(hidden, weight, labels, bias=None, *, cu_seqlens=None, ignore_index=-100, temperature=1.0,
                   softcap=None, logit_scale=1.0, impl="auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of the completion tokens' log-probabilities, and the completion lengths.

    Same as ``(log_softmax(hidden @ weight.T + bias).gather(-1, labels) * mask).sum(-1)`` (``mask = labels !=
    ignore_index``) for padded ``hidden [S, T, D]``, ``labels [S, T]``, or per ``cu_seqlens`` segment for packed
    ``hidden [N, D]``, ``labels [N]``; built on :func:`fastalign.linear_logprobs`, so no logits on the fused impls.
    Returns ``(sums [S] float32 (float64 for float64 inputs), lengths [S] int64)``. Arguments are not validated
    here beyond what ``linear_logprobs`` and ``segment_sum`` check; see :func:`fused_linear_dpo_loss`.
    """
    offsets = _sequence_offsets(labels, cu_seqlens)
    sums = _sequence_sums(hidden, weight, labels, bias, offsets, ignore_index, temperature, softcap, logit_scale,
                          impl)
    return sums, _completion_lengths(labels, offsets, ignore_index)
