"""Reference linear_logprobs: materializes the logits, written to be read. The spec of every other impl.

The logit product runs in the inputs' dtype (as user code would: ``hidden @ weight.T`` in bf16 gives bf16
logits), everything after it in float32, or float64 when the inputs are float64. Autograd gives the
gradients.
"""

from __future__ import annotations

import torch


def processed_logits(hidden, weight, bias=None, temperature=1.0, softcap=None, logit_scale=1.0):
    """``z = softcap_c(logit_scale * (hidden @ weight.T + bias)) / temperature`` as float32 (float64)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    z = logits.to(acc) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


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
    entropy = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    return logprobs, entropy


# Launchers of the ``torch`` impl (the contract in api.py), built on the reference above: they materialize the
# [N, V] logits of this weight's vocabulary, and the backward applies the closed-form gradient of DESIGN.md.

def linear_logprobs_fwd(hidden, weight, targets, bias, params):
    """``(lse, z_target, sum_pz)`` over this weight's vocabulary (``params.vocab_start`` offsets the targets)."""
    z = processed_logits(hidden, weight, bias, params.temperature, params.softcap, params.logit_scale)
    lse = torch.logsumexp(z, dim=-1)
    local = targets.long() - params.vocab_start
    owned = (local >= 0) & (local < weight.shape[0])
    z_target = torch.where(owned, z.gather(-1, local.clamp(0, weight.shape[0] - 1)[:, None]).squeeze(-1), 0.0)
    sum_pz = None
    if params.return_entropy:
        # sum_v p_v z_v, written as m + sum_v p_v (z_v - m) with m the row max, so large logits cancel exactly.
        m = z.max(dim=-1, keepdim=True).values
        sum_pz = m.squeeze(-1) + (torch.softmax(z, dim=-1) * (z - m)).sum(-1)
    return lse, z_target, sum_pz


def linear_logprobs_bwd(hidden, weight, targets, bias, lse, sum_pz, grad_logprobs, grad_entropy, params):
    """Closed-form gradients, accumulated in float32 (float64 for float64 inputs).

    With ``g = dL/dlogprob``, ``e = dL/dentropy`` and ``p = exp(z - lse)`` (``lse`` over the full vocabulary):
    ``dz_v = g (1[v = y] - p_v) - e p_v (z_v - sum_u p_u z_u)``; through ``1 / temperature``, the softcap
    (``d c tanh(x / c) / dx = 1 - tanh^2``) and ``logit_scale`` to the raw logits ``s``; then ``dh = ds W``,
    ``dW = ds^T h``, ``db = sum_n ds``.
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = processed_logits(hidden, weight, bias, params.temperature, params.softcap, params.logit_scale)
    p = torch.exp(z - lse.to(acc)[:, None])
    local = targets.long() - params.vocab_start
    owned = (local >= 0) & (local < weight.shape[0])
    g = grad_logprobs.to(acc)
    dz = -g[:, None] * p
    rows = owned.nonzero().squeeze(-1)
    dz[rows, local[rows]] += g[rows]
    if grad_entropy is not None:
        dz -= grad_entropy.to(acc)[:, None] * p * (z - sum_pz.to(acc)[:, None])
    ds = dz / params.temperature
    if params.softcap is not None:
        ds = ds * (1 - (z * (params.temperature / params.softcap)) ** 2)
    ds = ds * params.logit_scale
    grad_hidden = ds @ weight.to(acc)
    grad_weight = ds.T @ hidden.to(acc) if params.compute_grad_weight else None
    grad_bias = ds.sum(0) if bias is not None else None
    return grad_hidden, grad_weight, grad_bias
