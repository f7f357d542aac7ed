"""End to end: ``fastalign dpo`` / ``fastalign sft`` against TRL's ``DPOTrainer`` / ``SFTTrainer``, same work.

One random-init Llama (saved with ``save_pretrained``, with a word-level tokenizer whose every word is one token,
so that every sequence has exactly ``T`` tokens and no padding), the same JSONL data, batch, optimizer and schedule
on both sides. Every run is a fresh process (``python -m bench.bench_train --worker``), the providers interleaved
over rounds so that the machine's drift hits both alike.

First, the same work: each round's first step is compared between the providers (loss, pre-clipping grad norm,
and for DPO the summed log-probabilities of chosen and rejected; the loss after one optimizer step). At step 1
the DPO policy equals its reference, so the sigmoid loss is ``log 2`` on both sides whatever they compute: the
log-probabilities, the gradient norm and the loss at step 2 are what show the same computation. A mismatch beyond
``PARITY_RTOL`` (1e-4 in float32 on the CPU, 2e-2 under bf16 autocast on a GPU) stops the benchmark (its rows
carry the error).

Then the figures: ``ms`` the median time of one optimizer step (steps after the first; the intervals between
step ends, logging of every step included on both sides), ``tokens_per_s`` the tokens one step trains on
(``2 B G T`` for DPO: chosen and rejected; ``B G T`` for SFT) over that time, ``peak_mib`` the peak memory beyond
what the process held before its trainer loaded the models (peak RSS growth on the CPU, ``max_memory_allocated``
on a GPU): policy, reference, optimizer state, activations.

Settings (both sides): AdamW lr ``LR``, betas (0.9, 0.999), eps 1e-8, weight decay 0, no warmup, cosine decay to 0
over ``max_steps``, gradient clipping 1.0, no gradient checkpointing (TRL's default is on: turned off), SDPA
attention, float32 weights (bf16 autocast on a GPU: TRL ``bf16=True``, fastalign's ``bf16`` default), no packing or
padding-free batches, ``max_length = T``, ``truncation_mode=keep_end`` (nothing is cut: sequences are exactly
``T``), a frozen reference model run every step (no precomputed reference log-probabilities), DPO ``beta`` 0.1 and
``loss_type=sigmoid`` (fastalign's default adds ``sft``: set to ``sigmoid`` alone), SFT on completion tokens only
(both defaults), torch threads equal on both sides. fastalign runs with ``check_model`` on (its default: a
self-check at load, outside the timed steps).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import _harness

TITLE = "End-to-end training: fastalign dpo / sft against TRL's DPOTrainer / SFTTrainer"
COLUMNS = ["case", "provider", "mode", "ms", "spread", "tokens_per_s", "x_trl", "peak_mib", "parity", "error"]
PROVIDERS = ("fastalign", "trl")
METHODS = ("dpo", "sft")
LR = 1e-4
BETA = 0.1
# Worst relative difference allowed between the providers' first steps: float32 on the CPU (fused log-probabilities
# vs logits + log_softmax, summed over T tokens; fastalign's metrics.jsonl keeps 6 decimals), bf16 autocast on a GPU.
PARITY_RTOL = {"cpu": 1e-4, "cuda": 2e-2}

# Model shapes: the CPU shape of issue 16 and the Llama-3.2-1B dimensions (random init) on a GPU.
SHAPES = {
    "tiny": dict(layers=2, hidden=64, intermediate=176, heads=4, kv_heads=4, vocab=1000, T=64, B=2, tie=False),
    "cpu": dict(layers=4, hidden=512, intermediate=1376, heads=8, kv_heads=8, vocab=32000, T=512, B=1, tie=False),
    "cpu-quick": dict(layers=4, hidden=512, intermediate=1376, heads=8, kv_heads=8, vocab=32000, T=256, B=1,
                      tie=False),
    "cuda": dict(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256, T=2048, B=2,
                 tie=True, rope_theta=500000.0),
}


# --------------------------------------------------------------------------------------------------- the inputs

def _case(method: str, shape: dict, grad_accum: int) -> str:
    return (f"{method} L{shape['layers']} H{shape['hidden']} V{shape['vocab']} T{shape['T']} "
            f"B{shape['B']}x{grad_accum}")


def build_inputs(root: Path, shape: dict, rows: int, seed: int = 0) -> dict:
    """Write ``root/model`` (random-init Llama + tokenizer) and ``root/{sft,dpo}.jsonl``; return their paths."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    V, T = shape["vocab"], shape["T"]
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), V)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=V, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=T,
                      tie_word_embeddings=shape["tie"], rope_theta=shape.get("rope_theta", 10000.0),
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    model_dir = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    # Prompt P words; completion C words + the EOS both trainers append: P + C + 1 = T tokens exactly.
    rng = random.Random(seed)
    P = T // 2
    C = T - P - 1
    words = lambda n: " ".join(f"w{rng.randrange(len(specials), V)}" for _ in range(n))
    paths = {"model": str(model_dir), "sft": str(root / "sft.jsonl"), "dpo": str(root / "dpo.jsonl")}
    with open(paths["sft"], "w") as f_sft, open(paths["dpo"], "w") as f_dpo:
        for _ in range(rows):
            prompt = words(P)
            f_sft.write(json.dumps({"prompt": prompt, "completion": " " + words(C)}) + "\n")
            f_dpo.write(json.dumps({"prompt": prompt, "chosen": " " + words(C), "rejected": " " + words(C)}) + "\n")
    return paths


