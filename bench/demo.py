"""The embedded demo of README command 1 and its online counterpart, measured in one run: writes
``bench/results/demo_cpu.json`` (the figures the README, docs/ppo.md and docs/grpo.md quote).

Each command runs in a fresh process in an empty directory, with no arguments but its output directory, as a new
user would run it; each starts from its own SFT warm start of the embedded model (600 steps, seeded: the same
weights in every run, checked here by their sha256):

1. ``fastalign dpo``: the SFT warm start, then DPO on the preference pairs.
2. ``fastalign ppo``: the same warm start, then PPO rewarded by the addition task's exact-sum function.
3. ``fastalign rm`` on the warm start, then ``fastalign ppo reward_model=...``: PPO rewarded by a learned reward
   model instead (the warm start is reused, not retrained).
4. ``fastalign grpo``: the same warm start, then GRPO (no critic, groups of completions per prompt) rewarded by
   the exact-sum function.
5. ``fastalign iterdpo``: the same warm start, then rounds of sampling, pairing by the exact-sum function and DPO.

    python -m bench.demo            # about 13 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from bench import _harness


def weights_sha(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()[:16]


def brief(run: dict, keys) -> dict:
    return {k: run["summary"].get(k) for k in keys}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(_harness.RESULTS, "demo_cpu.json"))
    args = p.parse_args(argv)
    result = {"benchmark": "the embedded demo: fastalign dpo, fastalign ppo (reward function, reward model), "
                           "fastalign grpo and fastalign iterdpo from the same SFT warm start, each a fresh process in "
                           "an empty directory",
              "environment": _harness.environment("cpu"), "load_avg_1min_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {"dpo": _harness.fastalign_command("dpo", tmp, output_dir="runs/dpo"),
                "ppo": _harness.fastalign_command("ppo", tmp, output_dir="runs/ppo"),
                "grpo": _harness.fastalign_command("grpo", tmp, output_dir="runs/grpo"),
                "iterdpo": _harness.fastalign_command("iterdpo", tmp, output_dir="runs/iterdpo")}
        starts = {k: weights_sha(tmp / "runs" / k / "sft_warmup" / "final") for k in runs}
        warm = tmp / "runs" / "ppo" / "sft_warmup"
        runs["rm"] = _harness.fastalign_command("rm", tmp, model=str(warm / "final"), output_dir="runs/rm")
        shutil.copytree(warm, tmp / "runs" / "ppo_rm" / "sft_warmup")  # the same start, reused
        runs["ppo_rm"] = _harness.fastalign_command("ppo", tmp, reward_model=str(tmp / "runs/rm/final"),
                                                    output_dir="runs/ppo_rm")
        warm_summary = json.loads((warm / "summary.json").read_text())
        for run in runs.values():  # paths inside the temporary directory mean nothing once it is gone
            run["output_dir"] = os.path.relpath(run["output_dir"], tmp)
            run["command"] = run["command"].replace(str(tmp) + "/", "")
    result["sft_warm_start"] = {"steps": warm_summary["steps"], "seconds": warm_summary["seconds"],
                                "exact_match_after": warm_summary["exact_match_after"],
                                "weights_sha256_of_each_run": starts}
    result["same_start"] = len(set(starts.values())) == 1
    result["runs"] = runs
    ppo_keys = ("exact_match before", "exact_match after", "objective/scores first", "objective/scores last",
                "objective/kl last", "tokens_per_second last", "time/generation mean", "time/scoring mean",
                "time/training mean", "policy/ratio_max_abs_dev_first_minibatch max")
    grpo_keys = ("exact_match before", "exact_match after", "reward first", "reward last",
                 "frac_reward_zero_std first", "frac_reward_zero_std last", "tokens_per_second last",
                 "time/generation mean", "time/scoring mean", "time/training mean",
                 "policy/ratio_max_abs_dev_first_minibatch max")
    result["table"] = {
        "dpo": {**brief(runs["dpo"], ("exact_match before", "exact_match after", "eval_rewards/accuracies after")),
                "wall_seconds": runs["dpo"]["wall_seconds"], "peak_rss_mib": runs["dpo"]["peak_rss_mib"]},
        "ppo (reward_fn=embedded)": {**brief(runs["ppo"], ppo_keys), "wall_seconds": runs["ppo"]["wall_seconds"],
                                     "peak_rss_mib": runs["ppo"]["peak_rss_mib"]},
        "ppo (reward_model from fastalign rm)": {**brief(runs["ppo_rm"], ppo_keys),
                                                 "rm eval_accuracy after": runs["rm"]["summary"].get(
                                                     "eval_accuracy after"),
                                                 "wall_seconds": runs["ppo_rm"]["wall_seconds"],
                                                 "peak_rss_mib": runs["ppo_rm"]["peak_rss_mib"]},
        "grpo (reward_fn=embedded)": {**brief(runs["grpo"], grpo_keys), "wall_seconds": runs["grpo"]["wall_seconds"],
                                      "peak_rss_mib": runs["grpo"]["peak_rss_mib"]},
        "iterdpo (reward_fn=embedded)": {**brief(runs["iterdpo"], ("exact_match before", "exact_match after",
                                                                   "per_round")),
                                         "wall_seconds": runs["iterdpo"]["wall_seconds"],
                                         "peak_rss_mib": runs["iterdpo"]["peak_rss_mib"]}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["table"], indent=1))
    print(f"same start: {result['same_start']}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
