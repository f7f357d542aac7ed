"""``fastalign study ablation`` end to end on tiny budgets (the --quick path with smaller numbers): every row runs as
its own fastalign command from one SFT start, the outputs are written, and a killed study continues where it
stopped without rerunning finished rows."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastalign.study import ablation

REPO = Path(__file__).resolve().parents[2]
TINY = ["--seeds", "0", "--samples", "128", "--sft-steps", "20", "--dpo-steps", "4", "--iter-round-steps", "2"]


def study(tmp_path, *extra, **popen):
    cmd = [sys.executable, "-m", "fastalign.cli", "study", "ablation", *TINY, "--runs", str(tmp_path / "runs"),
           "--out", str(tmp_path / "out"), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_options_of_each_row_match_the_plan():
    plan = ablation.Plan(seeds=[0], samples=1280, sft_steps=10, dpo_steps=6, iter_rounds=3, iter_round_steps=2)
    opts = {row.name: ablation.options_of(row, plan, 7, "sft/final") for row in ablation.ROWS}
    assert opts["SFT"]["max_steps"] == 10 and "model" not in opts["SFT"]
    assert opts["PPO (baseline)"] == {**opts["PPO (baseline)"], "rollout_batch_size": 32, "max_steps": "40",
                                      "whiten_advantages": "false", "ref_ema_decay": 0.0, "model": "sft/final",
                                      "seed": 7}
    assert opts["+ adv. norm."]["whiten_advantages"] == "true" and opts["+ adv. norm."]["max_steps"] == "40"
    assert opts["+ large batch"]["rollout_batch_size"] == 128 and opts["+ large batch"]["max_steps"] == "10"
    assert opts["+ EMA reference"]["ref_ema_decay"] == 0.99
    assert opts["GRPO"]["max_steps"] == "10"  # 32 prompts x 4 completions per update
    assert opts["DPO-Iter"]["rollout_batch_size"] == "106" and opts["DPO-Iter"]["max_steps"] == 6  # 3 x 106 x 4
    assert opts["DPO"]["max_steps"] == 6 and opts["DPO"]["model"] == "sft/final"
    for bad, message in [(["--samples", "100"], "multiple of 128"), (["--seeds", ","], "at least one seed"),
                         (["--dpo-steps", "0"], "--dpo-steps must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            ablation.make_plan(ablation.parser().parse_args(bad))


def test_tiny_study_killed_continued_and_rerun(tmp_path):
    """A study killed once its DPO row is done continues, with the same arguments, where it stopped; its outputs
    are written; a row whose runs are removed is run again and gives the same held-out measures (seeded runs)."""
    proc = study(tmp_path, popen=True)
    deadline, done = time.time() + 600, []
    while time.time() < deadline and proc.poll() is None and not done:
        done = list((tmp_path / "runs").glob("*/seed0/dpo/eval.json")) if (tmp_path / "runs").exists() else []
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done, "the DPO row never finished: " + proc.stdout.read()[-3000:]
    assert not (tmp_path / "out").exists()

    resumed = study(tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "seed 0 SFT: done earlier" in resumed.stdout and "seed 0 DPO: done earlier" in resumed.stdout
    assert "seed 0 GRPO: fastalign grpo" in resumed.stdout
    result = json.loads((tmp_path / "out" / "study_ablation.json").read_text())
    assert list(result["summary"]) == [row.name for row in ablation.ROWS]
    for name, s in result["summary"].items():
        assert 0.0 <= s["exact_match"]["mean"] <= 1.0 and 0.0 <= s["reward"]["mean"] <= 1.0, name
        assert s["cpu_seconds"]["mean"] > 0, name
    assert result["summary"]["SFT"]["kl_to_sft"]["mean"] == 0.0  # the start against itself
    assert (tmp_path / "out" / "study_ablation.png").stat().st_size > 10_000
    assert "| + EMA reference |" in (tmp_path / "out" / "study_ablation.md").read_text()

    (seed_dir,) = (tmp_path / "runs").glob("*/seed0")
    shutil.rmtree(seed_dir / "grpo")
    (seed_dir / "grpo.time.json").unlink()
    again = study(tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "seed 0 GRPO: fastalign grpo" in again.stdout and "seed 0 PPO (baseline): done earlier" in again.stdout
    rerun = json.loads((tmp_path / "out" / "study_ablation.json").read_text())["summary"]["GRPO"]
    for k in ("exact_match", "reward", "kl_to_sft"):
        assert rerun[k]["values"] == pytest.approx(result["summary"]["GRPO"][k]["values"], abs=1e-12), k