# ------------------------------------------------------------------------------------------ one run, one process

def _rss_mark() -> float:
    """Reset the kernel's RSS high-water mark; return the RSS now (MiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _harness.current_rss_mib()


def _rss_peak() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _run_fastalign(job: dict, out: Path, stamps: list) -> list[dict]:
    from fastalign.train import DPOConfig, SFTConfig, common, train_dpo, train_sft
    from fastalign.train.config import make_config

    original = common.Run.step

    def timed_step(self, module, opt, sched):  # the time of each optimizer step's end (no change to the loop)
        result = original(self, module, opt, sched)
        if job["device"] == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return result

    common.Run.step = timed_step
    opts = dict(model=job["model"], data=job[job["method"]], output_dir=str(out), max_steps=job["steps"],
                per_device_train_batch_size=job["B"], gradient_accumulation_steps=job["grad_accum"],
                learning_rate=LR, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, warmup_steps=0,
                max_grad_norm=1.0, max_length=job["T"], truncation_mode="keep_end", logging_steps=1,
                save_steps=0, eval_steps=0, seed=0, device=job["device"], cpu_threads=job["threads"],
                dtype="float32", bf16=True, gradient_checkpointing=False, packing=False, plots=False,
                progress_bar=False, report_to_tensorboard=False, attn_implementation="sdpa")
    if job["method"] == "dpo":
        opts.update(beta=BETA, loss_type="sigmoid", precompute_ref_log_probs=False)
        train_dpo(make_config(DPOConfig, opts, "dpo"))
    else:
        opts.update(completion_only_loss=True)
        train_sft(make_config(SFTConfig, opts, "sft"))
    common.Run.step = original
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _run_trl(job: dict, out: Path, stamps: list) -> list[dict]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if job["device"] == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(job["model"])
    data = datasets.load_dataset("json", data_files=job[job["method"]], split="train")
    common = dict(output_dir=str(out), max_steps=job["steps"], per_device_train_batch_size=job["B"],
                  gradient_accumulation_steps=job["grad_accum"], learning_rate=LR, adam_beta1=0.9,
                  adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, warmup_steps=0,
                  lr_scheduler_type="cosine", max_grad_norm=1.0, max_length=job["T"], logging_steps=1,
                  save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                  bf16=job["device"] == "cuda", gradient_checkpointing=False, use_cpu=job["device"] == "cpu",
                  dataloader_num_workers=0, padding_free=False)
    if job["method"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                         truncation_mode="keep_end")
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Stamp()])
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, completion_only_loss=True, packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Stamp()])
    trainer.train()
    return [dict(r) for r in trainer.state.log_history if "loss" in r and "step" in r]


def run_job(job: dict) -> dict:
    """Train as ``job`` says with one provider, in this process: step-end times, per-step metrics, peak memory."""
    torch.set_num_threads(job["threads"])
    cuda = job["device"] == "cuda"
    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{job['provider']}-") as tmp:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_mark()
        runner = _run_fastalign if job["provider"] == "fastalign" else _run_trl
        history = runner(job, Path(tmp) / "out", stamps)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_peak() - base
    by_step = {int(r["step"]): r for r in history}
    keep = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins", "learning_rate")
    steps = [{k: float(by_step[s][k]) for k in keep if k in by_step.get(s, {})} for s in (1, 2)]
    return {"step_ms": [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], "metrics": steps,
            "peak_mib": round(peak, 1), "base_mib": round(base if not cuda else base / 2**20, 1)}


def _worker_main() -> None:
    job = json.loads(sys.stdin.read())
    try:
        reply = run_job(job)
    except Exception as e:  # noqa: BLE001 - a provider's failure is its result
        reply = {"error": _harness.describe_error(e)}
    sys.stdout.write(_harness._TAG + json.dumps(reply) + "\n")


def run_fresh(job: dict, timeout: float = 3600.0) -> dict:
    """:func:`run_job` in a fresh Python process (imports, allocator and threads its own)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(_harness.ROOT), os.environ.get("PYTHONPATH"))
                                                      if p), TOKENIZERS_PARALLELISM="false")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # as the harness: freed big buffers leave the RSS
    try:
        proc = subprocess.run([sys.executable, "-c", "from bench.bench_train import _worker_main; _worker_main()"],
                              input=json.dumps(job), capture_output=True, text=True, cwd=_harness.ROOT, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_harness._TAG):
            return json.loads(line[len(_harness._TAG):])
    tail = proc.stderr[-400:].replace("\n", " ")
    return {"error": f"worker exited with code {proc.returncode}" + (" (killed: out of memory?)"
                                                                     if proc.returncode in (-9, 137) else "")
            + f": {tail}"}


