"""The one Hugging Face adapter: everything fastalign knows about ``transformers`` causal LMs lives here.

A causal LM computes ``logits = process(lm_head(transform(decoder(input_ids))))``. fastalign never builds those
``[tokens, vocab]`` logits: it runs the decoder to its final hidden states and hands them, with the output
embedding (tied or not) and the logit processing read from the config, to :func:`fastalign.linear_logprobs`.
This module holds that knowledge:

- :func:`output_head`: the LM head's weight and bias and its logit processing (softcap, logit scaling) as
  ``linear_logprobs`` options; a model whose processing is not supported raises :class:`UnsupportedModelError`.
- :func:`final_hidden`: the decoder's last hidden states for padded, packed (position ids) and varlen (flash-attn)
  batches.
- :func:`scored_tokens`: the token-level ``(hidden [N, D], targets [N], cu_seqlens [S + 1])`` of a batch's scored
  positions, grouped by sequence, which every trainer and loss consumes (:class:`SequenceLogps`,
  :class:`TokenLogps`, the critic's :class:`TokenValues`).
- :class:`ValueHead` (the critic's and the reward model's scalar head) and its save/load beside
  ``save_pretrained``.
- :func:`check_model`: the load-time self-check. A list of known logit transforms cannot be complete, so the
  adapter compares its fused log-probabilities with the model's own ``forward`` logits on two short sequences and
  refuses a model where they disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastalign.losses.sequence import sequence_logps
from fastalign.ops.logprobs.api import linear_logprobs


class UnsupportedModelError(ValueError):
    """The model's logits cannot be computed by the fused path (named architecture and reason)."""


# ---- the LM head ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """An LM head as ``linear_logprobs`` sees it: ``z = process(hidden @ weight.T + bias)``, with ``options``
    (``softcap``, ``logit_scale``) giving ``process``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    options: dict


def _architecture(model) -> str:
    config = getattr(model, "config", None)
    names = getattr(config, "architectures", None) or [type(model).__name__]
    return f"{names[0]} (model_type={getattr(config, 'model_type', '?')!r})"


def head_options(config) -> dict:
    """``linear_logprobs`` options (``softcap``, ``logit_scale``) of a config's logit processing.

    Gemma-2/3 ``final_logit_softcapping`` (``softcap * tanh(z / softcap)``), Cohere ``logit_scale`` (multiplies)
    and Granite ``logits_scaling`` (divides).
    """
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    options = {"softcap": float(softcap) if softcap else None, "logit_scale": scale}
    return options


def output_head(model) -> Head:
    """The LM head of ``model`` (its output embedding, tied or not) with its logit processing.

    Raises :class:`UnsupportedModelError`, naming the architecture, when the model has no linear ``[V, D]`` output
    embedding fastalign can use.
    """
    emb = model.get_output_embeddings()
    weight = getattr(emb, "weight", None)
    d = getattr(model.config, "hidden_size", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or (d and weight.shape[1] != d):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise UnsupportedModelError(
            f"{_architecture(model)}: its output embedding ({type(emb).__name__}, weight shape {shape}) is not a "
            f"linear [vocab, hidden_size={d}] layer on the decoder's final hidden states, so fastalign "
            f"cannot compute its log-probabilities without logits")
    bias = getattr(emb, "bias", None)
    return Head(weight, bias if isinstance(bias, torch.Tensor) else None, head_options(model.config))


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, **options):
    """``log_softmax(model's logits).gather(targets)`` from final hidden states ``[..., D]`` through ``model``'s
    LM head, without the logits: :func:`fastalign.linear_logprobs` with the head's processing; ``options`` are
    ``linear_logprobs``'s (``return_entropy``, ``temperature``, ``impl``, ...; they win over the head's)."""
    head = output_head(model)
    weight = head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    return linear_logprobs(hidden, weight, targets, bias, **{**head.options, **options})


# ---- the decoder -----------------------------------------------------------------------------------------------


