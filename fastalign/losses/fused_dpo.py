"""FusedLinearDPOLoss: the DPO family straight from final hidden states and the LM head, without logits.

Pipeline: :func:`fastalign.linear_logprobs` (per-token log-probabilities, float32, never ``[tokens, V]`` logits on
the fused impls) -> :func:`fastalign.segment_sum` (per-sequence sums) -> :func:`fastalign.dpo_loss`. Gradients flow
through the autograd of those public ops into the hidden states, the weight and the bias.

Precision: per-token log-probabilities are float32 (float64 for float64 inputs); each sequence's sum is
accumulated in float64 by ``segment_sum`` (a 32k-token sum of values near -2 would lose ~4 digits in float32)
and rounded once to float32; token counts are exact integers; the loss arithmetic and the batch means are float32
(float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from fastalign._utils import FLOAT_DTYPES, check_cu_seqlens, check_same_device, check_tensor
from fastalign.losses.dpo import BCORunningMean, DPOLossParams, _check_logps, dpo_loss_from_params
from fastalign.losses.sequence import _completion_lengths, _sequence_offsets, _sequence_sums


def _check_fused_args(hidden, weight, labels, bias, cu_seqlens, ref_chosen_logps, ref_rejected_logps,
                      ref_hidden, ref_weight, ref_bias) -> int:
    """Validate the layout and the reference arguments; return the number of pairs B."""
    check_tensor(hidden, "hidden", dtypes=FLOAT_DTYPES)
    check_tensor(labels, "labels", dtypes=(torch.int32, torch.int64))
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [2B, T, D] (padded; or [N, D] with cu_seqlens); got shape "
                             f"{tuple(hidden.shape)}")
        num_sequences = hidden.shape[0]
        what = "hidden.shape[0] (the stacked [chosen; rejected] batch)"
    else:
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [N, D] (packed tokens) when cu_seqlens is given; got shape "
                             f"{tuple(hidden.shape)}")
        check_cu_seqlens(cu_seqlens, hidden.shape[0])
        num_sequences = cu_seqlens.numel() - 1
        what = "the number of cu_seqlens segments (the stacked [chosen; rejected] sequences)"
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; "
                         f"got {tuple(labels.shape)}")
    if num_sequences == 0 or num_sequences % 2:
        raise ValueError(f"{what} must be even and > 0: the first half chosen, the second half rejected; "
                         f"got {num_sequences}")
    B = num_sequences // 2
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias, cu_seqlens=cu_seqlens,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                      ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    precomputed = ref_chosen_logps is not None or ref_rejected_logps is not None
    on_the_fly = ref_hidden is not None or ref_weight is not None or ref_bias is not None
    if precomputed and on_the_fly:
        raise ValueError("give the reference either as ref_chosen_logps/ref_rejected_logps or as ref_hidden/"
                         "ref_weight (and ref_bias), not both")
    if on_the_fly:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("an on-the-fly reference needs both ref_hidden and ref_weight; got only "
                             f"{'ref_hidden' if ref_weight is None else 'ref_weight'}")
        check_tensor(ref_hidden, "ref_hidden", dtypes=FLOAT_DTYPES)
        if ref_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"ref_hidden must cover the same tokens as hidden: shape {tuple(hidden.shape[:-1])} "
                             f"+ [D_ref]; got {tuple(ref_hidden.shape)}")
    return B


def fused_linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, *, ref_chosen_logps: torch.Tensor | None = None,
                          ref_rejected_logps: torch.Tensor | None = None, ref_hidden: torch.Tensor | None = None,
                          ref_weight: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
                          cu_seqlens: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                          softcap: float | None = None, logit_scale: float = 1.0, impl: str = "auto",
                          bco_state: BCORunningMean | None = None, **loss_options):
    """DPO-family loss from the policy's final hidden states and LM head, never building the logits.

    Same as the TRL-style code
    ``logps = (log_softmax(hidden @ weight.T + bias, -1).gather(-1, labels[..., None])[..., 0] * mask).sum(-1)``
    (``mask = labels != ignore_index``), the same for the reference model under ``no_grad``, then
    :func:`fastalign.dpo_loss` on the chosen half ``logps[:B]`` and the rejected half ``logps[B:]`` with the
    completion lengths; but built on :func:`fastalign.linear_logprobs` and :func:`fastalign.segment_sum`, so the
    fused impls hold no ``[tokens, V]`` buffer (the ``torch`` impl still materializes logits; ``impl`` picks).

    Layouts: padded ``hidden [2B, T, D]`` with ``labels [2B, T]``, or packed ``hidden [N, D]`` with ``labels [N]``
    and ``cu_seqlens [2B + 1]``. Sequences ``0..B-1`` are the chosen completions and ``B..2B-1`` the rejected ones
    of the same prompts. ``labels[i]`` is the target of ``hidden[i]`` (already shifted: the next token), with
    ``ignore_index`` on prompt and padding tokens; every sequence needs at least one completion token.

    Args:
        hidden, weight, labels, bias: the policy's hidden states, ``[V, D]`` LM-head weight, targets and
            optional ``[V]`` bias (gradients flow into hidden, weight and bias).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` precomputed reference log-probabilities (sums, or averages
            with ``average_log_prob=True``); or
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states (same tokens, its own D) and LM head,
            evaluated under ``no_grad`` with the same op; or neither, for reference-free loss types.
        cu_seqlens: ``[2B + 1]`` offsets of the packed sequences.
        ignore_index, temperature, softcap, logit_scale: as in :func:`fastalign.linear_logprobs` (also applied to
            the reference).
        impl: the ``linear_logprobs`` implementation (``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"``...).
        bco_state: the :class:`fastalign.BCORunningMean` of ``bco_pair`` (read with ``bco_shift=True`` only).
        **loss_options: :func:`fastalign.dpo_loss`'s options: ``beta``, ``loss_type``, ``loss_weights``,
            ``label_smoothing``, ``simpo_gamma``, ``cpo_alpha``, ``discopop_tau``, ``average_log_prob`` (divide
            the sums by the lengths before the loss), ``bco_shift`` (bco_pair's running-mean shift; off: TRL 1.16).
            The sft/NLL term (RPO) is ``loss_type=["sigmoid", "sft"]``.

    Returns:
        ``(loss, metrics)`` as :func:`fastalign.dpo_loss` returns them (TRL's metric names).

    Example:
        >>> B, T, D, V = 2, 6, 16, 50
        >>> hidden = torch.randn(2 * B, T, D, requires_grad=True)
        >>> weight, ref_weight = torch.randn(V, D, requires_grad=True), torch.randn(V, D)
        >>> labels = torch.randint(0, V, (2 * B, T)); labels[:, :2] = -100   # prompt tokens
        >>> loss, metrics = fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=torch.randn(2 * B, T, D),
        ...                                       ref_weight=ref_weight, beta=0.1, loss_type=["sigmoid", "sft"],
        ...                                       loss_weights=[1.0, 0.2])
        >>> loss.backward()
    """
    params = DPOLossParams.make(**loss_options)
    B = _check_fused_args(hidden, weight, labels, bias, cu_seqlens, ref_chosen_logps, ref_rejected_logps,
                          ref_hidden, ref_weight, ref_bias)
    offsets = _sequence_offsets(labels, cu_seqlens)
    lengths = _completion_lengths(labels, offsets, ignore_index)
    if not bool((lengths > 0).all()):  # one host sync per step on CUDA: a silent 0/0 would be worse
        seq = int((lengths == 0).nonzero()[0])
        raise ValueError(f"labels must give every sequence at least one completion token (a label != ignore_index="
                         f"{ignore_index}); sequence {seq} ({'chosen' if seq < B else 'rejected'} of pair "
                         f"{seq % B}) has none")
    op_options = (ignore_index, temperature, softcap, logit_scale, impl)
    sums = _sequence_sums(hidden, weight, labels, bias, offsets, *op_options)
    if ref_hidden is not None:
        with torch.no_grad():
            ref_sums = _sequence_sums(ref_hidden, ref_weight, labels, ref_bias, offsets, *op_options)
        ref_chosen_logps, ref_rejected_logps = ref_sums[:B], ref_sums[B:]
    if params.average_log_prob:
        sums = sums / lengths
        if ref_hidden is not None:
            ref_chosen_logps, ref_rejected_logps = ref_chosen_logps / lengths[:B], ref_rejected_logps / lengths[B:]
    chosen, rejected = sums[:B], sums[B:]
    _check_logps(chosen, rejected, ref_chosen_logps, ref_rejected_logps, lengths[:B], lengths[B:], params)
    return dpo_loss_from_params(chosen, rejected, ref_chosen_logps, ref_rejected_logps, lengths[:B], lengths[B:],
                                params, bco_state)


class FusedLinearDPOLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_dpo_loss`, holding the loss options (and bco_pair's state).

    Replaces materializing ``lm_head(hidden)`` for the policy and the reference and TRL's ``DPOTrainer`` loss;
    ``forward`` takes the tensors in the functional form's order and returns ``(loss, metrics)``.

    Example:
        >>> loss_fn = FusedLinearDPOLoss(beta=0.1, loss_type="sigmoid")
        >>> hidden, weight = torch.randn(4, 6, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
        >>> labels = torch.randint(0, 50, (4, 6)); labels[:, :2] = -100
        >>> loss, metrics = loss_fn(hidden, weight, labels, ref_chosen_logps=torch.full((2,), -20.0),
        ...                         ref_rejected_logps=torch.full((2,), -21.0))
    """

    def __init__(self, *, ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                 logit_scale: float = 1.0, impl: str = "auto", **loss_options):
        super().__init__()
        self.params = DPOLossParams.make(**loss_options)
        self.loss_options = dict(loss_options)
        self.op_options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                               logit_scale=logit_scale, impl=impl)
        self.bco_state = BCORunningMean() if "bco_pair" in self.params.loss_type and self.params.bco_shift else None

    def forward(self, hidden, weight, labels, bias=None, *, ref_chosen_logps=None, ref_rejected_logps=None,
                ref_hidden=None, ref_weight=None, ref_bias=None, cu_seqlens=None):
        return fused_linear_dpo_loss(hidden, weight, labels, bias, ref_chosen_logps=ref_chosen_logps,
                                     ref_rejected_logps=ref_rejected_logps, ref_hidden=ref_hidden,
                                     ref_weight=ref_weight, ref_bias=ref_bias, cu_seqlens=cu_seqlens,
                                     bco_state=self.bco_state, **self.op_options, **self.loss_options)

    def get_extra_state(self):
        """bco_pair's running mean travels in ``state_dict()`` (checkpoint and resume keep the shift)."""
        return None if self.bco_state is None else self.bco_state.state_dict()

    def set_extra_state(self, state) -> None:
        if state is not None and self.bco_state is not None:
            self.bco_state.load_state_dict(state)

    def extra_repr(self) -> str:
        p = self.params
        return f"beta={p.beta}, loss_type={list(p.loss_type)}, loss_weights={list(p.loss_weights)}"
