"""``fastalign grpo`` end to end on the embedded model for a few updates: layouts, the group advantages against hand
computations, each loss_type's aggregation, the on-policy guarantee, zero-std groups, resume after SIGKILL, and
bad reward functions."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainhelp import tiny_qwen2, torchrun

import fastalign.train.grpo as grpo_module
from fastalign.train import GRPOConfig, train_grpo
from fastalign.train.common import Run
from fastalign.train.config import ConfigError, make_config
from fastalign.train.grpo import group_advantages, group_stats
from fastalign.train.model import load_model
from fastalign.train.rewards import RewardError

REPO = Path(__file__).resolve().parents[2]
KILL_AT_STEP = Path(__file__).with_name("kill_at_step.py")
ME = Path(__file__).resolve()


def text_reward(prompts, completions):
    """Scores that differ within a group (a random init's completions differ), and log what was scored when
    GRPO_TEST_LOG names a file."""
    scores = [float(sum(map(ord, c)) % 5) for c in completions]
    log = os.environ.get("GRPO_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"prompts": prompts, "scores": scores}) + "\n")
    return scores


def half_constant_reward(prompts, completions):
    """1 for every completion of a prompt whose first operand is even (a zero-std group), else text_reward's."""
    return [1.0 if int(p.split("+")[0]) % 2 == 0 else s for p, s in zip(prompts, text_reward(prompts, completions))]


def constant_reward(prompts, completions):
    return [0.5] * len(completions)


def bad_reward(prompts, completions):
    raise KeyError("no such answer")


def short_reward(prompts, completions):
    return [1.0] * (len(completions) - 1)


def grpo_over(tmp_path, small_data, **over) -> dict:
    """A few small updates: 3 prompts x 4 completions in 2 minibatches of micro-batches of 4 (so the first
    minibatch is groups 1 and half of 2: sums of advantages that do not cancel), no warm start."""
    base = {"data": small_data["sft"], "gen_eval_data": small_data["gen"], "output_dir": str(tmp_path / "grpo"),
            "sft_warmup_steps": 0, "max_steps": 2, "rollout_batch_size": 3, "num_generations": 4,
            "num_mini_batches": 2, "per_device_train_batch_size": 4, "eval_steps": 0, "save_steps": 0,
            "logging_steps": 1, "progress_bar": False, "plots": False, "report_to_tensorboard": False,
            "max_new_tokens": 4, "reward_fn": f"{ME}:text_reward"}
    base.update(over)
    return base


def rows_of(out_dir):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if '"reward"' in line]


@pytest.mark.parametrize("packing", [False, True])
def test_grpo_end_to_end(tmp_path, small_data, packing):
    over = grpo_over(tmp_path, small_data, packing=packing, num_iterations=2, beta=0.1, epsilon_high=0.28,
                     plots=True)
    summary = train_grpo(make_config(GRPOConfig, over, "grpo"))
    rows = rows_of(over["output_dir"])
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["policy/ratio_max_abs_dev_first_minibatch"] == 0.0
        for k in ("reward", "reward_std", "kl", "completions/mean_length", "completions/clipped_ratio",
                  "clip_ratio/region_mean", "entropy", "frac_reward_zero_std", "loss", "grad_norm", "learning_rate",
                  "time/generation", "time/scoring", "time/training", "tokens_per_second"):
            assert k in r, k
    assert rows[0]["reward_std"] > 0 and rows[-1]["kl"] > 0  # the policy moved away from the reference
    assert (Path(summary["final_model"]) / "model.safetensors").exists()
    assert (Path(over["output_dir"]) / "curves.png").stat().st_size > 1000
    assert 0 <= summary["exact_match after"] <= 1 and summary["exact_match before"] is not None


