"""``fastalign <command>``: the command-line entry point (train a model, or inspect this install)."""

from __future__ import annotations

import argparse
import sys

TRAIN_COMMANDS = {
    "sft": "supervised fine-tuning (prompt/completion or messages rows)",
    "rm": "train a reward model (prompt/chosen/rejected rows)",
    "dpo": "DPO-family preference optimization (prompt/chosen/rejected rows)",
    "ppo": "PPO with a critic on prompt rows, rewarded by a reward function or a reward model",
    "grpo": "critic-free group RL (GRPO, Dr. GRPO, RLOO, REINFORCE++) on prompt rows, rewarded like ppo",
    "iterdpo": "iterative DPO (the study's DPO-Iter): rounds of sampling, scoring and pairing, then DPO",
}


def _train(command: str, argv: list[str]) -> int:
    from fastalign.hf import UnsupportedModelError
    from fastalign.train import (
        DPOConfig,
        GRPOConfig,
        IterDPOConfig,
        PPOConfig,
        RMConfig,
        SFTConfig,
        train_dpo,
        train_grpo,
        train_iterdpo,
        train_ppo,
        train_rm,
        train_sft,
    )
    from fastalign.train.checkpoint import CheckpointError
    from fastalign.train.common import TrainingDiverged
    from fastalign.train.config import ConfigError, parse_args
    from fastalign.train.data import DataError
    from fastalign.train.rewards import RewardError

    cls, fn = {"sft": (SFTConfig, train_sft), "rm": (RMConfig, train_rm), "dpo": (DPOConfig, train_dpo),
               "ppo": (PPOConfig, train_ppo), "grpo": (GRPOConfig, train_grpo),
               "iterdpo": (IterDPOConfig, train_iterdpo)}[command]
    try:
        fn(parse_args(cls, command, argv, f"fastalign {command}: {TRAIN_COMMANDS[command]}. {cls.__doc__}"))
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, FileNotFoundError, UnsupportedModelError,
            RewardError) as e:
        print(f"fastalign {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastalign", description=__doc__.split(":", 1)[1].strip())
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("env", help="print versions and which implementations are available here")
    sub.add_parser("bench", help="benchmarks against every installed peer (from a repository checkout); "
                   "`fastalign bench --help`", add_help=False)
    sub.add_parser("study", help="the seed study's experiments (toy, ablation); `fastalign study --help`",
                   add_help=False)
    for name, text in TRAIN_COMMANDS.items():
        sub.add_parser(name, help=f"{text}; `fastalign {name} --help` lists every option", add_help=False)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "env":
        from fastalign.env import main as env_main

        return env_main(rest)
    if args.command == "study":
        from fastalign.study import main as study_main

        return study_main(rest)
    if args.command == "bench":  # bench/ lives in the repository checkout, not in the wheel
        import os
        import subprocess
        from pathlib import Path

        here = Path(__file__).resolve().parents[1]
        roots = [r for r in (Path.cwd(), here) if (r / "bench" / "_harness.py").is_file()]
        if not roots:
            print("fastalign bench: error: no bench/_harness.py in the current directory or beside the installed "
                  f"package ({here}); the benchmarks ship in the repository, not the wheel: run `fastalign bench` "
                  "from the root of a fastalign checkout", file=sys.stderr)
            return 2
        path = os.pathsep.join(p for p in (str(roots[0]), os.environ.get("PYTHONPATH")) if p)
        return subprocess.call([sys.executable, "-m", "bench", *rest], env=dict(os.environ, PYTHONPATH=path))
    if args.command in TRAIN_COMMANDS:
        return _train(args.command, rest)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
