"""``fastalign study <experiment>``: the seed study's experiments (Xu et al., "Is DPO Superior to PPO for LLM
Alignment? A Comprehensive Study", ICML 2024), each reproduced by one command.

- ``toy``: the synthetic 8 x 8 experiment of the study's Section 4 (Figure 1) and its Table 1 counter-example:
  DPO drifts to responses the preference data never cover, PPO does not (:mod:`fastalign.study.toy`).
- ``ablation``: the PPO ablation (Table 3) and DPO vs DPO-Iter vs PPO on the embedded task
  (:mod:`fastalign.study.ablation`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = ("the seed study's experiments (Xu et al., \"Is DPO Superior to PPO for LLM Alignment?\", ICML 2024), "
               "one command each; `fastalign study <experiment> --help` lists its options")
EXPERIMENTS = {
    "toy": "the synthetic 8 x 8 experiment (Figure 1) and the Table 1 counter-example; under a minute on a CPU",
    "ablation": "the PPO ablation (Table 3) and DPO vs DPO-Iter vs PPO on the embedded task",
}


def main(argv=None) -> int:
    """Run ``fastalign study <experiment> [options]``; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="fastalign study", description=DESCRIPTION)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS), metavar="experiment",
                        help="; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in EXPERIMENTS:
        print(f"fastalign study: error: experiment must be one of {sorted(EXPERIMENTS)}; got {argv[0]!r}",
              file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(f"fastalign.study.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"fastalign.study.{name}":
            raise
        print(f"fastalign study {name}: not available in this version (fastalign/study/{name}.py is not "
              f"written yet)", file=sys.stderr)
        return 2
    return module.main(rest)
