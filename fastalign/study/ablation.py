"""``fastalign study ablation``: the seed study's PPO ablation (its Table 3: advantage normalization, large batch,
EMA reference, added one at a time) and its DPO vs DPO-Iter vs PPO comparison (its Table 4), reproduced on the
embedded addition task with the real commands.

Per seed, one SFT start (``fastalign sft seed=s``), then from it, each as its own ``fastalign <command>`` process:

=================  ==================================================================================================
row                command and the options that make it
=================  ==================================================================================================
SFT                the start itself
DPO                ``fastalign dpo`` on the embedded preference pairs
DPO-Iter           ``fastalign iterdpo`` rewarded by the exact sum (5 rounds)
PPO (baseline)     ``fastalign ppo``: small batch (32 prompts per update), no advantage normalization, frozen ref.
+ adv. norm.       ``whiten_advantages=true``
+ large batch      ``rollout_batch_size=128`` (the same number of sampled completions: 4x fewer updates)
+ EMA reference    ``ref_ema_decay=0.99``
GRPO               ``fastalign grpo`` (32 prompts x 4 completions per update), a modern reference
=================  ==================================================================================================

The online rows sample the same number of completions (``--samples``); each run is then scored on the held-out
sums: greedy exact match, the mean exact-sum reward of sampled completions (temperature 1, 4 per prompt) and the
KL to the SFT start on those samples (``sum_t log pi(y_t) - log pi_sft(y_t)``, per completion, averaged).

Resumable: a finished run (its ``summary.json`` and ``eval.json``) is kept, a run stopped with a checkpoint resumes
from it (``resume=latest``), any other leftover is started again; so a killed study, rerun with the same
arguments, continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The seed study's own numbers (Xu et al., ICML 2024, PMLR 235), beside ours in the Markdown table: its Table 3 (the
# PPO ablation; baseline PPO with batch size 64; Llama2-7B on HH-RLHF, CodeLlama-34B on APPS) and its Table 4
# (HH-RLHF test set, Llama2-7B; the OpenAssistant reward model is not used in training). None: no such row there.
STUDY_TABLES = {
    "source": "Xu et al., Is DPO Superior to PPO for LLM Alignment? A Comprehensive Study, ICML 2024: Tables 3 and 4",
    "columns": {"hh_rlhf_reward": "HH-RLHF OpenAssistant reward (Table 3; DPO and DPO-Iter: Table 4)",
                "apps_intro_pass5": "APPS introductory pass@5, % (Table 3)"},
    "rows": {
        "SFT": {"hh_rlhf_reward": 0.532, "apps_intro_pass5": 38.6},
        "DPO": {"hh_rlhf_reward": 0.611, "apps_intro_pass5": None},
        "DPO-Iter": {"hh_rlhf_reward": 0.678, "apps_intro_pass5": None},
        "PPO (baseline)": {"hh_rlhf_reward": 0.706, "apps_intro_pass5": 18.0},
        "+ adv. norm.": {"hh_rlhf_reward": 0.716, "apps_intro_pass5": 38.1},
        "+ large batch": {"hh_rlhf_reward": 0.716, "apps_intro_pass5": 42.3},
        "+ EMA reference": {"hh_rlhf_reward": 0.718, "apps_intro_pass5": 44.4},
        "GRPO": {"hh_rlhf_reward": None, "apps_intro_pass5": None},
    },
}


@dataclass
class Row:
    """One row of the study: ``command`` with ``options`` (``{samples}`` in a value: the online sample budget;
    ``{updates32}`` / ``{updates128}``: that budget in updates of 32 / 128 completions)."""

    name: str
    slug: str  # its runs' folder name
    command: str
    options: dict = field(default_factory=dict)
    online: bool = False


PPO_BASELINE = {"rollout_batch_size": 32, "whiten_advantages": "false", "ref_ema_decay": 0.0,
                "max_steps": "{updates32}"}
ROWS = [
    Row("SFT", "sft", "sft"),
    Row("DPO", "dpo", "dpo"),
    Row("DPO-Iter", "dpo_iter", "iterdpo", {"rollout_batch_size": "{iter_prompts}"}, online=True),
    Row("PPO (baseline)", "ppo_baseline", "ppo", PPO_BASELINE, online=True),
    Row("+ adv. norm.", "ppo_adv_norm", "ppo", {**PPO_BASELINE, "whiten_advantages": "true"}, online=True),
    Row("+ large batch", "ppo_large_batch", "ppo", {**PPO_BASELINE, "whiten_advantages": "true",
                                                    "rollout_batch_size": 128, "max_steps": "{updates128}"},
        online=True),
    Row("+ EMA reference", "ppo_ema_ref", "ppo", {**PPO_BASELINE, "whiten_advantages": "true",
                                                  "rollout_batch_size": 128, "max_steps": "{updates128}",
                                                  "ref_ema_decay": 0.99}, online=True),
    Row("GRPO", "grpo", "grpo", {"rollout_batch_size": 32, "num_generations": 4, "max_steps": "{updates128}"},
        online=True),
]


@dataclass
class Plan:
    """The settings of one study: seeds, the online sample budget and the step counts derived from it."""

    seeds: list[int]
    samples: int
    sft_steps: int
    dpo_steps: int
    iter_rounds: int
    iter_round_steps: int
    eval_samples: int = 4

    @property
    def values(self) -> dict:
        # iterdpo: rounds x prompts x 4 completions = the budget
        return {"samples": self.samples, "updates32": self.samples // 32, "updates128": self.samples // 128,
                "iter_prompts": self.samples // (4 * self.iter_rounds)}


# fastalign dpo's and iterdpo's own defaults (150 DPO steps; 5 rounds of 50), with PPO's sample budget for the
# online rows; --quick: a shorter start, fewer steps and samples
DEFAULT = Plan(seeds=[0, 1, 2], samples=12800, sft_steps=600, dpo_steps=150, iter_rounds=5, iter_round_steps=50)
QUICK = Plan(seeds=[0], samples=2560, sft_steps=300, dpo_steps=50, iter_rounds=2, iter_round_steps=25)


def options_of(row: Row, plan: Plan, seed: int, sft_model: str) -> dict:
    """The ``key=value`` options of ``row``'s run for ``seed`` from the SFT model ``sft_model``."""
    out = {"seed": seed, "progress_bar": "false", "report_to_tensorboard": "false"}
    if row.command == "sft":
        out.update(max_steps=plan.sft_steps, save_steps=0, eval_steps=0)
        return out
    out["model"] = sft_model
    if row.command == "dpo":
        out["max_steps"] = plan.dpo_steps
    if row.command == "iterdpo":
        out["rounds"] = plan.iter_rounds
        out["max_steps"] = plan.iter_rounds * plan.iter_round_steps
    for k, v in row.options.items():
        out[k] = v.format(**plan.values) if isinstance(v, str) else v
    return out