def decoder(model) -> nn.Module:
    """The model without its LM head: the module whose forward returns ``last_hidden_state``."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model or dec is model.get_output_embeddings():
        dec = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(dec, nn.Module) or dec is model:
        raise UnsupportedModelError(f"{_architecture(model)}: cannot find its decoder (the model without its LM "
                                    f"head): get_decoder() returned {type(dec).__name__}")
    return dec


def final_hidden(model, input_ids, attention_mask=None, position_ids=None, cu_seqlens=None, max_seqlen=None):
    """The decoder's last hidden states ``[B, T, D]``.

    A padded batch gives ``attention_mask``; a packed one (:func:`fastalign.train.data.pack`) gives
    ``position_ids`` restarting at 0 per sequence, from which transformers keeps attention inside each sequence
    (a block-diagonal causal mask for SDPA/eager); flash-attn also gets the segments (``cu_seqlens``,
    ``max_seqlen``) for its varlen kernel, so it needs no mask and no host synchronization to find them.
    """
    kwargs = {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if cu_seqlens is not None:  # read by flash-attn's varlen path; the masked attentions ignore them
        kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen,
                      max_length_k=max_seqlen)
    return decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          **kwargs).last_hidden_state


def scored_positions(labels, seq_ids=None, num_seqs: int | None = None):
    """Select the scored positions: ``(mask [R, T-1], targets [N], order, cu [S+1])`` for next-token labels;
    the ``N`` targets of sequence ``s`` are ``targets[order][cu[s]:cu[s+1]]`` (``order`` None: as selected).

    Position ``t`` predicts ``labels[:, t + 1]``; positions whose label is -100 are not scored. Padded labels
    ``[B, T]`` hold one sequence per row (``S = B``); packed rows hold ``num_seqs`` sequences numbered by
    ``seq_ids`` (:func:`fastalign.train.data.pack`; a sequence's tokens are contiguous in its row).
    """
    targets = labels[:, 1:]
    mask = targets != -100
    order = None
    if seq_ids is None:
        counts = mask.sum(1)
    else:  # count the scored targets of each sequence and sort them by sequence (no host sync)
        seq = seq_ids[:, 1:][mask]
        counts = torch.zeros(num_seqs, dtype=torch.int64, device=labels.device)
        counts.index_add_(0, seq, torch.ones_like(seq))
        order = torch.sort(seq, stable=True).indices
    cu = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=labels.device)
    cu[1:] = counts.cumsum(0)
    return mask, targets[mask], order, cu


def scored_tokens(model, input_ids, labels, attention_mask=None, position_ids=None, seq_ids=None, seq_last=None,
                  cu_seqlens=None, max_seqlen=None):
    """``(hidden [N, D], targets [N], cu [S + 1])``: the final hidden state of every scored position (the one
    predicting a label != -100), its target, and the offsets of each sequence's tokens, grouped by sequence in the
    batch's sequence order. Padded (``attention_mask``) and packed (``position_ids``, ``seq_ids``, ``seq_last``,
    ``cu_seqlens``, ``max_seqlen``) batches give the same values."""
    hidden = final_hidden(model, input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen)
    mask, targets, order, cu = scored_positions(labels, seq_ids, None if seq_last is None else seq_last.shape[0])
    h = hidden[:, :-1][mask]
    if order is not None:  # packed: the targets grouped by sequence, in the batch's sequence order
        h, targets = h[order], targets[order]
    return h, targets, cu


class SequenceLogps(nn.Module):
    """Wrap a causal LM: ``forward(input_ids, attention_mask, labels) -> (logps [S], n_tokens [S])``.

    Same as ``log_softmax(lm(input_ids).logits[:, :-1]).gather(-1, labels[:, 1:]).masked_sum(-1)``, counting
    only labels != -100, without the logits. Wrapping the whole computation in one module lets DDP/FSDP hook
    its forward (FSDP2 has gathered the root's LM-head weight there). A padded batch has one sequence per row
    (``S = B``); a packed one (:func:`fastalign.train.data.pack`) holds ``S`` sequences, and gives the same values.

    Example:
        >>> policy = SequenceLogps(load_model("embedded"))
        >>> logps, n = policy(ids, mask, labels)   # ids/mask/labels [B, T]
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels, **batch):
        h, targets, cu = scored_tokens(self.lm, input_ids, labels, **batch)
        head = output_head(self.lm)
        bias = None if head.bias is None else head.bias.to(h.dtype)
        return sequence_logps(h, head.weight.to(h.dtype), targets, bias, cu_seqlens=cu, **head.options)

    def generate(self, **kwargs):
        """``self.lm.generate(**kwargs)`` (under FSDP2 registered as a forward method, so the root's sharded
        parameters are gathered around it)."""
        return self.lm.generate(**kwargs)