def test_group_advantages_against_hand_computed_groups():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    lengths = [1, 2, 3, 1, 2, 2, 1, 1]

    def per_token(per_seq):
        return torch.tensor([a for a, n in zip(per_seq, lengths) for _ in range(n)])

    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; group 2: all equal, advantage 0
    std = math.sqrt(1 / 3)
    a = 0.5 / (std + 1e-6)
    want = {("grpo", True): [a, -a, -a, a, 0, 0, 0, 0], ("grpo", False): [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0],
            ("dr_grpo", True): [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0],
            ("rloo", True): [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 0, 0, 0, 0]}  # s_i - mean of the others
    for (kind, scale), per_seq in want.items():
        got = group_advantages(scores, lengths, kind, 4, scale)
        assert torch.allclose(got, per_token(per_seq), atol=1e-6), (kind, scale, got)
    # REINFORCE++-baseline: r - group mean on each token, then whitened over the 13 tokens (unbiased std)
    x = per_token([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]).double()
    mean = (0.5 - 1.0 - 1.5 + 0.5) / 13
    var = ((x - mean) ** 2).sum() / 12
    got = group_advantages(scores, lengths, "reinforce_pp", 4)
    assert torch.allclose(got.double(), (x - mean) / torch.sqrt(var + 1e-8), atol=1e-6)
    stats = group_stats(scores, 4)
    assert stats == pytest.approx({"reward": 1.25, "reward_std": std / 2, "frac_reward_zero_std": 0.5}, abs=1e-12)


def test_the_loop_groups_each_prompts_completions_and_feeds_the_losses_their_advantages(tmp_path, small_data,
                                                                                        monkeypatch):
    fed, real_loss = [], grpo_module.ppo_policy_loss

    def record(logps, old, adv, **kw):
        fed.append((adv.detach().clone(), kw["cu_seqlens"].clone()))
        return real_loss(logps, old, adv, **kw)

    monkeypatch.setattr(grpo_module, "ppo_policy_loss", record)
    monkeypatch.setenv("GRPO_TEST_LOG", str(tmp_path / "scored.jsonl"))
    over = grpo_over(tmp_path, small_data, max_steps=1, advantage="rloo")
    train_grpo(make_config(GRPOConfig, over, "grpo"))
    (scored,) = [json.loads(line) for line in open(tmp_path / "scored.jsonl")]
    prompts, scores = scored["prompts"], scored["scores"]
    assert len(prompts) == 12 and all(len(set(prompts[g * 4:(g + 1) * 4])) == 1 for g in range(3))
    assert len(set(prompts)) == 3
    want = [s - (sum(scores[g * 4:(g + 1) * 4]) - s) / 3 for g in range(3) for s in scores[g * 4:(g + 1) * 4]]
    seen = []  # the micro-batches of the one pass: [0..3], [4, 5] | [6..9], [10, 11]; one advantage per sequence
    for adv, cu in fed:
        seen += [float(adv[int(cu[k])]) for k in range(len(cu) - 1)]
        assert all(torch.all(adv[int(cu[k]):int(cu[k + 1])] == adv[int(cu[k])]) for k in range(len(cu) - 1))
    assert seen == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_each_loss_type_aggregates_the_first_minibatch_as_by_hand(tmp_path, small_data, monkeypatch, loss_type):
    """On the first (exactly on-policy) minibatch every token's clipped loss is ``-A`` (ratio 1), so its loss is the
    aggregation of ``-A`` over sequences 0..5 (micro-batches [0..3] and [4, 5])."""
    recorded, real_adv, real_acc = {}, grpo_module.group_advantages, Run.accumulate

    def record_adv(scores, lengths, *a, **kw):
        out = real_adv(scores, lengths, *a, **kw)
        recorded.setdefault("adv", (out, list(lengths)))
        return out

    def record_acc(self, step, n, loss_of, reduce="mean"):
        metrics = real_acc(self, step, n, loss_of, reduce)
        if "adv" in recorded:  # the first GRPO minibatch (not the warm start's SFT steps)
            recorded.setdefault("loss", metrics["loss"])
        return metrics

    monkeypatch.setattr(grpo_module, "group_advantages", record_adv)
    monkeypatch.setattr(Run, "accumulate", record_acc)
    over = grpo_over(tmp_path, small_data, max_steps=1, loss_type=loss_type, sft_warmup_steps=40)  # some EOS
    train_grpo(make_config(GRPOConfig, over, "grpo"))
    adv, lengths = recorded["adv"]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    seq = [[-float(x) for x in adv[cu[s]:cu[s + 1]]] for s in range(12)]  # each sequence's per-token loss -A
    first, micro = seq[:6], [seq[:4], seq[4:6]]
    want = {"grpo": sum(sum(t) / len(t) for t in first) / 6,
            "bnpo": sum(sum(map(sum, mb)) / sum(map(len, mb)) for mb in micro) / 2,
            "dr_grpo": sum(map(sum, first)) / (6 * 4),  # 6 sequences x max_new_tokens 4
            "dapo": sum(map(sum, first)) / sum(map(len, first))}
    assert abs(want["grpo"] - want["dapo"]) > 1e-3 and abs(want["bnpo"] - want["dapo"]) > 1e-4  # they differ here
    assert recorded["loss"] == pytest.approx(want[loss_type], abs=1e-6)