def run_command(command: str, options: dict, out_dir: Path, log) -> tuple[float, float]:
    """``fastalign <command> key=value...`` in a fresh process writing into ``out_dir`` (resumed from its last
    checkpoint when it has one and has not finished, else started again in an empty one); its output goes to
    ``<out_dir>.log``. Returns
    its wall time and its CPU time (user + system, which a machine busy with other work inflates less) in
    seconds."""
    if out_dir.exists():
        if any(out_dir.glob("checkpoint-*")) and not (out_dir / "summary.json").exists():
            options = {**options, "resume": "latest"}
            log(f"    resuming the interrupted run in {out_dir}")
        else:  # a leftover without a checkpoint (or whose time was not recorded): the study's own, started again
            shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fastalign.cli", command, f"output_dir={out_dir}",
           *[f"{k}={v}" for k, v in options.items()]]
    log_path = out_dir.with_name(out_dir.name + ".log")
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); the end of {log_path}:\n"
                           + "\n".join(tail))
    return seconds, cpu


@torch.no_grad()
def evaluate(model_dir: str, sft_dir: str, seed: int, samples_per_prompt: int) -> dict:
    """Held-out measures of the model in ``model_dir``: greedy exact match, the mean exact-sum reward of
    ``samples_per_prompt`` completions per prompt sampled at temperature 1, and the mean KL to the SFT model on
    those samples (``sum_t log pi(y_t) - log pi_sft(y_t)`` per completion)."""
    from transformers.utils import logging as hf_logging

    from fastalign.assets import ASSETS
    from fastalign.hf import SequenceLogps
    from fastalign.train.common import exact_match
    from fastalign.train.data import Batcher, Encoder, load_prompts
    from fastalign.train.model import load_model, load_tokenizer
    from fastalign.train.rewards import addition_reward
    from fastalign.train.rollout import load_prompt_rows, sample

    hf_logging.disable_progress_bar()  # "Loading weights" bars between the study's lines
    tok = load_tokenizer(model_dir)
    enc = Encoder(tok, 64)
    path = str(ASSETS / "data" / "eval.jsonl")
    lm, sft = (load_model(d, dtype=torch.float32).eval() for d in (model_dir, sft_dir))
    greedy = exact_match(lm, tok, load_prompts(path, enc), 6)
    prompts = [p for p in load_prompt_rows(path, enc, 64 - 6) for _ in range(samples_per_prompt)]
    seeds = [seed * 2**32 + 10**9 + i for i in range(len(prompts))]  # apart from every training run's seeds
    ro = sample(lm, tok, prompts, seeds, max_new_tokens=6)
    rewards = addition_reward([p.text for p in ro.prompts], ro.texts)
    batcher = Batcher(tok.pad_token_id)
    kl = []
    for i in range(0, len(ro.examples), 256):
        batch = batcher.sft(ro.examples[i:i + 256])
        (lp, _), (ls, _) = SequenceLogps(lm)(**batch), SequenceLogps(sft)(**batch)
        kl += (lp - ls).double().tolist()
    return {"exact_match": greedy, "reward": sum(rewards) / len(rewards), "kl_to_sft": sum(kl) / len(kl)}


