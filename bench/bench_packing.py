"""Packed (padding-free) batches against padded ones: the trainer's forward + backward of sequence log-probabilities.

A random-init Llama (``--layers``, ``--D``, ``--V``) scores ``--batch`` sequences whose lengths are drawn uniformly
from ``[--min-len, --max-len]`` (a completion on the second half of each), through
:class:`fastalign.hf.SequenceLogps` exactly as ``fastalign sft``/``dpo`` call it. Providers:

- ``padded``: right-padded ``[B, max length in batch]`` with an attention mask (what ``packing=false`` does);
- ``packed rows``: rows of at most ``--max-len`` tokens (what ``packing=true`` does with sdpa/eager);
- ``packed 1 row``: one row, no pad token (what ``packing=true`` does with flash_attention_2; under sdpa its
  dense block-diagonal mask makes attention cost grow with the square of the whole batch);
- ``flash 1 row`` (CUDA with flash-attn installed only): ``attn_implementation=flash_attention_2``, one row.

Columns: ``tokens`` computed (rows x width) against the ``real`` tokens, median ``ms`` and the time relative to
``padded``. Measured by the harness (bench/_harness.py).
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from bench import _harness
from fastalign.hf import SequenceLogps
from fastalign.train.data import Batcher, to_device

TITLE = "Packed (padding-free) batches against padded ones: SequenceLogps forward + backward"
COLUMNS = ["case", "provider", "real", "tokens", "ms", "spread", "vs_padded", "error"]


def make_model(D: int, layers: int, V: int, attn: str, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=int(D * 8 / 3) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(D // 64, 1),
                         num_key_value_heads=max(D // 64, 1), max_position_embeddings=8192, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return lm.to(device=device, dtype=dtype)


def make_examples(batch: int, min_len: int, max_len: int, V: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g).tolist()
    out = []
    for n in lengths:
        ids = torch.randint(1, V, (n,), generator=g).tolist()
        out.append((ids, [-100] * (n // 2) + ids[n // 2:]))
    return out


LAYOUTS = {"padded": ("sdpa", False, "max"), "packed rows": ("sdpa", True, "max"),
           "packed 1 row": ("sdpa", True, None), "flash 1 row": ("flash_attention_2", True, None)}


def _batch(case: dict, provider: str):
    """(attention implementation, the batch) of ``provider``'s layout."""
    attn, packing, width = LAYOUTS[provider]
    examples = make_examples(case["batch"], case["min_len"], case["max_len"], case["V"])
    batcher = Batcher(0, True, case["max_len"] if width else None) if packing else Batcher(0)
    return attn, batcher.sft(examples)


def make(case: dict, provider: str, mode: str, device: str):
    """One forward + backward of SequenceLogps on ``provider``'s layout (the harness's contract)."""
    dtype = getattr(torch, case["dtype"])
    attn, batch = _batch(case, provider)
    model = SequenceLogps(make_model(case["D"], case["layers"], case["V"], attn, device, dtype))
    batch = to_device(batch, device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda"
                and dtype == torch.float32 else torch.autocast("cpu", enabled=False))

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            logps, _ = model(**batch)
        logps.sum().backward()

    return step


def cases(device: str, quick: bool) -> list[dict]:
    if _harness.DRY_RUN:
        return [dict(case="4 seqs of 4-16 tokens, D=32 1 layer V=64 fp32", batch=4, min_len=4, max_len=16, D=32,
                     layers=1, V=64, dtype="float32")]
    if torch.device(device).type == "cuda":
        return [dict(case="64 seqs of 64-2048 tokens, D=1024 8 layers V=32000 bf16", batch=64, min_len=64,
                     max_len=2048, D=1024, layers=8, V=32000, dtype="bfloat16")]
    return [dict(case="16 seqs of 16-256 tokens, D=128 2 layers V=4096 fp32", batch=16, min_len=16, max_len=256,
                 D=128, layers=2, V=4096, dtype="float32")]


def run(device: str, quick: bool, out) -> list[dict]:
    names = ["padded", "packed rows", "packed 1 row"]
    missing = {}
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash 1 row")
    else:
        missing["flash 1 row"] = "needs flash-attn on a CUDA device"
    rows = []
    for case in cases(device, quick):
        examples = make_examples(case["batch"], case["min_len"], case["max_len"], case["V"])
        case = dict(case, real=sum(len(e[0]) for e in examples))
        found = _harness.compare(__name__, case, names, ["fwd+bwd"], device, rounds=2 if quick else 3, reps=3,
                                 max_seconds=4 if quick else 15)
        for r in found:
            r["tokens"] = _batch(case, r["provider"])[1]["input_ids"].numel()
        rows += found + [dict(case, provider=n, mode="fwd+bwd", error=why) for n, why in missing.items()]
    return _harness.add_ratios(rows, baseline="padded")


def notes(rows: list[dict]) -> str:
    return ("SequenceLogps forward + backward (decoder + linear_logprobs + segment sums), random-init Llama, "
            "sequence lengths uniform in the range, loss on the second half of each. padded: right-padded "
            "[B, longest] (packing=false); packed rows: rows of at most max_len tokens (packing=true with "
            "sdpa/eager); packed 1 row: one row (packing=true with flash_attention_2; under sdpa its dense "
            "block-diagonal mask grows with the square of the batch). tokens: rows x width computed; real: the "
            "sequences' tokens.")


if __name__ == "__main__":
    raise SystemExit(_harness.main(["packing", *sys.argv[1:]]))
