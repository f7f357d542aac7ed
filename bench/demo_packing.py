"""The embedded demo padded and packed, and why their end figures differ: writes
``bench/results/demo_packing_cpu.json`` (the figures the README's packing paragraph quotes).

1. ``fastalign dpo`` (README command 1's job) with ``packing=false`` then ``packing=true``, back to back: wall
   time and both stages' summaries.
2. The SFT warm start in float64, padded and packed, ``--f64-steps`` steps: the first logged step at which the
   two differ, and the largest difference of loss / grad_norm at each logged step (rounding differences that
   training amplifies, against a change in what is computed, which would differ from step 10 on).
3. The SFT warm start (600 steps) over ``--seeds``, padded and packed: exact match of greedy generations after.

    python -m bench.demo_packing            # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench import _harness
from bench._harness import fastalign_command


def logged(run_dir: str, key: str) -> dict[int, float]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--f64-steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    args = p.parse_args(argv)
    result = {"benchmark": "the embedded demo padded and packed (sdpa: packed rows of max_length=64 tokens)",
              "environment": _harness.environment("cpu")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result["load_avg_1min_before"] = os.getloadavg()[0]
        result["demo"] = {pk: fastalign_command("dpo", tmp, packing=pk, output_dir=f"demo_{pk}")
                          for pk in ("false", "true")}
        runs = {pk: fastalign_command("sft", tmp, packing=pk, dtype="float64", max_steps=args.f64_steps, eval_steps=0,
                              save_steps=0, plots="false", output_dir=f"f64_{pk}") for pk in ("false", "true")}
        drift = []
        for key in ("loss", "grad_norm"):
            a, b = logged(runs["false"]["output_dir"], key), logged(runs["true"]["output_dir"], key)
            for step in sorted(a):
                drift.append({"step": step, "key": key, "abs_diff": abs(a[step] - b[step])})
        first = min((d["step"] for d in drift if d["abs_diff"] > 0), default=None)
        result["float64_sft"] = {"steps": args.f64_steps, "first_logged_step_that_differs": first,
                                 "logged_to_digits": 6, "diffs": drift,
                                 "wall_seconds": {pk: r["wall_seconds"] for pk, r in runs.items()}}
        result["seeds"] = []
        for seed in args.seeds:
            for pk in ("false", "true"):
                r = fastalign_command("sft", tmp, packing=pk, seed=seed, eval_steps=0, save_steps=0, plots="false",
                              output_dir=f"seed{seed}_{pk}")
                result["seeds"].append({"seed": seed, "packing": pk == "true",
                                        "exact_match_after": r["summary"].get("exact_match_after"),
                                        "wall_seconds": r["wall_seconds"]})
    for run in result["demo"].values():
        run.pop("output_dir")
    path = Path(os.environ.get("FASTALIGN_BENCH_OUT", _harness.RESULTS)) / "demo_packing_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(path)
    print(json.dumps({k: v for k, v in result.items() if k != "float64_sft"}, indent=1)[:3000])
    print("float64: first logged step that differs:", first)


if __name__ == "__main__":
    main()
