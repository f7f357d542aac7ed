"""Architecture coverage: every decoder family transformers maps in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, built
offline as a tiny random-init model, scored by fastalign against the model's own logits.

For each family (a ``model_type`` of the auto mapping) the script builds the family's default config shrunk
generically (:data:`TINY`: hidden size 64, 2 layers, 4 heads, vocab 128, 4 experts...), initializes it in float32
with the LM head's weight multiplied by 30 (random init gives logits of ~0.3, where a missed softcap or scaling
hardly shows) and checks, on a right-padded batch of two sequences (9 and 6 tokens) and on the same two packed
into one row (:func:`fastalign.train.data.pack`):

1. :func:`fastalign.hf.check_model`, the load-time self-check;
2. ``causal_lm_logprobs`` on the padded batch against ``log_softmax(model(...).logits)``;
3. the trainer's ``SequenceLogps`` on the padded batch and on the packed batch (against the model's own logits
   on that packed batch: whether the model keeps packed sequences apart is ``check_packing``'s question, recorded
   here as ``packing``).

The reference is the model's forward in float64 (a copy) and in float32, by the project's rule
``|out - ref64| <= 2 * |ref32 - ref64| + atol``. Each family ends as

- ``pass``: every check holds;
- ``clear error``: fastalign raised :class:`fastalign.hf.UnsupportedModelError` naming the architecture;
- ``skipped``: no tiny model of the family could be built offline, or the model's own forward does not run on
  ``input_ids`` + ``attention_mask`` alone (the reason is recorded);
- ``FAIL``: silently wrong values, or a crash other than the clear error. The target is none.

    python -m bench.hf_sweep --docs docs/models.md             # all families -> bench/results/hf_sweep.json + docs
    python -m bench.hf_sweep --only llama,granite --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time
import traceback
import warnings

import torch

from bench import _harness
from fastalign.testing import assert_close_to_ref

# config attribute -> its tiny value; set only where the family's default config has the attribute as an int
TINY = {
    **dict.fromkeys(["hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim", "word_embed_proj_dim"], 64),
    **dict.fromkeys(["embedding_size", "output_embedding_size", "input_embedding_size"], 32),
    **dict.fromkeys(["intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "decoder_ffn_dim",
                     "encoder_ffn_dim", "inner_hidden_size", "dim_ff"], 128),
    **dict.fromkeys(["moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"], 32),
    **dict.fromkeys(["num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers",
                     "num_decoder_layers", "num_encoder_layers"], 2),
    **dict.fromkeys(["num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "encoder_attention_heads"], 4),
    **dict.fromkeys(["num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"], 2),
    **dict.fromkeys(["head_dim", "kv_channels", "attention_head_size"], 16),
    "vocab_size": 128,
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "num_selected_experts"], 2),
    **dict.fromkeys(["n_shared_experts", "num_shared_experts", "n_group", "topk_group"], 1),
    **dict.fromkeys(["q_lora_rank", "kv_lora_rank", "v_head_dim"], 16),
    **dict.fromkeys(["qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim"], 8),
    "unpadded_vocab_size": 120,  # below vocab_size: Inkling's logits are cut to it
}
# the logit processing a family applies by default, sharpened so that a missed one shows (defaults are often 1)
LOGIT_KNOBS = {"logit_scale": 0.25, "logits_scaling": 4.0, "lm_head_multiplier": 0.5,
               "logits_mup_width_multiplier": 4.0, "final_logit_softcapping": 3.0, "logits_soft_cap": 3.0,
               "output_logit_soft_cap": 3.0}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id")
HEAD_SCALE = 30.0
LENGTHS = (9, 6)  # the padded batch's rows (right padding on the second)
ATOL = 1e-5  # per token, on top of 2x the float32 reference's own error; sums get it per summed token


def tiny_config(model_type: str):
    """The family's default config with every size in :data:`TINY` it has shrunk (sub-configs too)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    return _shrink(type(default), default)


