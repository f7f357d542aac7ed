"""linear_logprobs: per-token log-probabilities (and entropy) from hidden states, never building logits.

Layers (STYLE.md 2): the impl modules' launchers ``linear_logprobs_fwd`` / ``linear_logprobs_bwd`` (no
autograd) -> :class:`LinearLogprobsFunction` -> :func:`linear_logprobs` (validation, docs, dispatch).

Launcher contract (``triton.py``, ``cpu.py``), for ``hidden [N, D]``, ``weight [V, D]``, ``targets [N]`` int64,
``bias [V] | None`` and :class:`LogprobsParams`:

- ``linear_logprobs_fwd(hidden, weight, targets, bias, params) -> (lse, z_target, sum_pz)``, float32 ``[N]``
  each (lse and sum_pz may be float64: the entropy ``lse - sum_pz`` then keeps its precision when the logits
  are large, where float32 values of |lse| ~ 1e4 would lose ~1e-3 to rounding; the torch and triton impls do
  this): the logsumexp of the processed logits ``z`` over this weight's vocabulary, the processed logit of the
  target when ``targets - params.vocab_start`` falls in ``[0, V)`` (else 0), and ``sum_v softmax(z)_v z_v``
  (``None`` unless ``params.return_entropy``). Rows whose target is ``ignore_index`` may hold anything finite.
- ``linear_logprobs_bwd(hidden, weight, targets, bias, lse, sum_pz, grad_logprobs, grad_entropy, params)
  -> (grad_hidden, grad_weight, grad_bias)`` given the full-vocabulary ``lse`` and ``sum_pz`` and the
  upstream gradients (already zero on ignored rows; ``grad_entropy`` is None without entropy). Gradients are
  accumulated in float32; ``grad_bias`` is None without bias. ``grad_weight`` may be None when
  ``params.compute_grad_weight`` is False (a frozen LM head); an impl may also compute it anyway. Rows with zero
  incoming gradient (``grad_logprobs``, and ``grad_entropy`` when given) contribute nothing, so a launcher may
  skip them (the cpp one does).
  The backward must be bitwise reproducible: two calls on the same inputs give the same bits (no atomics,
  fixed reduction orders; see ``deterministic`` in :func:`linear_logprobs`).

Fields of :class:`LogprobsParams` that launchers may leave unread (all have defaults): ``compute_grad_weight``
(True), ``vocab_size`` (the full vocabulary, ``V`` times the number of ranks under vocab-parallel; 0 = this
weight's ``V``), ``deterministic`` and ``process_group`` (read by the autograd Function, which combines the
ranks).
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass, field, replace

import torch

from fastalign._backend import resolve_impl
from fastalign._utils import FLOAT_DTYPES, check_same_device, check_tensor
from fastalign.ops.logprobs import naive

IMPLS = ("torch", "triton", "cpp")


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
    compute_grad_weight: bool = True
    vocab_size: int = 0
    process_group: object = field(default=None, compare=False, hash=False, repr=False)


def _check_args(hidden, weight, targets, bias, params: LogprobsParams):
    check_tensor(hidden, "hidden", min_ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor(weight, "weight", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(targets, "targets", dtypes=(torch.int32, torch.int64))
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}); got {weight.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}; "
                         f"got shape {tuple(weight.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have a hidden size D = hidden.shape[-1] >= 1; got shape {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must hold at least one vocabulary row (V >= 1); got shape {tuple(weight.shape)}")
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
    if targets.numel():
        _check_targets(targets, params.vocab_size or weight.shape[0], params.ignore_index)


def _check_ignore_index(ignore_index) -> int:
    """``ignore_index`` as an int64 value (targets are compared with it as int64 on every impl)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer; got {type(ignore_index).__name__}")
    if not -2**63 <= int(ignore_index) < 2**63:
        raise ValueError(f"ignore_index must be an integer in [-2**63, 2**63); got {ignore_index}")
    return int(ignore_index)


def _check_targets(targets, V: int, ignore_index: int) -> None:
    """Targets in ``[0, V)`` or ``ignore_index``: a ValueError on the CPU; on a GPU (and under torch.compile)
    a device-side assert (``torch._assert_async``), which costs a small reduction kernel and no host
    synchronization, and fails at the next synchronization point with a CUDA error naming the assert."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if targets.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"linear_logprobs: targets must be in [0, {V}) or ignore_index={ignore_index}")
        return
    if bad.any():
        row = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"targets must be in [0, {V}) or ignore_index={ignore_index}; "
                         f"got {int(targets.reshape(-1)[row])} at row {row}")


# cuBLAS workspace configurations that make its products bitwise reproducible (those torch's deterministic mode
# accepts, https://docs.nvidia.com/cuda/cublas/#results-reproducibility).
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def _check_deterministic(impl: str, device: torch.device, *, strict: bool = True) -> None:
    """``deterministic=True``: raise (warn unless ``strict``) where the chosen impl's backward could give other
    bits for the same inputs. The triton and cpp kernels never can (no atomics, fixed reduction orders), nor can the
    torch impl on the CPU; on CUDA the torch impl's products are cuBLAS's, reproducible only with a fixed workspace
    configuration."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if impl == "torch" and device.type == "cuda" and config not in _CUBLAS_DETERMINISTIC:
        why = (f"linear_logprobs: deterministic=True with impl='torch' on CUDA needs CUBLAS_WORKSPACE_CONFIG set to "
               f"one of {_CUBLAS_DETERMINISTIC} before CUDA starts (cuBLAS products are not reproducible otherwise); "
               f"got {config!r}. Set it, or use impl='triton' (deterministic as it is)")
        if strict:
            raise RuntimeError(why)
        warnings.warn(why, stacklevel=3)


