"""linear_logprobs launchers of the ``cpp`` impl: thin wrappers over fastalign._C's CPU kernels
(the torch.library ops ``fastalign::linear_logprobs_fwd`` / ``fastalign::linear_logprobs_bwd``, in
``csrc/cpu/logprobs.cpp``).

Design (details in the C++ file's header): the rows whose target is not ``ignore_index`` are packed into row
blocks of a fixed 64 rows (the last one zero-padded); the vocabulary is cut into 512-row tiles grouped into
chunks that run in parallel (``at::parallel_for``); each tile's logits come from one BLAS gemm of a fixed shape
and are reduced with an online logsumexp. Per thread the workspace is one ``[64, 512]`` logits tile (plus a
``[512, D]`` float32 copy of the weight tile for bf16/fp16 weights); the backward adds per-chunk ``[64, D]``
partials of ``grad_hidden`` (at most 32 MiB in all) and, for bf16/fp16 weights, the float32 accumulator of
``grad_weight``. Nothing of size N x V is ever allocated.

- Accumulation is float32 (float64 for float64 inputs, whose outputs are then float64 too).
- Batch invariance: a row's outputs are bitwise identical whatever N, the other rows, its position and the
  thread count.
- The backward is always bitwise reproducible (no atomics; fixed reduction orders), so the kernel takes no
  ``deterministic`` flag.
- Rows with no incoming gradient (PPO's clipped tokens, masked positions) are passed to the backward kernel as
  ignored, so they are left out of its row blocks (finding them costs no host sync on the CPU).
"""

from __future__ import annotations

import torch

from fastalign import _ext

if _ext.get() is not None:

    def _acc_dtype(hidden):
        return torch.float64 if hidden.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("fastalign::linear_logprobs_fwd")
    def _fwd_fake(hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index, vocab_start,
                  vocab_size):
        n = hidden.shape[0]
        return (hidden.new_empty(n, dtype=torch.float64), hidden.new_empty(n, dtype=_acc_dtype(hidden)),
                hidden.new_empty(n, dtype=torch.float64))

    @torch.library.register_fake("fastalign::linear_logprobs_bwd")
    def _bwd_fake(hidden, weight, targets, bias, lse, sum_pz, grad_logprobs, grad_entropy, temperature, softcap,
                  logit_scale, ignore_index, vocab_start, vocab_size, compute_grad_weight):
        V, D = weight.shape
        return (hidden.new_empty(hidden.shape), weight.new_empty((V if compute_grad_weight else 0, D)),
                weight.new_empty(V if bias is not None else 0))


def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None, params):
    """``(lse, z_target, sum_pz)`` [N] each for ``hidden [N, D]``, ``weight [V, D]``, ``targets [N]``.

    The contract is in ``fastalign/ops/logprobs/api.py``. ``lse`` and ``sum_pz`` are float64 (so that the
    entropy ``lse - sum_pz`` does not cancel at large logits), ``z_target`` float32 (float64 for float64
    inputs). ``sum_pz`` is None unless ``params.return_entropy`` (the kernel computes it anyway: two flops per
    logit). Ignored rows get 0 in all three. Targets outside ``[0, params.vocab_size or vocab_start + V)``
    raise a ValueError.

    Example:
        >>> from fastalign.ops.logprobs.api import LogprobsParams
        >>> h, W, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 9])
        >>> lse, z_y, sum_pz = linear_logprobs_fwd(h, W, y, None, LogprobsParams(return_entropy=True))
        >>> logprobs, entropy = z_y - lse, lse - sum_pz   # same as log_softmax(h @ W.T).gather(...), rows 0, 1, 3
    """
    lse, z_target, sum_pz = torch.ops.fastalign.linear_logprobs_fwd(
        hidden, weight, targets, bias, params.temperature, params.softcap, params.logit_scale,
        params.ignore_index, params.vocab_start, params.vocab_size)
    return lse, z_target, (sum_pz if params.return_entropy else None)


def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None, lse: torch.Tensor, sum_pz: torch.Tensor | None,
                        grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, params):
    """``(grad_hidden [N, D], grad_weight [V, D] | None, grad_bias [V] | None)`` in the inputs' dtype.

    ``lse`` (and ``sum_pz``, needed with ``grad_entropy``) are the full-vocabulary values of the forward,
    float32 or float64. Rows whose target is ``ignore_index``, and rows whose incoming gradients are zero, are
    skipped (zero gradient). ``grad_weight`` is None when ``params.compute_grad_weight`` is False (a frozen LM
    head: one gemm per tile less).
    """
    live = grad_logprobs != 0 if grad_entropy is None else (grad_logprobs != 0) | (grad_entropy != 0)
    targets = torch.where(live, targets, params.ignore_index)
    compute_grad_weight = params.compute_grad_weight
    grad_hidden, grad_weight, grad_bias = torch.ops.fastalign.linear_logprobs_bwd(
        hidden, weight, targets, bias, lse, sum_pz, grad_logprobs, grad_entropy, params.temperature,
        params.softcap, params.logit_scale, params.ignore_index, params.vocab_start,
        params.vocab_size, compute_grad_weight)
    return (grad_hidden, grad_weight if compute_grad_weight else None, grad_bias if bias is not None else None)
