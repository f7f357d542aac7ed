"""``fastalign iterdpo`` end to end on the embedded model for a few rounds: pair construction against hand-made
groups (ties, all-equal groups, margins), the dataset-completion fallback, the per-round reference, the reward model
route, resume after SIGKILL inside a round, DDP equal to one process, and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainhelp import quick, tiny_qwen2, torchrun

from fastalign.train import IterDPOConfig, RMConfig, train_iterdpo, train_rm
from fastalign.train.config import ConfigError, make_config
from fastalign.train.iterdpo import preference_pairs
from fastalign.train.model import load_model
from fastalign.train.rewards import RewardError

REPO = Path(__file__).resolve().parents[2]
KILL_AT_STEP = Path(__file__).with_name("kill_at_step.py")
ME = Path(__file__).resolve()


def text_reward(prompts, completions):
    """Scores that differ within a group (a random init's completions differ)."""
    return [float(sum(map(ord, c)) % 5) for c in completions]


def bad_reward(prompts, completions):
    raise KeyError("no such answer")


def itd_over(tmp_path, small_data, **over) -> dict:
    """Two rounds of two DPO steps: 3 prompts x 4 completions per round, micro-batches of 2 pairs, no warm start."""
    base = {"data": small_data["sft"], "gen_eval_data": small_data["gen"], "output_dir": str(tmp_path / "itd"),
            "sft_warmup_steps": 0, "rounds": 2, "max_steps": 4, "rollout_batch_size": 3, "num_generations": 4,
            "per_device_train_batch_size": 2, "warmup_steps": 0, "eval_steps": 0, "save_steps": 0,
            "logging_steps": 1, "progress_bar": False, "plots": False, "report_to_tensorboard": False,
            "max_new_tokens": 4, "reward_fn": f"{ME}:text_reward", "learning_rate": 1e-3}
    base.update(over)
    return base


def rows(out_dir):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_pairs_of_hand_made_groups():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.0,   2.0, 2.0, 2.0, 2.0,   3.0, 1.0, 3.0, 1.0])
    pairs, tied = preference_pairs(scores, 4)
    assert pairs == [(0, 1), (8, 9)] and tied == [1]  # ties: the first best over the first worst
    pairs, tied = preference_pairs(scores, 4, "all")
    assert pairs == [(0, 1), (0, 2), (0, 3), (2, 1), (2, 3), (8, 9), (8, 11), (10, 9), (10, 11)] and tied == [1]
    pairs, tied = preference_pairs(scores, 4, "best_worst", margin=1.5)  # group 0's gap is 1, group 2's is 2
    assert pairs == [(8, 9)] and tied == [0, 1]
    pairs, tied = preference_pairs(scores, 4, "all", margin=0.5)  # a gap must exceed the margin: 0.5 does not
    assert pairs == [(0, 1), (0, 3), (8, 9), (8, 11), (10, 9), (10, 11)] and tied == [1]
    with pytest.raises(ValueError, match="multiple of group_size=5"):
        preference_pairs(scores, 5)


def test_iterdpo_end_to_end(tmp_path, small_data):
    over = itd_over(tmp_path, small_data, plots=True)
    summary = train_iterdpo(make_config(IterDPOConfig, over, "iterdpo"))
    logged = rows(over["output_dir"])
    rounds = [r for r in logged if "pairs" in r]
    steps = [r for r in logged if "loss" in r]
    assert [r["round"] for r in rounds] == [1, 2] and [r["step"] for r in rounds] == [1, 3]
    assert all(1 <= r["pairs"] <= 3 and r["pairs"] + r["pairs/tied_prompts"] >= 3 for r in rounds)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["round"] for r in steps] == [1, 1, 2, 2]
    assert [r["step"] for r in logged if "eval_exact_match" in r] == [2, 4]  # the end of each round
    assert [r["round"] for r in summary["per_round"]] == [1, 2]
    assert "exact_match before" in summary and "exact_match after" in summary
    assert Path(summary["plot"]).exists()
    ckpts = sorted(int(p.name.split("-")[1]) for p in Path(over["output_dir"]).glob("checkpoint-*"))
    assert ckpts == [2, 4]  # every round's end