def _launchers(impl: str):
    """The launchers of ``impl``'s module, imported on first use (import statements, which torch.compile can
    trace, rather than importlib)."""
    if impl == "torch":
        module = naive
    elif impl == "triton":
        from fastalign.ops.logprobs import triton as module
    elif impl == "cpp":
        from fastalign.ops.logprobs import cpu as module
    else:
        raise ValueError(f"linear_logprobs: no launchers for impl={impl!r}")
    return module.linear_logprobs_fwd, module.linear_logprobs_bwd


def _combine_ranks(lse, z_target, sum_pz, group):
    """Full-vocabulary ``(lse, z_target, sum_pz)`` from every rank's shard values: one all-gather of O(N)
    values, then the same fixed-order combination on every rank (so all ranks agree bitwise)."""
    import torch.distributed as dist

    parts = [lse, z_target] + ([sum_pz] if sum_pz is not None else [])
    mine = torch.stack([x.double() for x in parts])  # [2 or 3, N]
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine.contiguous(), group=group)
    every = torch.stack(gathered)  # [P, 2 or 3, N]
    lse_r = every[:, 0]
    m = lse_r.max(dim=0).values
    m = torch.where(torch.isfinite(m), m, 0.0)
    w = torch.exp(lse_r - m)  # each shard's share of the partition function, relative to the max
    total = w.sum(0)
    full_lse = m + torch.log(total)
    full_zt = every[:, 1].sum(0)  # only the rank that owns the target contributes a nonzero logit
    full_spz = None
    if sum_pz is not None:
        full_spz = (w / total * every[:, 2]).sum(0)
    return full_lse, full_zt, full_spz


