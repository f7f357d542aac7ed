"""Helpers of the trainer tests (imported by name: tests/train is on sys.path under pytest)."""

import json
from itertools import islice
from pathlib import Path

from fastalign.assets import ASSETS


def head(name: str, n: int) -> list[dict]:
    with open(ASSETS / "data" / name) as f:
        return [json.loads(line) for line in islice(f, n)]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def tiny_qwen2(directory) -> str:
    """Save a random-init Qwen2 (seed 0; untied LM head, the embedded tokenizer's 103 ids) with save_pretrained in
    ``directory``: a local Hugging Face model of another architecture than the embedded Llama. Returns its path."""
    import torch
    import transformers

    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=103, max_position_embeddings=64,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(directory))
    return str(directory)


def quick(tmp_path, data, kind: str, **over) -> dict:
    """Overrides for a few-step run on the small data, without progress bar, plots or TensorBoard."""
    base = {"data": data["sft" if kind == "sft" else "pref"], "output_dir": str(tmp_path / f"run_{kind}"),
            "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "eval_steps": 0, "save_steps": 0,
            "warmup_steps": 1, "progress_bar": False, "plots": False, "report_to_tensorboard": False,
            "gen_eval_data": data["gen"]}
    if kind != "sft":
        base["eval_data"] = data["pref_eval"]
    if kind == "dpo":
        base["sft_warmup_steps"] = 0
    base.update(over)
    return base


def torchrun(command: str, over: dict, cwd, env_extra: dict | None = None, nproc: int = 2, kill_at: int = 0):
    """Run ``fastalign <command> key=value...`` under ``torchrun --nproc_per_node nproc`` (CPU, gloo) on a free
    port (``kill_at``: SIGKILLed after that step, by kill_at_step.py); return the finished
    ``subprocess.CompletedProcess``."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           *([str(Path(__file__).with_name("kill_at_step.py")), str(kill_at)] if kill_at else ["-m", "fastalign.cli"]),
           command, *[f"{k}={v}" for k, v in over.items()]]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def logged(run_dir, key: str):
    """The float64 series of ``key`` in a run's metrics.jsonl."""
    import torch

    with open(Path(run_dir) / "metrics.jsonl") as f:
        return torch.tensor([r[key] for r in map(json.loads, f) if key in r], dtype=torch.float64)