def mean_std(xs: list[float]) -> dict:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "values": xs}


def run_study(plan: Plan, root: Path, log) -> dict:
    """Every (seed, row) run of ``plan`` under ``root`` (skipping finished ones) and their held-out measures."""
    results: dict = {row.name: [] for row in ROWS}
    total, k = len(plan.seeds) * len(ROWS), 0
    for seed in plan.seeds:
        sft_dir = root / f"seed{seed}" / "sft"
        for row in ROWS:
            k += 1
            out = root / f"seed{seed}" / row.slug
            eval_path, time_path = out / "eval.json", out.with_name(out.name + ".time.json")
            if eval_path.exists():
                result = json.loads(eval_path.read_text())
                log(f"[{k}/{total}] seed {seed} {row.name}: done earlier (exact match {result['exact_match']:.3f})")
            else:
                options = options_of(row, plan, seed, str(sft_dir / "final"))
                if (out / "summary.json").exists() and time_path.exists():  # stopped in its evaluation
                    log(f"[{k}/{total}] seed {seed} {row.name}: trained earlier, evaluating")
                    times = json.loads(time_path.read_text())
                else:
                    log(f"[{k}/{total}] seed {seed} {row.name}: fastalign {row.command} ...")
                    seconds, cpu = run_command(row.command, options, out, log)
                    times = {"seconds": seconds, "cpu_seconds": cpu}
                    time_path.write_text(json.dumps(times))
                result = {**evaluate(str(out / "final"), str(sft_dir / "final"), seed, plan.eval_samples), **times,
                          "command": row.command, "options": options}
                eval_path.write_text(json.dumps(result, indent=1))
                log(f"    exact match {result['exact_match']:.3f}, reward {result['reward']:.3f}, KL to SFT "
                    f"{result['kl_to_sft']:.3f}, {seconds:.0f} s ({cpu:.0f} s of CPU)")
            results[row.name].append({"seed": seed, **result})
    return results


def summarize(results: dict) -> dict:
    return {name: {k: mean_std([r[k] for r in runs])
                   for k in ("exact_match", "reward", "kl_to_sft", "seconds", "cpu_seconds")}
            for name, runs in results.items()}


def markdown(summary: dict, plan: Plan, header: str) -> str:
    lines = [header, "",
             "| row | held-out exact match | per seed | held-out reward (sampled) | KL to SFT | wall / CPU time (s) | "
             "study: HH-RLHF reward | study: APPS intro pass@5 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in ("exact_match", "reward", "kl_to_sft")]
        cells.insert(1, " / ".join(f"{v:.3f}" for v in s["exact_match"]["values"]))
        theirs = STUDY_TABLES["rows"].get(name, {})
        study = [("—" if theirs.get(k) is None else f"{theirs[k]:g}" + ("%" if k == "apps_intro_pass5" else ""))
                 for k in ("hh_rlhf_reward", "apps_intro_pass5")]
        times = f"{s['seconds']['mean']:.0f} / {s['cpu_seconds']['mean']:.0f}"
        lines.append(f"| {name} | {' | '.join(cells)} | {times} | {' | '.join(study)} |")
    lines += ["", f"Mean ± standard deviation over seeds {plan.seeds}; online rows sample {plan.samples} "
                  "completions each. The last two columns are the study's own numbers (its Tables 3 and 4: "
                  "Llama2-7B on HH-RLHF, CodeLlama-34B on APPS, baseline PPO at batch size 64), for the direction "
                  "of each step, not for comparison of values."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, key, label in ((axes[0], "exact_match", "held-out exact match (greedy)"),
                           (axes[1], "kl_to_sft", "KL to the SFT start (nats per completion)")):
        means = [summary[n][key]["mean"] for n in names]
        stds = [summary[n][key]["std"] for n in names]
        colors = ["#999999", "#4c72b0", "#55a868"] + ["#dd8452"] * 4 + ["#8172b3"]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=colors[:len(names)])
        for i, n in enumerate(names):
            ax.scatter([i] * len(summary[n][key]["values"]), summary[n][key]["values"], s=8, color="k", zorder=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastalign study ablation",
        description="The seed study's PPO ablation (Table 3: + advantage normalization, + large batch, + EMA "
                    "reference) and SFT / DPO / DPO-Iter / PPO / GRPO (Table 4) on the embedded addition task, each "
                    "row a real fastalign command from one SFT start per seed. The default (3 seeds) takes about "
                    "30 minutes on 2 CPU cores; --quick (1 seed, smaller budgets) about 5. Rerun the same command "
                    "to continue a stopped study.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 2560 sampled completions per online run")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1,2; --quick: 0)")
    p.add_argument("--samples", type=int, default=None,
                   help="sampled completions per online run (default 12800; --quick 2560); a multiple of 128")
    p.add_argument("--sft-steps", type=int, default=None, help="steps of each seed's SFT start (default 600; "
                   "--quick 300)")
    p.add_argument("--dpo-steps", type=int, default=None, help="DPO steps of the DPO row (default 150; --quick 50)")
    p.add_argument("--iter-round-steps", type=int, default=None,
                   help="DPO steps of each DPO-Iter round (default 50, 5 rounds; --quick 25, 2 rounds)")
    p.add_argument("--runs", type=Path, default=Path("runs/study_ablation"), help="folder of the runs")
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="folder of <name>.json, <name>.md and <name>.png")
    p.add_argument("--name", default="study_ablation", help="file name stem of the outputs")
    return p