@pytest.mark.parametrize("ref_update", ["round", "fixed"])
def test_the_reference_is_the_rounds_start_or_the_first(tmp_path, small_data, ref_update):
    """At the first step of a round the policy is the round's start: with ref_update=round its implicit rewards
    are 0 there (up to the float rounding of another batch layout); with fixed they are not, from round 2."""
    over = itd_over(tmp_path, small_data, ref_update=ref_update, loss_type="sigmoid", learning_rate=1e-2)
    train_iterdpo(make_config(IterDPOConfig, over, "iterdpo"))
    firsts = {r["step"]: r for r in rows(over["output_dir"]) if "loss" in r and r["step"] in (1, 3)}
    assert abs(firsts[1]["rewards/chosen"]) < 1e-5 and abs(firsts[1]["rewards/rejected"]) < 1e-5
    second = max(abs(firsts[3]["rewards/chosen"]), abs(firsts[3]["rewards/rejected"]))
    assert (second < 1e-5) if ref_update == "round" else (second > 1e-3)


def test_the_datasets_completion_pairs_when_every_sample_ties(tmp_path, small_data):
    """A random init never writes the right sum: the exact-sum reward ties every group at 0, and each prompt's
    dataset completion (scoring 1) becomes its chosen; without data_chosen no pair is left and no step trains."""
    over = itd_over(tmp_path, small_data, reward_fn="embedded", rounds=1, max_steps=2)
    summary = train_iterdpo(make_config(IterDPOConfig, over, "iterdpo"))
    (r,) = summary["per_round"]
    assert r["pairs/tied_prompts"] == 3 and r["pairs/from_data"] == 3 and r["pairs"] == 3
    assert r["rollout/reward"] == 0.0
    over = itd_over(tmp_path / "b", small_data, reward_fn="embedded", rounds=1, max_steps=2, data_chosen=False)
    summary = train_iterdpo(make_config(IterDPOConfig, over, "iterdpo"))
    assert summary["per_round"][0]["pairs"] == 0
    assert not [x for x in rows(over["output_dir"]) if "loss" in x]
    start = load_model("embedded", seed=0).state_dict()
    final = load_file(str(Path(summary["final_model"]) / "model.safetensors"))
    assert all(torch.equal(final[k], start[k]) for k in final)


def test_reward_model_route(tmp_path, small_data):
    rm = train_rm(make_config(RMConfig, quick(tmp_path, small_data, "rm", max_steps=2), "rm"))
    over = itd_over(tmp_path, small_data, reward_model=rm["final_model"], rounds=1, max_steps=2)
    summary = train_iterdpo(make_config(IterDPOConfig, over, "iterdpo"))
    (r,) = summary["per_round"]
    assert r["pairs"] == 3 and r["pairs/tied_prompts"] == 0  # real-valued scores: no ties


def test_killed_run_resumes_bitwise_inside_a_round(tmp_path, small_data):
    common = {"rounds": 2, "max_steps": 6, "save_steps": 1, "gen_eval_data": ""}
    whole = itd_over(tmp_path / "whole", small_data, **common)
    train_iterdpo(make_config(IterDPOConfig, whole, "iterdpo"))
    cut = itd_over(tmp_path / "cut", small_data, **common)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(KILL_AT_STEP), "5", "iterdpo", *[f"{k}={v}" for k, v in cut.items()]],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert max(r["step"] for r in rows(cut["output_dir"])) == 5
    summary = train_iterdpo(make_config(IterDPOConfig, {**cut, "resume": "latest"}, "iterdpo"))
    a = load_file(str(Path(whole["output_dir"]) / "final" / "model.safetensors"))
    b = load_file(str(Path(summary["final_model"]) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untimed = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(d["output_dir"])]
               for d in (whole, cut)]
    assert untimed[0] == untimed[1]  # the metrics of the resumed run's rows too (timings aside)


