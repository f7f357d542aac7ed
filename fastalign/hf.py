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

from collections.abc import Callable
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
    """An LM head as ``linear_logprobs`` sees it: ``z = process(transform(hidden) @ weight.T + bias)``, with
    ``options`` (``softcap``, ``logit_scale``) giving ``process`` and ``transform`` (None: identity) the model's own
    layers between the decoder's final hidden states and the linear layer (BERT-style dense + activation +
    LayerNorm heads; differentiable, so gradients reach them)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    options: dict
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def inputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the linear layer sees: ``transform(hidden)`` (``hidden`` itself without a transform)."""
        return hidden if self.transform is None else self.transform(hidden)


def _architecture(model) -> str:
    config = getattr(model, "config", None)
    names = getattr(config, "architectures", None) or [type(model).__name__]
    return f"{names[0]} (model_type={getattr(config, 'model_type', '?')!r})"


# Every config attribute fastalign knows to process the logits, written once: (attribute, model types it means
# this for (None: every other model), what it does). "softcap": z = c * tanh(z / c); "multiply" / "divide":
# logit_scale *= or /= the value. The first row of an attribute whose model types match wins. A scale applied to
# the hidden states before a bias-free LM head (MiniCPM3, Inkling) is the same scale on the logits. As read in
# transformers 5.24's modeling code; :func:`check_model` catches what this table misses.
LOGIT_PROCESSING = (
    ("final_logit_softcapping", None, "softcap"),  # Gemma 2/3/3n/4, VaultGemma, nanochat, Beam, Inkling-2
    ("logits_soft_cap", None, "softcap"),  # RecurrentGemma
    ("output_logit_soft_cap", None, "softcap"),  # xLSTM
    ("logit_scale", None, "multiply"),  # Cohere, Cohere2 (MoE), Cohere Compass
    ("logits_scaling", ("hyperclovax",), "multiply"),  # HyperCLOVAX: lm_head(h) * logits_scaling
    ("logits_scaling", None, "divide"),  # the Granite family: lm_head(h) / s; MiniCPM3: lm_head(h / s)
    ("lm_head_multiplier", None, "multiply"),  # FalconH1
    ("logits_mup_width_multiplier", None, "divide"),  # Inkling: lm_head(h / m)
)


def head_options(config) -> dict:
    """``linear_logprobs`` options (``softcap``, ``logit_scale``) of a config's logit processing, by
    :data:`LOGIT_PROCESSING` (read from the text config of a multimodal model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = {getattr(config, "model_type", None), getattr(text, "model_type", None)}
    softcap, scale, seen = None, 1.0, set()
    for attribute, model_types, how in LOGIT_PROCESSING:
        if attribute in seen or (model_types is not None and not types & set(model_types)):
            continue
        seen.add(attribute)
        value = getattr(text, attribute, None)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value == 0:  # unset: none
            continue
        if how == "softcap":
            softcap = float(value)
        else:
            scale = scale * float(value) if how == "multiply" else scale / float(value)
    return {"softcap": softcap, "logit_scale": scale}


# Model types whose logits fastalign cannot compute from the decoder's final hidden states, and why.
UNSUPPORTED = {
    "prophetnet": "its logits come from the n-gram predicting streams, not from the decoder's main-stream "
                  "last_hidden_state",
}
# LM-head transforms that sit beside the output embedding instead of around it: model type -> the child module
# the model's forward applies to the final hidden states before the output embedding.
SIDE_TRANSFORMS = {"electra": "generator_predictions", "modernbert-decoder": "lm_head"}


class _Captured(Exception):
    def __init__(self, value):
        super().__init__()
        self.value = value


def _inputs_of(model, head: nn.Module, emb: nn.Module):
    """The transform of an LM head module that wraps its output embedding (BERT's ``cls``, RoBERTa's ``lm_head``):
    ``hidden -> `` what ``head``'s own forward feeds ``emb``, computed by running it up to ``emb`` and no further."""

    def hook(module, args):
        raise _Captured(args[0])

    def transform(hidden):
        handle = emb.register_forward_pre_hook(hook)
        try:
            head(hidden)
        except _Captured as captured:
            return captured.value
        finally:
            handle.remove()
        raise UnsupportedModelError(f"{_architecture(model)}: its LM head ({type(head).__name__}) did not call its "
                                    f"output embedding ({type(emb).__name__}) on the final hidden states")

    return transform


def _head_transform(model, emb: nn.Module):
    """The layers the model applies between the decoder's final hidden states and ``emb`` (None: none)."""
    side = SIDE_TRANSFORMS.get(getattr(model.config, "model_type", None))
    if side is not None:
        return getattr(model, side)
    path = next((name for name, m in model.named_modules() if m is emb), None)
    if path is None or "." not in path:  # the output embedding is a direct child: nothing in between
        return None
    parent = model.get_submodule(path.split(".")[0])
    inputs = model.get_input_embeddings()
    if any(m is inputs for m in parent.modules()):  # it lives inside the decoder (or the whole model)
        return None
    return _inputs_of(model, parent, emb)