def make_plan(args) -> Plan:
    base = QUICK if args.quick else DEFAULT
    seeds = base.seeds if args.seeds is None else [int(s) for s in args.seeds.split(",") if s.strip()]
    samples = base.samples if args.samples is None else args.samples
    if not seeds:
        raise ValueError(f"--seeds must name at least one seed; got {args.seeds!r}")
    if samples < 128 or samples % 128:
        raise ValueError(f"--samples must be a positive multiple of 128 (updates of 32 and 128 completions); "
                         f"got {samples}")
    sft_steps = base.sft_steps if args.sft_steps is None else args.sft_steps
    dpo_steps = base.dpo_steps if args.dpo_steps is None else args.dpo_steps
    round_steps = base.iter_round_steps if args.iter_round_steps is None else args.iter_round_steps
    for name, value in (("--sft-steps", sft_steps), ("--dpo-steps", dpo_steps), ("--iter-round-steps", round_steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    return Plan(seeds=seeds, samples=samples, sft_steps=sft_steps, dpo_steps=dpo_steps, iter_rounds=base.iter_rounds,
                iter_round_steps=round_steps)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    try:
        plan = make_plan(args)
    except ValueError as e:
        print(f"fastalign study ablation: error: {e}", file=sys.stderr)
        return 2
    # another budget is another study: its runs never mix with these
    root = args.runs / f"samples{plan.samples}-sft{plan.sft_steps}-dpo{plan.dpo_steps}-iter{plan.iter_round_steps}"

    def log(text: str) -> None:
        print(text, flush=True)

    start = time.perf_counter()
    try:
        results = run_study(plan, root, log)
    except RuntimeError as e:
        print(f"fastalign study ablation: error: {e}", file=sys.stderr)
        return 1
    summary = summarize(results)
    import fastalign

    runs = [r for rows in results.values() for r in rows]
    result = {"command": "fastalign study ablation " + " ".join(argv), "seconds": time.perf_counter() - start,
              "runs_wall_seconds_total": sum(r["seconds"] for r in runs),
              "runs_cpu_seconds_total": sum(r["cpu_seconds"] for r in runs),
              "plan": {"seeds": plan.seeds, "samples": plan.samples, "sft_steps": plan.sft_steps,
                       "dpo_steps": plan.dpo_steps, "iter_rounds": plan.iter_rounds,
                       "iter_round_steps": plan.iter_round_steps, "eval_samples_per_prompt": plan.eval_samples},
              "rows": {row.name: {"command": row.command, "options": row.options} for row in ROWS},
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "fastalign": fastalign.__version__},
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "summary": summary, "runs": results,
              "study": STUDY_TABLES}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    title = (f"fastalign study ablation: embedded addition task, seeds {plan.seeds}, {plan.samples} sampled "
             f"completions per online run")
    (args.out / f"{args.name}.md").write_text(markdown(summary, plan, f"# {title}"))
    plot(summary, args.out / f"{args.name}.png", title)
    log(markdown(summary, plan, f"fastalign study ablation: {result['seconds']:.0f} s now; its runs took "
                                f"{result['runs_wall_seconds_total']:.0f} s of wall time and "
                                f"{result['runs_cpu_seconds_total']:.0f} s of CPU time in all"))
    log(f"wrote {args.out / args.name}.json, .md and .png")
    return 0
