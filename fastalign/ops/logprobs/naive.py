"""Reference linear_logprobs: materializes the logits, written to be read. The spec of every other impl.

In :func:`linear_logprobs` (the spec the tests measure every impl against) the logit product runs in the inputs'
dtype (as user code would: ``hidden @ weight.T`` in bf16 gives bf16 logits), everything after it in float32, or
float64 when the inputs are float64; autograd gives the gradients. The launchers of the ``torch`` impl below (the
fallback without the extension) accumulate their logit blocks in float32, like the fused impls.
"""

from __future__ import annotations

import torch

from fastalign._utils import new_output


def processed_logits(hidden, weight, bias=None, temperature=1.0, softcap=None, logit_scale=1.0):
    """``z = softcap_c(logit_scale * (hidden @ weight.T + bias)) / temperature`` as float32 (float64)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return _process(logits.to(acc), temperature, softcap, logit_scale)


def _process(z, temperature, softcap, logit_scale):
    """``softcap_c(logit_scale * z) / temperature`` of raw logits ``z`` (float32/64)."""
    if logit_scale != 1.0:  # (multiplying or dividing by 1 is exact: skipped for speed only)
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature if temperature != 1.0 else z


def linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0, softcap=None, logit_scale=1.0,
                    ignore_index=-100, return_entropy=False):
    """``log_softmax(z).gather(targets)`` (and the entropy of softmax(z)) for ``hidden [N, D]``, ``weight [V, D]``.

    Rows whose target is ``ignore_index`` give 0. Returns ``logprobs [N]`` or ``(logprobs [N], entropy [N])``.
    """
    z = processed_logits(hidden, weight, bias, temperature, softcap, logit_scale)
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logprobs = torch.where(valid, logp.gather(-1, safe_targets[:, None].long()).squeeze(-1), 0.0)
    if not return_entropy:
        return logprobs
    # p log p = 0 at p = 0 (a -inf logit): log p is replaced before the product, so neither the value nor the
    # gradient sees 0 * -inf
    p = logp.exp()
    entropy = torch.where(valid, -(p * torch.where(p > 0, logp, 0.0)).sum(-1), 0.0)
    return logprobs, entropy


# Launchers of the ``torch`` impl (the contract in api.py), built on the reference above. They materialize the
# logits, but of one fixed-size block of rows at a time, zero-padded to _ROWS rows: every logit product then
# has the same shape whatever N is, so a row's result does not depend on N, its neighbours or its position
# (batch invariance; a BLAS may pick another kernel for another M), and memory is _ROWS x V, not N x V.

_ROWS = 64
_CHUNK_BYTES = 16 << 20  # the float32 copy of one vocabulary chunk of a weight that is not float32 and contiguous


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _weight_chunks(weight):
    """Yield ``(cols, w)``: vocabulary slices of ``weight`` and those rows in the accumulation dtype, contiguous.

    A float32 (float64) contiguous weight is one chunk, itself; any other (bf16/fp16, or expanded with stride 0)
    is upcast chunk by chunk, ``_CHUNK_BYTES`` at a time (a function of V and D only, never of N), so no
    ``[V, D]`` float32 copy is ever made."""
    acc, (V, D) = _acc(weight), weight.shape
    if weight.dtype == acc and weight.is_contiguous():
        yield slice(0, V), weight
        return
    step = max(_ROWS, _CHUNK_BYTES // (max(D, 1) * torch.finfo(acc).bits // 8))
    for v0 in range(0, V, step):
        yield slice(v0, v0 + step), weight[v0:v0 + step].to(acc).contiguous()


def _block_logits(h, weight, bias, params):
    """Processed logits ``[R, V]`` (float32/64) of ``h [R, D]`` (accumulation dtype): float32 products whatever
    the inputs' dtype (16-bit operands are exact in float32), as the fused impls compute them."""
    chunks = _weight_chunks(weight)
    cols, w = next(chunks)
    if cols.stop >= weight.shape[0]:  # one chunk: the weight itself
        z = h @ w.T
    else:
        z = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
        z[:, cols] = h @ w.T
        for cols, w in chunks:
            z[:, cols] = h @ w.T
    if bias is not None:
        z += bias.to(h.dtype)
    return _process(z, params.temperature, params.softcap, params.logit_scale)