def test_one_pass_is_exactly_on_policy_and_the_first_minibatch_of_many(tmp_path, small_data):
    over = grpo_over(tmp_path, small_data, num_mini_batches=1, num_iterations=1, max_steps=3, epsilon=0.01)
    train_grpo(make_config(GRPOConfig, over, "grpo"))
    for r in rows_of(over["output_dir"]):  # one pass, one minibatch: ratio 1 on every token, nothing clipped
        assert r["policy/ratio_max_abs_dev_first_minibatch"] == 0.0 and r["clip_ratio/region_mean"] == 0.0
    over = grpo_over(tmp_path / "b", small_data, num_iterations=3, max_steps=2, epsilon=0.01, learning_rate=1e-2)
    train_grpo(make_config(GRPOConfig, over, "grpo"))
    rows = rows_of(over["output_dir"])  # scored on the first pass's micro-batches: its first minibatch is exact
    assert all(r["policy/ratio_max_abs_dev_first_minibatch"] == 0.0 for r in rows)
    assert any(r["clip_ratio/region_mean"] > 0 for r in rows)  # the later minibatches are off-policy


def test_zero_std_groups_have_zero_advantage_and_are_counted(tmp_path, small_data, monkeypatch):
    fed, real_adv = [], grpo_module.group_advantages

    def record(scores, lengths, *a, **kw):
        fed.append((scores, lengths, real_adv(scores, lengths, *a, **kw)))
        return fed[-1][2]

    monkeypatch.setattr(grpo_module, "group_advantages", record)
    monkeypatch.setenv("GRPO_TEST_LOG", str(tmp_path / "scored.jsonl"))
    over = grpo_over(tmp_path, small_data, max_steps=3, rollout_batch_size=4, reward_fn=f"{ME}:half_constant_reward")
    train_grpo(make_config(GRPOConfig, over, "grpo"))
    rows = rows_of(over["output_dir"])
    for step, (scores, lengths, adv) in enumerate(fed):
        groups = scores.view(-1, 4)
        equal = [bool((g == g[0]).all()) for g in groups]
        assert rows[step]["frac_reward_zero_std"] == sum(equal) / len(equal)
        per_seq = torch.split(adv, lengths)
        for g, is_equal in enumerate(equal):
            if is_equal:
                assert all(torch.all(a == 0) for a in per_seq[g * 4:(g + 1) * 4])
    assert any(0 < r["frac_reward_zero_std"] < 1 for r in rows)
    # every group equal: no advantage, no loss, no gradient (beta = 0): the weights do not move
    over = grpo_over(tmp_path / "c", small_data, max_steps=2, reward_fn=f"{ME}:constant_reward")
    summary = train_grpo(make_config(GRPOConfig, over, "grpo"))
    rows = rows_of(over["output_dir"])
    assert all(r["frac_reward_zero_std"] == 1.0 and r["reward_std"] == 0.0 and r["grad_norm"] == 0.0 for r in rows)
    start = load_model("embedded", seed=0).state_dict()
    final = load_file(str(Path(summary["final_model"]) / "model.safetensors"))
    assert all(torch.equal(final[k], start[k]) for k in final)