class TokenLogps(SequenceLogps):
    """Per-token form of :class:`SequenceLogps`: ``forward(...) -> (logps [N], entropy [N] | None, cu [S + 1])``,
    the scored tokens grouped by sequence (what PPO/GRPO losses and ``fastalign.gae``'s packed layout take)."""

    def __init__(self, lm, return_entropy: bool = False):
        super().__init__(lm)
        self.return_entropy = return_entropy

    def forward(self, input_ids, labels, **batch):
        h, targets, cu = scored_tokens(self.lm, input_ids, labels, **batch)
        out = head_logprobs(self.lm, h, targets, return_entropy=self.return_entropy)
        logps, entropy = out if self.return_entropy else (out, None)
        return logps, entropy, cu


# ---- value heads -----------------------------------------------------------------------------------------------


class ValueHead(nn.Linear):
    """A scalar head ``[D] -> [1]`` on final hidden states (the critic's values, the reward model's score)."""

    FILE = "value_head.safetensors"

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)
        nn.init.normal_(self.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.bias)

    def forward(self, hidden):
        return super().forward(hidden.to(self.weight.dtype)).squeeze(-1).float()

    def save(self, directory) -> None:
        """Write ``value_head.safetensors`` into ``directory`` (beside ``save_pretrained``'s files)."""
        from safetensors.torch import save_file

        save_file({"weight": self.weight.detach().contiguous(), "bias": self.bias.detach().contiguous()},
                  str(Path(directory) / self.FILE))

    @classmethod
    def load(cls, directory, hidden_size: int) -> ValueHead | None:
        """The head saved in ``directory``, or None when there is none."""
        from safetensors.torch import load_file

        path = Path(directory) / cls.FILE
        if not path.exists():
            return None
        head = cls(hidden_size)
        state = load_file(str(path))
        if tuple(state["weight"].shape) != (1, hidden_size):
            raise UnsupportedModelError(f"{path}: value head weight must be [1, {hidden_size}] (the model's "
                                        f"hidden_size); got {tuple(state['weight'].shape)}")
        head.load_state_dict(state)
        return head


def hidden_size(lm) -> int:
    return int(lm.config.hidden_size)


