"""Model adapter: load a causal LM, run its decoder to the final hidden states, and score tokens without logits.

Any ``AutoModelForCausalLM`` loads from a local path (or a hub id when the network allows). Training and
reference scoring never build the ``[tokens, vocab]`` logits: the decoder's final hidden states go with the
output embedding (tied or not) to :func:`fastalign.linear_logprobs`, with the softcap
(``final_logit_softcapping``) and ``logit_scale`` read from the model config, then per-sequence sums come from
:func:`fastalign.segment_sum` over the packed completion tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fastalign.ops.logprobs import linear_logprobs
from fastalign.ops.segment_sum import segment_sum

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = "embedded"  # the model/tokenizer name that selects fastalign/assets/


def load_tokenizer(path: str):
    """The tokenizer at ``path`` (``"embedded"``: the character-level tokenizer of fastalign/assets/)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer") if path == EMBEDDED else path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(name: str, device: torch.device) -> str:
    """The ``attn_implementation`` to load models with: ``auto`` is ``flash_attention_2`` when flash-attn is
    installed (the ``[flash]`` extra) and the device is CUDA, else ``sdpa`` (PyTorch's
    scaled_dot_product_attention)."""
    if name == "auto":
        return "flash_attention_2" if device.type == "cuda" and flash_attn_installed() else "sdpa"
    if name == "flash_attention_2" and device.type != "cuda":
        from fastalign.train.config import ConfigError

        raise ConfigError(f"attn_implementation must be auto, sdpa or eager on device {device}; got "
                          f"flash_attention_2 (flash-attn runs on CUDA only)")
    return name


def load_model(path: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """The causal LM at ``path``; ``"embedded"`` builds the tiny Llama of fastalign/assets/ with a random init
    drawn from ``seed`` (the same weights for the same seed, whatever the global RNG state). ``attn_implementation``
    is transformers' (``sdpa``, ``eager``, ``flash_attention_2``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if path != EMBEDDED:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    config = AutoConfig.from_pretrained(str(ASSETS / "model"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype)


def load_policy(path: str, cfg, resume=None, attn_implementation: str = "sdpa"):
    """The model to train: ``load_model`` of ``resume`` (a checkpoint) or ``path``; with ``cfg.use_lora``, the
    model at ``path`` with LoRA adapters (peft), new or those saved in ``resume``. Gradient checkpointing is
    enabled when configured."""
    lm = load_model(str(resume) if resume and not cfg.use_lora else path, seed=cfg.seed, dtype=cfg.torch_dtype,
                    attn_implementation=attn_implementation)
    if cfg.gradient_checkpointing:
        enable_checkpointing(lm)
    if not cfg.use_lora:
        return lm
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume:
        return PeftModel.from_pretrained(lm, str(resume), is_trainable=True)
    targets = cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets[0] if targets == ["all-linear"] else targets)
    with torch.random.fork_rng(devices=[]):  # the adapters' random init, the same for the same seed
        torch.manual_seed(cfg.seed)
        return get_peft_model(lm, lora)


def save_merged(lm, directory) -> None:
    """``save_pretrained`` of ``lm``; a LoRA (peft) model saves its adapter in ``directory/adapter`` and then the
    model with the adapter merged into the weights (in place: ``lm`` keeps computing the same function)."""
    if hasattr(lm, "merge_and_unload"):
        lm.save_pretrained(str(Path(directory) / "adapter"))
        lm = lm.merge_and_unload()
    lm.save_pretrained(str(directory), safe_serialization=True)


def enable_checkpointing(lm) -> None:
    """Recompute the decoder layers' activations in backward (transformers 5's name, else the older one)."""
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable()
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lm_head_options(config) -> dict:
    """``softcap`` and ``logit_scale`` of the model's logit processing, read from its config."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return {"softcap": float(softcap) if softcap else None, "logit_scale": float(scale) if scale else 1.0}


