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
