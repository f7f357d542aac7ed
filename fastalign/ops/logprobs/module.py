"""``nn.Module`` and Hugging Face entry points of linear_logprobs: "final hidden states + lm_head" in one call."""

from __future__ import annotations

import torch
from torch import nn

from fastalign.ops.logprobs.api import linear_logprobs


def _head_options(config) -> dict:
    """``softcap`` and ``logit_scale`` of a Hugging Face config: Gemma-2/3's ``final_logit_softcapping``,
    Cohere's ``logit_scale`` (multiplies the logits) and Granite's ``logits_scaling`` (divides them)."""
    options = {}
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        options["softcap"] = float(softcap)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    if scale != 1.0:
        options["logit_scale"] = scale
    return options


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

    @classmethod
    def from_causal_lm(cls, model: nn.Module, **options) -> LinearLogprobs:
        """The module for a Hugging Face causal LM: its output embedding (tied or not), with ``softcap`` and
        ``logit_scale`` read from ``model.config`` (``options`` override them)."""
        return cls(model.get_output_embeddings(), **{**_head_options(model.config), **options})

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor):
        return linear_logprobs(hidden, self.lm_head.weight, targets, getattr(self.lm_head, "bias", None),
                               **self.options)

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.options.items() if k != "process_group"}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())


def causal_lm_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       **options):
    """Next-token log-probabilities of ``input_ids`` under a Hugging Face causal LM, without its logits.

    Same as ``log_softmax(model(input_ids, attention_mask).logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])``
    (0 where ``attention_mask`` is 0 on the predicted token or on the position predicting it), but runs only
    the decoder
    (``model.get_decoder()``) and feeds its final hidden states with the output embedding to
    :class:`LinearLogprobs` (``softcap``/``logit_scale`` from the config; ``options`` as for
    :func:`fastalign.linear_logprobs`, e.g. ``return_entropy=True``).

    Shapes: ``input_ids [B, T]``, ``attention_mask [B, T] | None`` -> ``logprobs [B, T - 1]`` float32.

    Example:
        >>> lp = causal_lm_logprobs(model, batch["input_ids"], batch["attention_mask"])  # doctest: +SKIP
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = input_ids[:, 1:]
    ignore_index = options.get("ignore_index", -100)
    if attention_mask is not None:  # a padded token is not predicted, and a padded position predicts nothing
        targets = targets.masked_fill((attention_mask[:, 1:] == 0) | (attention_mask[:, :-1] == 0), ignore_index)
    return LinearLogprobs.from_causal_lm(model, **options)(hidden[:, :-1], targets)
