"""Helpers of the trainer tests (imported by name: tests/train is on sys.path under pytest)."""

import json
from itertools import islice

from fastalign.train.model import ASSETS


def head(name: str, n: int) -> list[dict]:
    with open(ASSETS / "data" / name) as f:
        return [json.loads(line) for line in islice(f, n)]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


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
