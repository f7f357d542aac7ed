"""``nn.Module`` form of linear_logprobs: "final hidden states + lm_head" in one call (for a whole Hugging Face
causal LM, see :func:`fastalign.hf.causal_lm_logprobs`)."""

from __future__ import annotations

import torch
from torch import nn

from fastalign.ops.logprobs.api import linear_logprobs


class LinearLogprobs(nn.Module):
    """Log-probabilities of the targets (and entropies) through an LM head, never building the logits.

    Replaces ``torch.log_softmax(lm_head(hidden), -1).gather(-1, targets[..., None])[..., 0]``. The module holds
    a reference to ``lm_head`` (an ``nn.Linear`` of shape ``[V, D]``, or any module with ``weight`` and
    optional ``bias``), so a weight tied to the input embedding stays tied and trains as usual. The options
    are those of :func:`fastalign.linear_logprobs`, fixed at construction.

    Shapes: ``hidden [..., D]``, ``targets [...]`` -> ``logprobs [...]`` float32 (and ``entropy [...]``).

    Example:
        >>> head = nn.Linear(16, 100, bias=False)
        >>> lp = LinearLogprobs(head)(torch.randn(2, 5, 16), torch.randint(0, 100, (2, 5)))
        >>> lp.shape
        torch.Size([2, 5])
    """

    def __init__(self, lm_head: nn.Module, *, temperature: float = 1.0, softcap: float | None = None,
                 logit_scale: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                 process_group=None, deterministic: bool = False, impl: str = "auto"):
        super().__init__()
        if not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
            raise TypeError(f"lm_head must be a module with a weight tensor (e.g. nn.Linear); got "
                            f"{type(lm_head).__name__}")
        self.lm_head = lm_head
        self.options = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                            ignore_index=ignore_index, return_entropy=return_entropy, process_group=process_group,
                            deterministic=deterministic, impl=impl)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor):
        return linear_logprobs(hidden, self.lm_head.weight, targets, getattr(self.lm_head, "bias", None),
                               **self.options)

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.options.items() if k != "process_group"}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())