def _shrink(cls, default):
    from transformers import PretrainedConfig

    def settable(k, kind):
        v = getattr(default, k, None)
        prop = getattr(cls, k, None)
        return isinstance(v, kind) and not isinstance(v, bool) and not (isinstance(prop, property) and not prop.fset)

    kwargs = {k: v for k, v in TINY.items() if settable(k, int)}
    if hasattr(default, "unpadded_vocab_size"):  # (None by default)
        kwargs["unpadded_vocab_size"] = TINY["unpadded_vocab_size"]
    kwargs.update({k: v for k, v in LOGIT_KNOBS.items() if settable(k, (int, float)) and getattr(default, k)})
    if "head_dim" in kwargs and default.head_dim == getattr(default, "qk_rope_head_dim", None):
        kwargs["head_dim"] = TINY["qk_rope_head_dim"]  # multi-head latent attention: head_dim is the rope part
    heads = next((k for k in ("num_attention_heads", "n_head", "num_heads") if k in kwargs), None)
    for k in ("num_key_value_heads", "n_kv_heads", "num_kv_heads"):  # multi-head attention stays so (MLA needs it)
        if heads and k in kwargs and getattr(default, k) == getattr(default, heads):
            kwargs[k] = kwargs[heads]
    for name in getattr(default, "sub_configs", {}) or {}:
        sub = getattr(default, name, None)
        if isinstance(sub, PretrainedConfig):
            kwargs[name] = _shrink(type(sub), sub)
    try:
        config = cls(**kwargs)
    except Exception:  # some sizes do not go together in this family: keep those that do, one at a time
        kept = {}
        for k, v in kwargs.items():
            try:
                cls(**kept, **{k: v})
            except Exception:
                continue
            kept[k] = v
        config = cls(**kept)
    vocab = getattr(config, "vocab_size", None)
    for k in TOKEN_IDS:  # special tokens of the full-size vocabulary: bring them inside the tiny one
        v = getattr(config, k, None)
        if isinstance(vocab, int) and isinstance(v, int) and v >= vocab:
            setattr(config, k, vocab - 1 - TOKEN_IDS.index(k))
    return config


def build(model_type: str, class_name: str):
    import transformers

    config = tiny_config(model_type)
    model_cls = getattr(transformers, class_name)
    torch.manual_seed(0)
    config._experts_implementation = "eager"  # the grouped-mm experts take no float64 reference
    model = model_cls(config).float().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_SCALE)
    return model


def _token_logprobs(logits, targets):  # in the logits' own precision: the float32 reference is float32 throughout
    return torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]


def references(model, batch, packed):
    """``(padded per-token [B, T-1], padded sums [B], packed sums [S] | None)`` from the model's own logits."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    valid = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    per_token = torch.where(valid, _token_logprobs(logits, ids[:, 1:]), 0.0)
    packed_sums = None
    try:
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    except Exception:  # the model's forward takes no position ids: no packed reference
        pass
    else:
        labels = packed["labels"][:, 1:]
        lp = torch.where(labels != -100, _token_logprobs(logits[:, :-1], labels), 0.0)
        packed_sums = torch.zeros(len(LENGTHS), dtype=lp.dtype).index_add_(
            0, packed["seq_ids"][:, 1:][labels != -100], lp[labels != -100])
    return per_token, per_token.sum(1), packed_sums


def batches(vocab: int):
    from fastalign.train.data import pack

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(LENGTHS):
        mask[r, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    seqs = [ids[r, :n].tolist() for r, n in enumerate(LENGTHS)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, pack(seqs, seqs)


def check_family(model_type: str, class_name: str) -> dict:
    """One family's row: ``status`` (pass / clear error / skipped / FAIL), ``detail``, and what was measured."""
    from fastalign.hf import SequenceLogps, UnsupportedModelError, causal_lm_logprobs, check_model, output_head

    row = {"model_type": model_type, "class": class_name}
    try:
        model = build(model_type, class_name)
    except Exception as e:
        return {**row, "status": "skipped", "detail": f"no tiny model offline: {type(e).__name__}: {e}"[:300]}
    try:
        with torch.no_grad():  # token ids below the width of the model's logits (Inkling cuts them)
            width = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=False).logits.shape[-1]
            batch, packed = batches(width)
            ref32 = references(model, batch, packed)
    except Exception as e:
        return {**row, "status": "skipped",
                "detail": f"the model's own forward does not run on input_ids + attention_mask: "
                          f"{type(e).__name__}: {e}"[:300]}
    try:
        with torch.no_grad():
            ref64 = references(copy.deepcopy(model).double(), batch, packed)
    except Exception as e:  # no float64 reference: its float32 error is unknown, so nothing can be judged
        return {**row, "status": "skipped", "detail": f"no float64 reference: {type(e).__name__}: {e}"[:300]}
    if ref32[2] is None:
        row["packing"] = "n/a (the model's forward takes no position_ids)"
    else:
        leak = float((ref64[2] - ref64[1]).abs().max())
        row["packing"] = "apart" if leak <= 1e-6 * (1 + float(ref64[1].abs().max())) else f"leaks ({leak:.3g} nats)"
    policy = SequenceLogps(model)

    def padded_logps():
        return policy(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])[0]

    checks = {  # path -> (run it, its reference index, atol)
        "check_model": (lambda: check_model(model), None, None),
        "causal_lm_logprobs": (lambda: causal_lm_logprobs(model, batch["input_ids"], batch["attention_mask"]), 0,
                               ATOL),
        "SequenceLogps padded": (padded_logps, 1, ATOL * max(LENGTHS)),
    }
    if row["packing"] == "apart":  # (a model that mixes packed sequences is check_packing's to refuse)
        checks["SequenceLogps packed"] = (lambda: policy(**packed)[0], 2, ATOL * max(LENGTHS))
    row["paths"] = {}
    for path, (fn, ref, atol) in checks.items():
        try:
            with torch.no_grad():
                out = fn()
            if ref is not None:
                assert_close_to_ref(out, ref64[ref], ref32[ref], atol=atol, name=path)
            row["paths"][path] = "ok"
        except UnsupportedModelError as e:
            row["paths"][path] = f"clear error: {e}"[:600]
        except AssertionError as e:
            row["paths"][path] = f"silently wrong: {e}"[:600]
        except Exception as e:
            tb = traceback.format_exc(limit=-2).strip().splitlines()[-3:]
            row["paths"][path] = f"crash: {type(e).__name__}: {e} | {' / '.join(tb)}"[:600]
    try:
        head = output_head(model, allow_transform=True)
        row["options"] = {k: v for k, v in head.options.items() if v not in (None, 1.0)}
        row["head_transform"] = head.transform is not None
    except UnsupportedModelError:
        pass
    bad = {p: r for p, r in row["paths"].items() if r != "ok" and not r.startswith("clear error")}
    clear = {p: r for p, r in row["paths"].items() if r.startswith("clear error")}
    if "check_model" in clear:  # refused at load: what the other paths would give is recorded, not judged
        return {**row, "status": "clear error", "stage": "check_model", "detail": clear["check_model"]}
    if bad:
        path = next(iter(bad))
        return {**row, "status": "FAIL", "stage": path, "detail": bad[path]}
    if clear:
        path = next(iter(clear))
        return {**row, "status": "clear error", "stage": path, "detail": clear[path]}
    return {**row, "status": "pass", "detail": ""}