# ------------------------------------------------------------------------------------------------- the parity

def parity(method: str, a: dict, b: dict, rtol: float = PARITY_RTOL["cpu"]) -> dict:
    """Compare two runs' first steps: ``{"max_rel": worst relative difference, "ok": bool, "detail": {...}}``.

    Step 1: loss, grad norm (and DPO's summed log-probabilities); step 2: the loss after one optimizer step.
    Relative to ``max(|x|, 1)`` so that a loss near 0 is compared absolutely."""
    keys = [(0, "loss"), (0, "grad_norm"), (1, "loss")]
    if method == "dpo":
        keys += [(0, "logps/chosen"), (0, "logps/rejected"), (1, "rewards/margins")]
    detail, worst = {}, 0.0
    for step, k in keys:
        x, y = a["metrics"][step].get(k), b["metrics"][step].get(k)
        if x is None or y is None:
            detail[f"step{step + 1} {k}"] = {"missing": [x is None, y is None]}
            worst = math.inf
            continue
        rel = abs(x - y) / max(abs(x), abs(y), 1.0)
        detail[f"step{step + 1} {k}"] = {"a": x, "b": y, "rel": rel}
        worst = max(worst, rel)
    return {"max_rel": worst, "ok": worst <= rtol, "detail": detail}


def check_parity(method: str, shape: dict, root: Path, *, device="cpu", threads: int = 1, grad_accum: int = 1,
                 fresh: bool = True) -> dict:
    """Two-step runs of both providers on ``shape``; the :func:`parity` of their first steps."""
    paths = build_inputs(root, shape, rows=shape["B"] * grad_accum)
    job = dict(paths, method=method, steps=2, B=shape["B"], grad_accum=grad_accum, T=shape["T"], device=device,
               threads=threads)
    runs = {p: (run_fresh if fresh else run_job)(dict(job, provider=p)) for p in PROVIDERS}
    for p, r in runs.items():
        if "error" in r:
            raise RuntimeError(f"{p} {method} failed: {r['error']}")
    return parity(method, runs["fastalign"], runs["trl"], PARITY_RTOL[device])


# ------------------------------------------------------------------------------------------------ the benchmark