def output_head(model, *, allow_transform: bool = False) -> Head:
    """The LM head of ``model`` (its output embedding, tied or not) with its logit processing.

    A BERT-style head (dense + activation + LayerNorm before the linear layer) comes back with its ``transform``
    when ``allow_transform`` (callers then feed :meth:`Head.inputs` to the linear layer); a caller that feeds the
    hidden states to ``weight`` directly leaves it False and gets the error instead of wrong values.

    Raises :class:`UnsupportedModelError`, naming the architecture, when the model has no linear ``[V, D]`` output
    embedding fastalign can use, or a head transform the caller does not apply.
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type in UNSUPPORTED:
        raise UnsupportedModelError(f"{_architecture(model)}: {UNSUPPORTED[model_type]}, so fastalign cannot "
                                    f"compute its log-probabilities from them")
    emb = model.get_output_embeddings()
    weight = getattr(emb, "weight", None)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    transform = _head_transform(model, emb) if isinstance(emb, nn.Module) else None
    d = None if transform is not None else getattr(text, "hidden_size", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or (d and weight.shape[1] != d):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise UnsupportedModelError(
            f"{_architecture(model)}: its output embedding ({type(emb).__name__}, weight shape {shape}) is not a "
            f"linear [vocab, hidden_size={d}] layer on the decoder's final hidden states, so fastalign "
            f"cannot compute its log-probabilities without logits")
    if transform is not None and not allow_transform:
        raise UnsupportedModelError(
            f"{_architecture(model)}: its LM head transforms the final hidden states before the linear layer "
            f"(BERT-style); this caller feeds them to the linear layer directly. Use head_logprobs / "
            f"causal_lm_logprobs, which apply the transform.")
    bias = getattr(emb, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    vocab = getattr(text, "unpadded_vocab_size", None)  # Inkling: logits cut to the unpadded vocabulary
    if isinstance(vocab, int) and 0 < vocab < weight.shape[0]:
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    return Head(weight, bias, head_options(model.config), transform)


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, **options):
    """``log_softmax(model's logits).gather(targets)`` from final hidden states ``[..., D]`` through ``model``'s
    LM head, without the logits: :func:`fastalign.linear_logprobs` with the head's processing; ``options`` are
    ``linear_logprobs``'s (``return_entropy``, ``temperature``, ``impl``, ...; they win over the head's). A
    BERT-style head's transform is applied to ``hidden`` first."""
    head = output_head(model, allow_transform=True)
    hidden = head.inputs(hidden)
    weight = head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    return linear_logprobs(hidden, weight, targets, bias, **{**head.options, **options})


# ---- the decoder -----------------------------------------------------------------------------------------------


def decoder(model) -> nn.Module:
    """The model without its LM head: the module whose forward returns ``last_hidden_state``.

    ``get_decoder()`` when it is such a module, else the base model (``base_model_prefix``), else the one child
    that holds the input embeddings and not the output embedding (``get_decoder()`` returns the CausalLM itself on
    Llama-4 text and the LM head on the ModernBERT decoder).
    """
    out = model.get_output_embeddings()
    try:
        inputs = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        inputs = None
    if inputs is None:
        inputs = nn.Module()  # held by nothing: no candidate qualifies

    def is_decoder(m) -> bool:
        if not isinstance(m, nn.Module) or m is model:
            return False
        inside = [x for x in m.modules() if x is inputs or x is out]
        return any(x is inputs for x in inside) and (out is inputs or not any(x is out for x in inside))

    got = model.get_decoder() if hasattr(model, "get_decoder") else None
    candidates = [got, getattr(model, getattr(model, "base_model_prefix", "") or "model", None)]
    found = next((m for m in candidates if is_decoder(m)), None)
    if found is None:
        children = [m for m in model.children() if is_decoder(m)]
        found = children[0] if len(children) == 1 else None
    if found is None:
        raise UnsupportedModelError(f"{_architecture(model)}: cannot find its decoder (the module holding the input "
                                    f"embeddings and not the LM head): get_decoder() returned {type(got).__name__}")
    return found


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
        head = output_head(self.lm, allow_transform=True)
        h = head.inputs(h)
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

    Two short random sequences (7 tokens, and 5 right-padded), in the model's dtype on its device, in eval mode,
    through both paths: :func:`causal_lm_logprobs` (per token) and the trainers' :class:`SequenceLogps` (per
    sequence, per scored token). The tolerance is 1e-3 nats (+1e-3 relative) in float32/float64 and 0.1 (+2e-2
    relative) in 16-bit dtypes, far below the 20+ nats per token a missing logit transform costs.
    """
    param = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    vocab = output_head(model, allow_transform=True).weight.shape[0]
    ids = torch.randint(vocab, (2, 7), generator=g).to(param.device)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    was_training = model.training
    model.eval()
    path = "causal_lm_logprobs"
    try:
        got = causal_lm_logprobs(model, ids, mask)
        path = "the trainers' SequenceLogps"
        seq, n = SequenceLogps(model)(ids, ids.masked_fill(mask == 0, -100), attention_mask=mask)
        path = "the model's own forward"
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{e} (the self-check, in {path})") from e
    except Exception as e:  # a crash inside the model's own code is reported as the model's, with its cause
        raise UnsupportedModelError(f"{_architecture(model)}: the self-check failed to run {path}: "
                                    f"{type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    valid = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    scale = float(want.abs()[valid].max())
    atol, rtol = (1e-3, 1e-3) if param.dtype in (torch.float32, torch.float64) else (0.1, 2e-2)
    errors = {"causal_lm_logprobs": float((got - want).abs()[valid].max()),  # per sequence over its tokens:
              "the trainers' SequenceLogps": float(((seq.float() - (want * valid).sum(1)).abs() / n).max())}
    for path, err in errors.items():
        if not err <= atol + rtol * scale:  # (NaN fails too)
            raise UnsupportedModelError(
                f"{_architecture(model)}: fastalign's log-probabilities ({path}) differ from the model's own logits "
                f"by up to {err:.3g} nats per token (tolerance {atol + rtol * scale:.3g}): its logit processing is "
                f"not one fastalign knows (options read from the config: "
                f"{output_head(model, allow_transform=True).options}). Pass check_model=false only if you know "
                f"the fused path is right for this model.")
    return max(errors.values())