def final_hidden(lm, input_ids, attention_mask=None, position_ids=None, cu_seqlens=None, max_seqlen=None):
    """The decoder's last hidden states ``[B, T, D]`` (``lm.get_decoder()``: the model without its LM head).

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
    return lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **kwargs).last_hidden_state


def packed_targets(labels, seq_ids=None, num_seqs: int | None = None):
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


@torch.no_grad()
def check_packing(lm, device, autocast) -> None:
    """Raise when ``lm`` does not keep packed sequences apart.

    Packing relies on the model turning restarting ``position_ids`` into a block-diagonal mask (transformers'
    masking utilities, >= 4.54) or into flash-attn varlen boundaries. A model that ignores them would let each
    packed sequence attend to the ones before it in the row, silently. This runs two short random sequences
    packed and alone, and compares the second one's hidden states.
    """
    from fastalign.train.data import pack, to_device

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(lm.config.vocab_size, (n,), generator=g).tolist() for n in (7, 5))
    # one row: a (the longer: first fit by decreasing length), then b
    batch = to_device(pack([a, b], [a, b]), device)
    alone_ids = torch.tensor([b], device=device)
    was_training = lm.training
    lm.eval()
    try:
        with autocast:
            low_precision = torch.is_autocast_enabled(torch.device(device).type) or lm.dtype != torch.float32
            packed = final_hidden(lm, batch["input_ids"], None, batch["position_ids"], batch["cu_seqlens"],
                                  batch["max_seqlen"])[0, len(a):].float()
            alone = final_hidden(lm, alone_ids, torch.ones_like(alone_ids))[0].float()
    finally:
        lm.train(was_training)
    err, scale = float((packed - alone).abs().max()), float(alone.abs().max())
    tol = 5e-2 if low_precision else 1e-3  # a leak across sequences changes the hidden states by O(scale)
    if not err <= tol * max(scale, 1.0):
        raise RuntimeError(
            f"packing=true needs a model whose attention keeps packed sequences apart: "
            f"{type(lm).__name__} with attn_implementation={getattr(lm.config, '_attn_implementation', '?')} "
            f"gives a packed sequence other hidden states than the same sequence alone (max abs difference "
            f"{err:.3g}, scale {scale:.3g}). Use packing=false, or a transformers >= 4.54 model built on its "
            f"masking utilities, or attn_implementation=flash_attention_2.")


class SequenceLogps(nn.Module):
    """Wrap a causal LM: ``forward(input_ids, attention_mask, labels) -> (logps [S], n_tokens [S])``.

    Same as ``log_softmax(lm(input_ids).logits[:, :-1]).gather(-1, labels[:, 1:]).masked_sum(-1)``, counting
    only labels != -100, without the logits. Wrapping the whole computation in one module lets DDP/FSDP hook
    its forward. A padded batch has one sequence per row (``S = B``); a packed one
    (:func:`fastalign.train.data.pack`: ``input_ids``/``labels``/``position_ids``/``seq_ids`` ``[R, W]``,
    ``seq_last`` ``[S]``, ``cu_seqlens``, ``max_seqlen``) holds ``S`` sequences, and gives the same values.

    Example:
        >>> policy = SequenceLogps(load_model("embedded"))
        >>> logps, n = policy(ids, mask, labels)   # ids/mask/labels [B, T]
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.head_options = lm_head_options(lm.config)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, seq_ids=None, seq_last=None,
                cu_seqlens=None, max_seqlen=None):
        hidden = final_hidden(self.lm, input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen)
        mask, targets, order, cu = packed_targets(labels, seq_ids, None if seq_last is None else seq_last.shape[0])
        head = self.lm.get_output_embeddings()
        h = hidden[:, :-1][mask]
        if order is not None:  # packed: the targets grouped by sequence, in the batch's sequence order
            h, targets = h[order], targets[order]
        weight = head.weight.to(h.dtype)
        bias = None if getattr(head, "bias", None) is None else head.bias.to(h.dtype)
        token_logps = linear_logprobs(h, weight, targets, bias, **self.head_options)
        return segment_sum(token_logps, cu), cu.diff()

    def generate(self, **kwargs):
        """``self.lm.generate(**kwargs)`` (under FSDP2 registered as a forward method, so the root's sharded
        parameters are gathered around it)."""
        return self.lm.generate(**kwargs)


class RewardModel(nn.Module):
    """A causal LM's decoder plus a scalar value head read at each sequence's last real token.

    ``forward(input_ids, attention_mask) -> scores [B]`` (float32), or for a packed batch
    ``forward(input_ids, position_ids=..., seq_ids=..., seq_last=..., ...) -> scores [S]``. The head is saved
    beside the model as ``value_head.safetensors`` (:func:`save_value_head` / :func:`load_value_head`).
    """

    def __init__(self, lm, value_head: nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head if value_head is not None else nn.Linear(lm.config.hidden_size, 1)
        if value_head is None:
            nn.init.normal_(self.value_head.weight, std=1.0 / (lm.config.hidden_size + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None, seq_ids=None, seq_last=None,
                cu_seqlens=None, max_seqlen=None):
        hidden = final_hidden(self.lm, input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen)
        if seq_last is None:
            last = attention_mask.long().cumsum(1).argmax(1)  # index of the last real token (right padding)
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:  # packed: each sequence's last token, by its flattened index
            h = hidden.reshape(-1, hidden.shape[-1])[seq_last]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()


def save_value_head(head: nn.Linear, directory) -> None:
    from safetensors.torch import save_file

    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(Path(directory) / "value_head.safetensors"))


def load_value_head(directory, hidden_size: int) -> nn.Linear | None:
    """The value head saved in ``directory``, or None when there is none."""
    from safetensors.torch import load_file

    path = Path(directory) / "value_head.safetensors"
    if not path.exists():
        return None
    head = nn.Linear(hidden_size, 1)
    head.load_state_dict(load_file(str(path)))
    return head


@torch.no_grad()
def greedy_complete(lm, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy completions (decoded text) of tokenized prompts (evaluation only: generation builds logits)."""
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    pad_id = tokenizer.pad_token_id
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            T = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for k, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[k, T - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[k, T - len(p):] = 1
            gen = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(gen[:, T:], skip_special_tokens=True)
    finally:
        lm.train(was_training)
    return out


def model_fingerprint(lm) -> str:
    """A short sha256 of the model's config and weights (keys the reference-logps cache)."""
    import hashlib

    h = hashlib.sha256(json.dumps(lm.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(lm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