def families(only=None) -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())
    if only:
        unknown = set(only) - {t for t, _ in names}
        if unknown:
            raise SystemExit(f"--only: not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: {sorted(unknown)}")
        names = [(t, c) for t, c in names if t in only]
    return names


def sweep(only=None, log=print) -> list[dict]:
    """Check every family (or those in ``only``); returns the rows."""
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    for model_type, class_name in families(only):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = check_family(model_type, class_name)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if log:
            log(f"{row['status']:12s} {model_type:28s} {row['seconds']:6.1f}s  {row['detail'][:150]}")
    return rows


def docs_table(rows: list[dict]) -> str:
    """The architecture table of docs/models.md, from the sweep's rows."""
    lines = ["| model_type | class | status | logit processing read | packed sequences | note |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["model_type"]):
        read = [f"{k}={v:g}" for k, v in (r.get("options") or {}).items()]
        if r.get("head_transform"):
            read.append("head transform")
        packing = str(r.get("packing", "")).split(" ")[0]
        note = "" if r["status"] == "pass" else r["detail"].split("): ", 1)[-1][:100].replace("|", "/")
        lines.append(f"| {r['model_type']} | {r['class']} | {r['status']} | {', '.join(read)} | {packing} | {note} |")
    return "\n".join(lines) + "\n"


def write_docs(path: str, counts: dict, rows: list[dict]) -> None:
    """Rewrite the counts line and the table of ``path`` (docs/models.md) from a sweep."""
    text = open(path).read()
    head = text[:text.index("| model_type | class |")]
    summary = ", ".join(f"{counts[k]} {k}" for k in ("pass", "clear error", "skipped", "FAIL"))
    head = re.sub(r"\*\*\d+ pass, \d+ clear error, \d+ skipped, \d+ FAIL\*\*", f"**{summary}**", head)
    with open(path, "w") as f:
        f.write(head + docs_table(rows))


def main(argv=None):
    import transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(_harness.RESULTS, "hf_sweep.json"))
    p.add_argument("--only", default="", help="comma-separated model_types (default: every family)")
    p.add_argument("--docs", default="", help="also rewrite the counts and the table of this page (docs/models.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = sweep([s for s in args.only.split(",") if s] or None)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "clear error", "skipped", "FAIL")}
    print(_harness.markdown_table(rows, ["model_type", "class", "status", "stage", "options", "packing"]))
    print(counts)
    env = {**_harness.environment("cpu"), "transformers": transformers.__version__}
    with open(args.out, "w") as f:
        json.dump({"env": env, "counts": counts, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    if args.docs:
        write_docs(args.docs, counts, rows)
        print(f"wrote {args.docs}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