def test_killed_run_resumes_bitwise(tmp_path, small_data):
    common = {"max_steps": 4, "save_steps": 2, "beta": 0.05, "num_iterations": 2, "gen_eval_data": ""}
    whole = grpo_over(tmp_path / "whole", small_data, **common)
    train_grpo(make_config(GRPOConfig, whole, "grpo"))
    cut = grpo_over(tmp_path / "cut", small_data, **common)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(KILL_AT_STEP), "3", "grpo", *[f"{k}={v}" for k, v in cut.items()]],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["step"] for r in rows_of(cut["output_dir"])] == [1, 2, 3]
    train_grpo(make_config(GRPOConfig, {**cut, "resume": "latest"}, "grpo"))
    a = load_file(str(Path(whole["output_dir"]) / "final" / "model.safetensors"))
    b = load_file(str(Path(cut["output_dir"]) / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rows_of(whole["output_dir"])[-1]["kl"] == rows_of(cut["output_dir"])[-1]["kl"]


def test_bad_reward_functions_and_options_are_clear_errors(tmp_path, small_data):
    with pytest.raises(RewardError, match="bad_reward.*raised KeyError"):
        train_grpo(make_config(GRPOConfig, grpo_over(tmp_path, small_data, reward_fn=f"{ME}:bad_reward"), "grpo"))
    with pytest.raises(RewardError, match="expected 12, got 11"):
        train_grpo(make_config(GRPOConfig, grpo_over(tmp_path, small_data, reward_fn=f"{ME}:short_reward",
                                                     output_dir=str(tmp_path / "b")), "grpo"))
    with pytest.raises(ConfigError, match="has no attribute 'no_such'"):
        train_grpo(make_config(GRPOConfig, grpo_over(tmp_path, small_data, reward_fn=f"{ME}:no_such",
                                                     output_dir=str(tmp_path / "c")), "grpo"))
    for bad, message in [({"num_generations": 1}, "num_generations must be >= 2"),
                         ({"advantage": "gae"}, "advantage must be grpo, dr_grpo, rloo, reinforce_pp; got 'gae'"),
                         ({"loss_type": "sum"}, "loss_type must be grpo, bnpo, dr_grpo, dapo; got 'sum'"),
                         ({"num_mini_batches": 13}, r"num_mini_batches must be in \[1, num_generations \* "
                                                    r"rollout_batch_size=12\]; got 13"),
                         ({"beta": -1}, "beta must be >= 0"), ({"epsilon": 0}, r"epsilon must be in \(0, 1\)")]:
        with pytest.raises(ConfigError, match=message):
            make_config(GRPOConfig, grpo_over(tmp_path, small_data, **bad), "grpo")


def test_cli_help_lists_every_grpo_option(capsys):
    import dataclasses

    from fastalign.cli import main

    with pytest.raises(SystemExit) as e:
        main(["grpo", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(GRPOConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"--{f.name}" in text and f"default: {default!r})" in text, f.name


def test_ddp_equals_one_process(tmp_path, small_data):
    """Two ranks of 2 prompts each = one process of 4 prompts: the same completions (per-completion seeds), the same
    group advantages (whole groups per rank) and, with the loss weights counted over all ranks, the same update.
    In float64, so that what differs (the ranks' gradients summed in another order) is rounding far below what a
    wrong group, weight or seed would change."""
    common = {"max_steps": 3, "num_generations": 3, "num_mini_batches": 1, "num_iterations": 2, "beta": 0.05,
              "gen_eval_data": "", "dtype": "float64"}
    one = grpo_over(tmp_path / "one", small_data, rollout_batch_size=4, per_device_train_batch_size=6, **common)
    train_grpo(make_config(GRPOConfig, one, "grpo"))
    two = grpo_over(tmp_path / "two", small_data, rollout_batch_size=2, per_device_train_batch_size=3, **common)
    proc = torchrun("grpo", two, tmp_path, {"PYTHONPATH": f"{REPO}:{ME.parent}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(rows_of(one["output_dir"]), rows_of(two["output_dir"]), strict=True):
        for k in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length"):
            assert a[k] == b[k], k
        for k in ("loss", "kl", "grad_norm", "clip_ratio/region_mean"):
            assert abs(a[k] - b[k]) <= 2e-6, (k, a[k], b[k])  # metrics.jsonl rounds to 6 decimals
    a, b = (load_file(f"{d}/final/model.safetensors") for d in (one["output_dir"], two["output_dir"]))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-10, msg=name)


def test_grpo_on_a_local_hugging_face_model(tmp_path, small_data):
    """A random-init Qwen2 saved with save_pretrained (untied LM head), with the embedded tokenizer: no warm start,
    the first minibatch exactly on-policy, the LM head trained."""
    tiny_qwen2(tmp_path / "qwen2")
    over = grpo_over(tmp_path, small_data, model=str(tmp_path / "qwen2"), tokenizer="embedded", beta=0.05)
    summary = train_grpo(make_config(GRPOConfig, over, "grpo"))
    assert summary["start_model"] == str(tmp_path / "qwen2")
    assert all(r["policy/ratio_max_abs_dev_first_minibatch"] == 0.0 for r in rows_of(over["output_dir"]))
    final = load_file(str(Path(summary["final_model"]) / "model.safetensors"))
    start = load_file(str(tmp_path / "qwen2" / "model.safetensors"))
    assert not torch.equal(final["lm_head.weight"], start["lm_head.weight"])