class RewardModel(nn.Module):
    """A causal LM's decoder plus a :class:`ValueHead` read at each sequence's last real token.

    ``forward(input_ids, attention_mask) -> scores [B]`` (float32), or for a packed batch
    ``forward(input_ids, position_ids=..., seq_ids=..., seq_last=..., ...) -> scores [S]``. The head is saved
    beside the model as ``value_head.safetensors``.
    """

    def __init__(self, lm, value_head: ValueHead | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head if value_head is not None else ValueHead(hidden_size(lm))

    def forward(self, input_ids, attention_mask=None, position_ids=None, seq_ids=None, seq_last=None,
                cu_seqlens=None, max_seqlen=None, labels=None):
        hidden = final_hidden(self.lm, input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen)
        if seq_last is None:
            last = attention_mask.long().cumsum(1).argmax(1)  # index of the last real token (right padding)
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:  # packed: each sequence's last token, by its flattened index
            h = hidden.reshape(-1, hidden.shape[-1])[seq_last]
        return self.value_head(h)


class TokenValues(nn.Module):
    """The critic: a causal LM's decoder plus a :class:`ValueHead` at every scored position.

    ``forward(...) -> (values [N], cu [S + 1])`` on the positions :class:`TokenLogps` scores (the value of the
    state from which each completion token is generated), grouped by sequence the same way.
    """

    def __init__(self, lm, value_head: ValueHead | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head if value_head is not None else ValueHead(hidden_size(lm))

    def forward(self, input_ids, labels, **batch):
        h, _, cu = scored_tokens(self.lm, input_ids, labels, **batch)
        return self.value_head(h), cu


# ---- whole-model entry points and the self-check -----------------------------------------------------------------


def causal_lm_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       **options):
    """Next-token log-probabilities of ``input_ids`` under a Hugging Face causal LM, without its logits.

    Same as ``log_softmax(model(input_ids, attention_mask).logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])``
    (0 where ``attention_mask`` is 0 on the predicted token or on the position predicting it), but runs only the
    decoder and feeds its final hidden states with the output embedding to :func:`fastalign.linear_logprobs`
    (logit processing from the config; ``options`` as for ``linear_logprobs``, e.g. ``return_entropy=True``).

    Shapes: ``input_ids [B, T]``, ``attention_mask [B, T] | None`` -> ``logprobs [B, T - 1]`` float32.

    Example:
        >>> lp = causal_lm_logprobs(model, batch["input_ids"], batch["attention_mask"])  # doctest: +SKIP
    """
    hidden = final_hidden(model, input_ids, attention_mask)
    targets = input_ids[:, 1:]
    ignore_index = options.get("ignore_index", -100)
    if attention_mask is not None:  # a padded token is not predicted, and a padded position predicts nothing
        targets = targets.masked_fill((attention_mask[:, 1:] == 0) | (attention_mask[:, :-1] == 0), ignore_index)
    return head_logprobs(model, hidden[:, :-1], targets, **options)


@torch.no_grad()
def check_model(model, *, seed: int = 0) -> float:
    """Check that fastalign's fused log-probabilities of ``model`` equal those of its own logits; return the max
    absolute error (nats per token). Raises :class:`UnsupportedModelError` naming the architecture and the error.

    Two short random sequences (7 tokens, and 5 right-padded), in the model's dtype on its device, in eval mode;
    the tolerance is 1e-3 nats (+1e-3 relative) in float32/float64 and 0.1 (+2e-2 relative) in 16-bit dtypes,
    far below the 20+ nats per token a missing logit transform costs.
    """
    param = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    vocab = output_head(model).weight.shape[0]
    ids = torch.randint(vocab, (2, 7), generator=g).to(param.device)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    was_training = model.training
    model.eval()
    try:
        got = causal_lm_logprobs(model, ids, mask)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    except UnsupportedModelError:
        raise
    except Exception as e:  # a crash inside the model's own code is reported as the model's, with its cause
        raise UnsupportedModelError(f"{_architecture(model)}: the self-check failed to run: "
                                    f"{type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    valid = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    err = float((got - want).abs()[valid].max())
    scale = float(want.abs()[valid].max())
    atol, rtol = (1e-3, 1e-3) if param.dtype in (torch.float32, torch.float64) else (0.1, 2e-2)
    if not err <= atol + rtol * scale:  # (NaN fails too)
        raise UnsupportedModelError(
            f"{_architecture(model)}: fastalign's log-probabilities differ from the model's own logits by up to "
            f"{err:.3g} nats per token (tolerance {atol + rtol * scale:.3g}): its logit processing is not one "
            f"fastalign knows (options read from the config: {output_head(model).options}). Pass "
            f"check_model=false only if you know the fused path is right for this model.")
    return err