def _row_blocks(hidden, weight, bias, params):
    """Yield ``(rows, h, z)``: a slice of row indices, those rows of ``hidden`` in the accumulation dtype, and
    their processed logits (float32/64)."""
    acc = _acc(hidden)
    for start in range(0, hidden.shape[0], _ROWS):
        h = hidden[start:start + _ROWS].to(acc)
        padded = torch.nn.functional.pad(h, (0, 0, 0, _ROWS - h.shape[0]))
        yield slice(start, start + h.shape[0]), h, _block_logits(padded, weight, bias, params)[:h.shape[0]]


def linear_logprobs_fwd(hidden, weight, targets, bias, params):
    """``(lse, z_target, sum_pz)`` over this weight's vocabulary (``params.vocab_start`` offsets the targets);
    lse and sum_pz in float64."""
    acc = _acc(hidden)
    N, V = hidden.shape[0], weight.shape[0]
    lse = new_output((N,), dtype=torch.float64, device=hidden.device)
    z_target = new_output((N,), dtype=acc, device=hidden.device)
    sum_pz = new_output((N,), dtype=torch.float64, device=hidden.device) if params.return_entropy else None
    local = targets.long() - params.vocab_start
    owned = (local >= 0) & (local < V)
    local = local.clamp(0, max(V - 1, 0))
    for rows, _, z in _row_blocks(hidden, weight, bias, params):
        # lse = m + log s and sum_pz = m + sum_v p_v (z_v - m), m the row max, each added to m in float64:
        # the entropy lse - sum_pz then does not cancel when the logits are large.
        m = z.max(dim=-1, keepdim=True).values
        e = torch.sub(z, m).exp_()
        s = e.sum(-1)
        lse[rows] = m.squeeze(-1).double() + s.log().double()
        z_target[rows] = torch.where(owned[rows], z.gather(-1, local[rows, None]).squeeze(-1), 0.0)
        if sum_pz is not None:
            # p (z - m) = 0 where p = 0: z = -inf, or z - m overflowing to -inf (p log p = 0 at p = 0)
            sum_pz[rows] = m.squeeze(-1).double() + ((e * torch.where(e > 0, z - m, 0.0)).sum(-1) / s).double()
    return lse, z_target, sum_pz


def linear_logprobs_bwd(hidden, weight, targets, bias, lse, sum_pz, grad_logprobs, grad_entropy, params):
    """Closed-form gradients, accumulated in float32 (float64 for float64 inputs).

    With ``g = dL/dlogprob``, ``e = dL/dentropy`` and ``p = exp(z - lse)`` (``lse`` over the full vocabulary):
    ``dz_v = g (1[v = y] - p_v) - e p_v (z_v - sum_u p_u z_u)``; through ``1 / temperature``, the softcap
    (``d c tanh(x / c) / dx = 1 - tanh^2``) and ``logit_scale`` to the raw logits ``s``; then ``dh = ds W``,
    ``dW = ds^T h``, ``db = sum_n ds``.
    """
    acc = _acc(hidden)
    V = weight.shape[0]
    local = targets.long() - params.vocab_start
    owned = (local >= 0) & (local < V)
    grad_hidden = new_output(hidden.shape, dtype=acc, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if params.compute_grad_weight else None
    grad_bias = torch.zeros(V, dtype=acc, device=hidden.device) if bias is not None else None
    for rows, h, z in _row_blocks(hidden, weight, bias, params):
        p = torch.exp(z - lse[rows].to(acc)[:, None])
        g = grad_logprobs[rows].to(acc)
        dz = -g[:, None] * p
        mine = owned[rows].nonzero().squeeze(-1)
        dz[mine, local[rows][mine]] += g[mine]
        if grad_entropy is not None:  # (z - sum_pz) taken as 0 where p = 0, as in the forward
            centred = torch.where(p > 0, z - sum_pz[rows].to(acc)[:, None], 0.0)
            dz -= grad_entropy[rows].to(acc)[:, None] * p * centred
        ds = dz / params.temperature
        if params.softcap is not None:
            ds = ds * (1 - (z * (params.temperature / params.softcap)) ** 2)
        ds = ds * params.logit_scale
        dh = None  # sum over the weight's chunks, in order, of ds[:, chunk] W[chunk]
        for cols, w in _weight_chunks(weight):
            dh = ds[:, cols] @ w if dh is None else dh + ds[:, cols] @ w
        grad_hidden[rows] = dh
        if grad_weight is not None:
            grad_weight += ds.T @ h
        if grad_bias is not None:
            grad_bias += ds.sum(0)
    return grad_hidden, grad_weight, grad_bias
