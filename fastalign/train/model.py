"""Load, wrap and save the trainer's models (what they compute is :mod:`fastalign.hf`'s).

Any ``AutoModelForCausalLM`` loads from a local path (or a hub id when the network allows); ``"embedded"`` builds
the tiny Llama of ``fastalign/assets``. LoRA adapters (peft), gradient checkpointing, merged saves, greedy
generation for the exact-match evaluation and a fingerprint of the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastalign.assets import ASSETS, EMBEDDED


def load_tokenizer(path: str):
    """The tokenizer at ``path`` (``"embedded"``: the character-level tokenizer of fastalign/assets/)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer") if path == EMBEDDED else path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


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


@torch.no_grad()
def generate(lm, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 256,
             **sampling) -> list[list[int]]:
    """The tokens ``lm.generate`` adds to each tokenized prompt (KV cache, left-padded batches of ``batch_size``,
    eval mode, no gradient), cut after the first EOS (kept); ``sampling`` are ``generate``'s options
    (``do_sample``, ``temperature``, ``top_k``, ``top_p``). Generation builds logits: it only proposes tokens."""
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
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
                              pad_token_id=pad_id, eos_token_id=eos_id, **sampling)
            for row in gen[:, T:].tolist():
                out.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    finally:
        lm.train(was_training)
    return out


def greedy_complete(lm, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy completions (decoded text) of tokenized prompts (the exact-match evaluation)."""
    completions = generate(lm, tokenizer, prompts, max_new_tokens, batch_size, do_sample=False)
    return tokenizer.batch_decode(completions, skip_special_tokens=True)


def model_fingerprint(lm) -> str:
    """A short sha256 of the model's config and weights (keys the reference-logps cache)."""
    import hashlib

    h = hashlib.sha256(json.dumps(lm.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(lm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