def run(device: str, quick: bool, out: Path) -> list[dict]:
    """Both methods, both providers, ``rounds`` interleaved fresh-process runs each; rows per (method, provider)."""
    try:
        import trl  # noqa: F401
    except ImportError as e:
        return [{"case": "train", "provider": "trl", "mode": "train", "error": f"trl not installed ({e})"}]
    cuda = torch.device(device).type == "cuda"
    shape = SHAPES["tiny" if _harness.DRY_RUN else "cuda" if cuda else "cpu-quick" if quick else "cpu"]
    grad_accum = 1
    rounds = 1 if _harness.DRY_RUN else 2
    steps = 3 if _harness.DRY_RUN or quick else 5  # step 1 is a warm-up: steps - 1 timed intervals per run
    threads = torch.get_num_threads()
    rtol = PARITY_RTOL["cuda" if cuda else "cpu"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        # Rows: the pairs of one batch, so that the first batch is the same set of pairs whatever order each
        # trainer's sampler draws (every batch metric is a mean over the batch).
        paths = build_inputs(Path(tmp), shape, rows=shape["B"] * grad_accum)
        results = {(m, p): [] for m in METHODS for p in PROVIDERS}
        parities = {}
        for r in range(rounds):
            for method in METHODS:
                order = PROVIDERS[r % 2:] + PROVIDERS[:r % 2]
                for p in order:
                    job = dict(paths, provider=p, method=method, steps=steps, B=shape["B"], grad_accum=grad_accum,
                               T=shape["T"], device="cuda" if cuda else "cpu", threads=threads)
                    res = run_fresh(job)
                    results[(method, p)].append(res)
                    print(f"  round {r + 1}/{rounds} {method} {p}: "
                          + (res["error"][:200] if "error" in res else
                             f"step {statistics.median(res['step_ms']):.0f} ms, peak {res['peak_mib']:.0f} MiB"),
                          flush=True)
                if r == 0 and method not in parities:
                    a, b = results[(method, "fastalign")][0], results[(method, "trl")][0]
                    if "error" in a or "error" in b:
                        parities[method] = {"ok": False, "max_rel": None, "detail": "a run failed"}
                    else:
                        parities[method] = parity(method, a, b, rtol)
            if r == 0 and not all(v["ok"] for v in parities.values()):
                break  # not the same work: no timing comparison
        for method in METHODS:
            tokens = shape["B"] * grad_accum * shape["T"] * (2 if method == "dpo" else 1)
            par = parities.get(method, {})
            for p in PROVIDERS:
                runs = results[(method, p)]
                row = {"case": _case(method, shape, grad_accum), "provider": p, "mode": "train", "method": method,
                       "tokens_per_step": tokens, "rounds": len(runs), "steps_per_run": steps,
                       "parity": None if par.get("max_rel") is None else f"{par['max_rel']:.1e}",
                       "parity_ok": par.get("ok"), "parity_rtol": rtol, "parity_detail": par.get("detail"),
                       "first_step": runs[0].get("metrics") if runs else None}
                errors = [x["error"] for x in runs if "error" in x]
                if errors:
                    row["error"] = errors[0]
                elif not par.get("ok"):
                    row["error"] = f"loss parity failed (worst relative difference {par.get('max_rel')})"
                else:
                    samples = [ms for x in runs for ms in x["step_ms"]]
                    row.update(_harness.summarize(samples))
                    row["tokens_per_s"] = round(tokens / (row["ms"] / 1e3), 1)
                    row["peak_mib"] = statistics.median(x["peak_mib"] for x in runs)
                    row["peak_mib_runs"] = [x["peak_mib"] for x in runs]
                    row["ms_runs"] = [round(statistics.median(x["step_ms"]), 1) for x in runs]  # per round
                rows.append(row)
            trl_row = next(x for x in rows[-2:] if x["provider"] == "trl")
            for x in rows[-2:]:
                if x.get("tokens_per_s") and trl_row.get("tokens_per_s"):
                    x["x_trl"] = round(x["tokens_per_s"] / trl_row["tokens_per_s"], 3)
    settings = dict(shape, grad_accum=grad_accum, lr=LR, beta=BETA, loss_type="sigmoid", schedule="cosine, no warmup",
                    adam=(0.9, 0.999, 1e-8), weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False,
                    attention="sdpa", threads=threads, dtype="float32" + (" + bf16 autocast" if cuda else ""))
    for row in rows:
        row["settings"] = settings
    return rows


def notes(rows: list[dict]) -> str:
    par = {r["method"]: r.get("parity") for r in rows if r.get("method")}
    return ("Each provider runs in a fresh process per round, providers interleaved; ms is the median optimizer "
            "step after the first; peak_mib the peak memory beyond the process before training. Same work checked "
            f"first (worst relative difference of the first steps' loss, grad norm, log-probabilities: {par}; "
            f"tolerance {rows[0].get('parity_rtol') if rows else None}). Settings in the module docstring and each "
            "row's `settings`.")


if __name__ == "__main__":
    raise SystemExit(_harness.main(["train", *sys.argv[1:]]))