def test_killed_run_resumes_bitwise_at_a_rounds_end(tmp_path, small_data):
    common = {"rounds": 2, "max_steps": 4, "gen_eval_data": ""}
    whole = itd_over(tmp_path / "whole", small_data, **common)
    train_iterdpo(make_config(IterDPOConfig, whole, "iterdpo"))
    cut = itd_over(tmp_path / "cut", small_data, **common)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(KILL_AT_STEP), "2", "iterdpo", *[f"{k}={v}" for k, v in cut.items()]],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    with pytest.raises(ConfigError, match="must stay 2 steps per round on resume"):  # 8 / 2: rounds of 4 steps
        train_iterdpo(make_config(IterDPOConfig, {**cut, "resume": "latest", "max_steps": 8}, "iterdpo"))
    summary = train_iterdpo(make_config(IterDPOConfig, {**cut, "resume": "latest"}, "iterdpo"))
    a = load_file(str(Path(whole["output_dir"]) / "final" / "model.safetensors"))
    b = load_file(str(Path(summary["final_model"]) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole_rounds = json.loads((Path(whole["output_dir"]) / "summary.json").read_text())["per_round"]
    assert [{k: v for k, v in r.items() if k != "time/rollout"} for r in summary["per_round"]] == \
        [{k: v for k, v in r.items() if k != "time/rollout"} for r in whole_rounds]


def test_ddp_equals_one_process(tmp_path, small_data):
    """Two ranks of 2 prompts and 1 pair per micro-batch each = one process of 4 prompts and 2 pairs: the same
    pairs in the same global order, the same global batches. In float64, so that what differs (the ranks'
    gradients summed in another order, the reference log-probabilities of other batch layouts) is rounding far
    below what a wrong pair, order or batch would change; after 4 Adam steps in float32 those roundings reach
    1e-5 on near-zero gradients."""
    common = {"rounds": 2, "max_steps": 4, "num_generations": 3, "gen_eval_data": "", "loss_type": "sigmoid",
              "dtype": "float64"}
    one = itd_over(tmp_path / "one", small_data, rollout_batch_size=4, per_device_train_batch_size=2, **common)
    train_iterdpo(make_config(IterDPOConfig, one, "iterdpo"))
    two = itd_over(tmp_path / "two", small_data, rollout_batch_size=2, per_device_train_batch_size=1, **common)
    proc = torchrun("iterdpo", two, tmp_path, {"PYTHONPATH": f"{REPO}:{ME.parent}"})  # text_reward's imports
    assert proc.returncode == 0, proc.stderr[-3000:]
    untimed = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(d) if "pairs" in r]
               for d in (one["output_dir"], two["output_dir"])]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2  # the same pairs and rewards in both rounds
    a, b = (load_file(f"{d}/final/model.safetensors") for d in (one["output_dir"], two["output_dir"]))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-10, msg=name)


def test_bad_reward_functions_and_options_are_clear_errors(tmp_path, small_data):
    with pytest.raises(RewardError, match="bad_reward.*raised KeyError"):
        train_iterdpo(make_config(IterDPOConfig, itd_over(tmp_path, small_data, reward_fn=f"{ME}:bad_reward"),
                                  "iterdpo"))
    for bad, message in [({"max_steps": 5}, "max_steps must be a multiple of rounds=2; got 5"),
                         ({"num_generations": 1}, "num_generations must be >= 2"),
                         ({"pairs": "best"}, "pairs must be best_worst, all; got 'best'"),
                         ({"pair_margin": -1}, "pair_margin must be >= 0"),
                         ({"ref_update": "ema"}, "ref_update must be round, fixed; got 'ema'"),
                         ({"sync_ref_model": True}, "sync_ref_model must be false"),
                         ({"rounds": 0}, "rounds must be >= 1")]:
        with pytest.raises(ConfigError, match=message):
            make_config(IterDPOConfig, itd_over(tmp_path, small_data, **bad), "iterdpo")


def test_cli_help_lists_every_iterdpo_option(capsys):
    import dataclasses

    from fastalign.cli import main

    with pytest.raises(SystemExit):
        main(["iterdpo", "--help"])
    out = capsys.readouterr().out
    assert all(f"--{f.name}" in out for f in dataclasses.fields(IterDPOConfig))


def test_iterdpo_on_a_local_hugging_face_model(tmp_path, small_data):
    """A random-init Qwen2 saved with save_pretrained (untied LM head, another architecture than the embedded
    Llama), with the embedded tokenizer: a real model starts as it is, no warm start; ref_update=fixed loads it
    again as the reference."""
    tiny_qwen2(tmp_path / "qwen2")
    over = itd_over(tmp_path, small_data, model=str(tmp_path / "qwen2"), tokenizer="embedded", ref_update="fixed")
    summary = train_iterdpo(make_config(IterDPOConfig, over, "iterdpo"))
    assert summary["start_model"] == str(tmp_path / "qwen2")
    assert [r["pairs"] > 0 for r in summary["per_round"]] == [True, True]
    final = load_file(str(Path(summary["final_model"]) / "model.safetensors"))
    start = load_file(str(tmp_path / "qwen2" / "model.safetensors"))
    assert "lm_head.weight" in final and not torch.equal(final["lm_head.weight"], start["lm_head.weight"])
