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
``padded``. Figures, not assertions.

    python -m bench.bench_packing                  # CPU defaults
    python -m bench.bench_packing --device cuda --batch 64 --max-len 2048 --D 1024 --layers 8 --V 32000
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from bench import _harness
from fastalign.hf import SequenceLogps
from fastalign.train.data import Batcher, to_device


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


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    examples = make_examples(args.batch, args.min_len, args.max_len, args.V)
    real = sum(len(e[0]) for e in examples)
    providers = [("padded", "sdpa", Batcher(0)), ("packed rows", "sdpa", Batcher(0, True, args.max_len)),
                 ("packed 1 row", "sdpa", Batcher(0, True, None))]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        providers.append(("flash 1 row", "flash_attention_2", Batcher(0, True, None)))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and dtype == torch.float32
                else torch.autocast("cpu", enabled=False))
    rows = []
    for name, attn, batcher in providers:
        row = {"provider": name, "attn": attn, "batch": args.batch, "len": f"{args.min_len}-{args.max_len}",
               "D": args.D, "layers": args.layers, "V": args.V, "dtype": args.dtype, "real": real}
        try:
            model = SequenceLogps(make_model(args.D, args.layers, args.V, attn, device, dtype))
            batch = to_device(batcher.sft(examples), device)
            row["tokens"] = batch["input_ids"].numel()

            def step(model=model, batch=batch):
                model.zero_grad(set_to_none=True)
                with autocast:
                    logps, _ = model(**batch)
                logps.sum().backward()

            row["ms"] = _harness.median_time_ms(step, device=device, warmup=1, reps=args.reps)
        except Exception as e:  # noqa: BLE001 - a provider that cannot run is reported in the table
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
    base = next((r["ms"] for r in rows if r["provider"] == "padded" and "ms" in r), None)
    for r in rows:
        if base and "ms" in r:
            r["time_vs_padded"] = r["ms"] / base
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--V", type=int, default=4096)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    rows = run(args)
    env = _harness.environment(args.device)
    notes = ("SequenceLogps forward + backward (decoder + linear_logprobs + segment sums), random-init Llama, "
             "sequence lengths uniform in the given range, loss on the second half of each. tokens: rows x width "
             "computed; real: the sequences' tokens. Time: median ms (CUDA events on GPU, wall clock on CPU).")
    columns = ["provider", "attn", "batch", "len", "D", "layers", "V", "dtype", "real", "tokens", "ms",
               "time_vs_padded", "error"]
    _, md_path = _harness.write_results("packing", rows, env, columns, notes=notes)
    print(open(md_path).read())


if __name__ == "__main__":
    main()