def _sum_ranks_in_order(x, group):
    """The sum over the ranks of ``x``, added in rank order on every rank: the same bits on every rank and in every
    run, whatever algorithm the collective picks (an all-reduce's order is its own). Holds the P ranks' copies."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd of linear_logprobs over the launchers of ``params.impl``; saves only O(N) values (lse and, with
    entropy, sum_pz) besides the inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, params: LogprobsParams):
        fwd, _ = _launchers(params.impl)
        lse, z_target, sum_pz = fwd(hidden, weight, targets, bias, params)
        if params.process_group is not None:
            lse, z_target, sum_pz = _combine_ranks(lse, z_target, sum_pz, params.process_group)
        out = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        valid = targets != params.ignore_index
        # Clamped: logprob <= 0 and entropy >= 0 always (rounding could otherwise give +1e-7 or -1e-7).
        logprobs = torch.where(valid, (z_target - lse).to(out).clamp(max=0.0), 0.0)
        entropy = None
        if params.return_entropy:
            entropy = torch.where(valid, (lse - sum_pz).to(out).clamp(min=0.0), 0.0)
            sum_pz = sum_pz.to(out)
        ctx.save_for_backward(hidden, weight, targets, bias, lse.to(out), sum_pz)
        ctx.params = params
        return logprobs if entropy is None else (logprobs, entropy)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        hidden, weight, targets, bias, lse, sum_pz = ctx.saved_tensors
        params = replace(ctx.params, compute_grad_weight=bool(ctx.needs_input_grad[1]))
        # The clamps above only remove rounding noise: the gradient is that of the unclamped values.
        valid = targets != params.ignore_index
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        zero = torch.zeros((), dtype=acc, device=hidden.device)
        g = torch.where(valid, grad_logprobs.to(acc), zero) if grad_logprobs is not None else \
            torch.zeros(targets.shape, dtype=acc, device=hidden.device)
        e = None
        if params.return_entropy:
            e = torch.where(valid, grad_entropy.to(acc), zero) if grad_entropy is not None else torch.zeros_like(g)
        _, bwd = _launchers(params.impl)
        grad_hidden, grad_weight, grad_bias = bwd(hidden, weight, targets, bias, lse, sum_pz, g, e, params)
        if params.process_group is not None:  # each rank holds its shard's part of grad_hidden
            import torch.distributed as dist

            grad_hidden = grad_hidden.to(acc)
            if params.deterministic:
                grad_hidden = _sum_ranks_in_order(grad_hidden, params.process_group)
            else:
                dist.all_reduce(grad_hidden, group=params.process_group)
        grad_hidden = grad_hidden.to(hidden.dtype)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None and ctx.needs_input_grad[3] else None
        return grad_hidden, grad_weight, None, grad_bias, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, *, temperature: float = 1.0, softcap: float | None = None,
                    logit_scale: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    process_group=None, deterministic: bool = False, impl: str = "auto"):
    """Per-token log-probabilities of ``targets`` (and the entropy) under ``softmax(hidden @ weight.T)``.

    Same as ``torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[..., None])[..., 0]``
    (with the logit processing below), without building the ``[N, V]`` logits on the fused impls
    (``triton``, ``cpp``); the ``torch`` impl is the materializing reference.

    Per row, ``z = softcap * tanh(logit_scale * (h @ W.T + b) / softcap) / temperature``;
    ``logprob = z[target] - logsumexp(z)``; ``entropy = logsumexp(z) - sum(softmax(z) * z)``.
    Logprobs are clamped to ``<= 0`` and entropies to ``>= 0`` (only rounding can cross those bounds; the
    gradient is that of the unclamped values). Rows whose target is ``ignore_index`` give 0 and no gradient.

    Args:
        hidden: ``[..., D]`` float32/bfloat16/float16 final hidden states (float64 on the torch impl).
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``; with ``process_group``, this rank's
            contiguous vocabulary shard (rows ``[rank * V, (rank + 1) * V)`` of the full head; equal shards).
        targets: ``[...]`` int32/int64 token ids in ``[0, V_full)``, or ``ignore_index``. Checked with a
            ValueError for CPU tensors; on a GPU with a device-side assert (no host synchronization), which
            surfaces as a CUDA error at the next synchronization.
        bias: optional ``[V]`` LM-head bias (this rank's shard), same dtype as ``weight``.
        temperature: divides the processed logits; > 0.
        softcap: ``c`` of ``c * tanh(x / c)`` (Gemma-2 style final-logit soft-capping); None disables it.
        logit_scale: multiplies the raw logits before the softcap (e.g. Cohere's ``logit_scale``).
        ignore_index: target value of rows to skip.
        return_entropy: also return the entropy of each row's distribution (differentiable).
        process_group: vocab-parallel: combine the ranks' shards with one all-gather of O(N) values per call
            (and one all-reduce of grad_hidden in backward, an all-gather with ``deterministic``); ``hidden``
            and ``targets`` must be the same on every rank. None: the weight is the whole head.
        deterministic: guarantee a bitwise-reproducible backward (the same inputs give the same gradient bits).
            The impls' own backward passes always are (the triton and cpp kernels use no atomics and fixed
            reduction orders; the torch impl's row-block products are reproducible on the CPU), so on one device
            this costs nothing, except that the torch impl on CUDA raises unless ``CUBLAS_WORKSPACE_CONFIG`` is
            ``:4096:8`` or ``:16:8`` (cuBLAS is reproducible only then). With ``process_group``, the all-reduce
            of ``grad_hidden`` becomes an all-gather summed in rank order (memory: every rank's ``[N, D]``
            float32 part at once), identical on every rank and run. ``torch.use_deterministic_algorithms(True)``
            sets it too (its ``warn_only`` makes the CUDA check a warning).
        impl: ``"auto"`` or one of ``IMPLS`` (see ``fastalign._backend``).

    Returns:
        ``logprobs [...]`` float32 (float64 for float64 inputs on the torch impl), or ``(logprobs, entropy)``
        when ``return_entropy``. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.

    Example:
        >>> h, W = torch.randn(4, 8), torch.randn(10, 8)
        >>> lp, ent = linear_logprobs(h, W, torch.tensor([1, 2, -100, 9]), return_entropy=True)
        >>> bool((lp <= 0).all() and (ent >= 0).all())
        True
    """
    vocab_size = 0
    if process_group is not None:
        import torch.distributed as dist

        vocab_size = weight.shape[0] * dist.get_world_size(process_group) if isinstance(weight, torch.Tensor) else 0
    params = LogprobsParams(temperature=float(temperature), softcap=None if softcap is None else float(softcap),
                            logit_scale=float(logit_scale), ignore_index=_check_ignore_index(ignore_index),
                            return_entropy=bool(return_entropy),
                            deterministic=bool(deterministic) or torch.are_deterministic_algorithms_enabled(),
                            vocab_size=vocab_size, process_group=process_group)
    _check_args(hidden, weight, targets, bias, params)
    impl = resolve_impl(impl, hidden.device, op="linear_logprobs", impls=IMPLS)
    if params.deterministic:
        _check_deterministic(impl, hidden.device,
                             strict=bool(deterministic) or not torch.is_deterministic_algorithms_warn_only_enabled())
    vocab_start = 0
    if process_group is not None:
        import torch.distributed as dist

        vocab_start = dist.get_rank(process_group) * weight.shape[0]
    params = replace(params, impl=impl, vocab_start=vocab_start)
    lead = hidden.shape[:-1]
    h2, t1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long().contiguous()
    out = LinearLogprobsFunction.apply(h2, weight, t1, bias, params)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
