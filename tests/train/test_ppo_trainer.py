"""``fastalign ppo`` end to end on the embedded model for a few updates: reward routes, layouts, the on-policy
guarantee, the advantages the loop computes, the EMA reference, resume after SIGKILL, and bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainhelp import quick, tiny_qwen2, write_jsonl

import fastalign.train.ppo as ppo_module
from fastalign.testing import assert_close_to_ref
from fastalign.train import PPOConfig, RMConfig, train_ppo, train_rm
from fastalign.train.config import ConfigError, make_config
from fastalign.train.data import DataError
from fastalign.train.rewards import RewardError

REPO = Path(__file__).resolve().parents[2]
KILL_AT_STEP = Path(__file__).with_name("kill_at_step.py")


def ppo_over(tmp_path, small_data, **over) -> dict:
    """A few small updates: 12 rollouts in 2 minibatches of micro-batches of 4 (sizes and order unlike the
    rollout batch's), SFT-style prompt rows, no warm start."""
    base = {"data": small_data["sft"], "gen_eval_data": small_data["gen"], "output_dir": str(tmp_path / "ppo"),
            "sft_warmup_steps": 0, "max_steps": 3, "rollout_batch_size": 12, "num_mini_batches": 2,
            "per_device_train_batch_size": 4, "eval_steps": 0, "save_steps": 0, "logging_steps": 1,
            "progress_bar": False, "plots": False, "report_to_tensorboard": False, "max_new_tokens": 4}
    base.update(over)
    return base


def rows_of(out_dir):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if "objective/scores" in line]


@pytest.mark.parametrize("packing", [False, True])
def test_ppo_end_to_end_on_policy_first_minibatch(tmp_path, small_data, packing):
    over = ppo_over(tmp_path, small_data, packing=packing, ppo_epochs=2, ref_ema_decay=0.9, plots=True)
    summary = train_ppo(make_config(PPOConfig, over, "ppo"))
    rows = rows_of(over["output_dir"])
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # the first minibatch of every update is exactly on-policy, the later ones are not
        assert r["policy/ratio_max_abs_dev_first_minibatch"] == 0.0
        for k in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg",
                  "policy/approxkl_avg", "policy/clipfrac_avg", "val/clipfrac_avg", "val/ratio", "grad_norm",
                  "critic/grad_norm", "learning_rate", "time/generation", "time/scoring", "time/training",
                  "tokens_per_second", "completions/mean_length"):
            assert k in r, k
    assert rows[-1]["val/ratio"] != 1.0  # two epochs of 2 minibatches: the policy moved within the update
    final = Path(summary["final_model"])
    assert (final / "model.safetensors").exists() and (final / "critic" / "value_head.safetensors").exists()
    assert (Path(over["output_dir"]) / "curves.png").stat().st_size > 1000
    assert 0 <= summary["exact_match after"] <= 1


def test_the_loop_feeds_gae_and_whitening_what_the_float64_reference_computes(tmp_path, small_data, monkeypatch):
    recorded = []
    real = ppo_module.ppo_advantages

    def record(scores, logps, ref_logps, values, cu, **kw):
        out = real(scores, logps, ref_logps, values, cu, **kw)
        recorded.append((scores, logps, ref_logps, values, cu, kw, out))
        return out

    monkeypatch.setattr(ppo_module, "ppo_advantages", record)
    over = ppo_over(tmp_path, small_data, max_steps=1, kl_coef=0.3, lam=0.9, gamma=0.97)
    train_ppo(make_config(PPOConfig, over, "ppo"))
    scores, logps, ref_logps, values, cu, kw, (adv, ret, _, _) = recorded[0]
    assert kw["kl_coef"] == 0.3 and kw["lam"] == 0.9 and kw["gamma"] == 0.97
    # the float64 reference: k1-shaped rewards, the score at the last token, the reverse GAE loop, whitening
    a64, r64 = torch.zeros(len(logps), dtype=torch.float64), torch.zeros(len(logps), dtype=torch.float64)
    for s in range(len(scores)):
        lo, hi = int(cu[s]), int(cu[s + 1])
        rew = -0.3 * (logps[lo:hi].double() - ref_logps[lo:hi].double())
        rew[-1] += float(scores[s])
        v = values[lo:hi].double()
        last = 0.0
        for t in reversed(range(hi - lo)):
            nxt = float(v[t + 1]) if t + 1 < hi - lo else 0.0
            last = float(rew[t]) + 0.97 * nxt - float(v[t]) + 0.97 * 0.9 * last
            a64[lo + t] = last
        r64[lo:hi] = a64[lo:hi] + v
    w64 = (a64 - a64.mean()) / a64.std()
    assert torch.allclose(ret.double(), r64, atol=1e-5) and torch.allclose(adv.double(), w64, atol=1e-4)
    assert not torch.allclose(adv.double(), a64, atol=1e-3)  # whitening did something


def test_ema_reference_moves_after_every_optimizer_step(tmp_path, small_data, monkeypatch):
    calls = []
    real = ppo_module.ema_update_
    monkeypatch.setattr(ppo_module, "ema_update_", lambda ref, pol, d: (calls.append(d), real(ref, pol, d)))
    over = ppo_over(tmp_path, small_data, max_steps=2, ref_ema_decay=0.95, ppo_epochs=2, critic_warmup_steps=1)
    train_ppo(make_config(PPOConfig, over, "ppo"))
    assert calls == [0.95] * 4  # update 2 only (update 1 trains the critic alone): 2 epochs x 2 minibatches


def test_reward_model_route(tmp_path, small_data):
    rm_over = quick(tmp_path, small_data, "rm", max_steps=2)
    rm = train_rm(make_config(RMConfig, rm_over, "rm"))
    over = ppo_over(tmp_path, small_data, max_steps=2, reward_model=rm["final_model"])
    summary = train_ppo(make_config(PPOConfig, over, "ppo"))
    rows = rows_of(over["output_dir"])
    assert all(r["policy/ratio_max_abs_dev_first_minibatch"] == 0.0 for r in rows)
    assert len({r["objective/scores"] for r in rows}) == 2 and summary["steps"] == 2  # real-valued RM scores


def test_killed_run_resumes_bitwise(tmp_path, small_data):
    common = {"max_steps": 4, "save_steps": 2, "ref_ema_decay": 0.9, "target_kl": 0.05, "normalize_values": True,
              "gen_eval_data": ""}
    whole = ppo_over(tmp_path / "whole", small_data, **common)
    train_ppo(make_config(PPOConfig, whole, "ppo"))
    cut = ppo_over(tmp_path / "cut", small_data, **common)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(KILL_AT_STEP), "3", "ppo", *[f"{k}={v}" for k, v in cut.items()]],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    train_ppo(make_config(PPOConfig, {**cut, "resume": "latest"}, "ppo"))
    for sub in ("final", "final/critic"):
        a = load_file(str(Path(whole["output_dir"]) / sub / "model.safetensors"))
        b = load_file(str(Path(cut["output_dir"]) / sub / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert [r["kl_coef"] for r in rows_of(whole["output_dir"])] == [r["kl_coef"] for r in rows_of(cut["output_dir"])]


def bad_reward(prompts, completions):
    raise KeyError("no such answer")


def short_reward(prompts, completions):
    return [1.0] * (len(completions) - 1)


def test_bad_reward_functions_and_prompts_are_clear_errors(tmp_path, small_data):
    me = Path(__file__).resolve()
    with pytest.raises(RewardError, match="bad_reward.*raised KeyError"):
        train_ppo(make_config(PPOConfig, ppo_over(tmp_path, small_data, reward_fn=f"{me}:bad_reward"), "ppo"))
    with pytest.raises(RewardError, match="11.*12|12.*11"):
        train_ppo(make_config(PPOConfig, ppo_over(tmp_path, small_data, reward_fn=f"{me}:short_reward",
                                                  output_dir=str(tmp_path / "b")), "ppo"))
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1+1=" * 20}])
    with pytest.raises(DataError, match=r"long.jsonl:1: the prompt is \d+ tokens; at most max_length - "
                                        r"max_new_tokens = 60"):
        train_ppo(make_config(PPOConfig, ppo_over(tmp_path, small_data, data=long, output_dir=str(tmp_path / "c")),
                              "ppo"))
    with pytest.raises(ConfigError, match="num_mini_batches must be in \\[1, rollout_batch_size=12\\]; got 13"):
        make_config(PPOConfig, ppo_over(tmp_path, small_data, num_mini_batches=13), "ppo")


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path, small_data):
    rm = train_rm(make_config(RMConfig, quick(tmp_path, small_data, "rm", max_steps=1), "rm"))
    vocab_file = Path(rm["final_model"]) / "tokenizer.json"
    tok = json.loads(vocab_file.read_text())
    vocab = tok["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped: same size, other tokens
    vocab_file.write_text(json.dumps(tok))
    with pytest.raises(DataError, match="its tokenizer differs from the policy's"):
        train_ppo(make_config(PPOConfig, ppo_over(tmp_path, small_data, reward_model=rm["final_model"]), "ppo"))


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_process_gloo_ppo_matches_single_process(tmp_path, small_data, distributed):
    """Two ranks of 6 rollouts against one process of 12 (whose float64 run is the reference, by the project's
    rule): the same completions (seeded per prompt position), advantages whitened over both ranks, and each
    minibatch's loss a mean over the global minibatch's tokens, so only the summation order differs. FSDP2 shards
    the policy and the critic; its checkpoints gather them, and a resumed run continues from them."""
    from test_distributed import assert_runs_close
    from trainhelp import torchrun

    common = {"max_steps": 2, "device": "cpu", "gen_eval_data": "", "normalize_values": True}
    two = ppo_over(tmp_path / "two", small_data, rollout_batch_size=6, distributed=distributed, save_steps=1,
                   ref_ema_decay=0.9, **common)
    single = {}
    for dtype in ("float64", "float32"):
        over = ppo_over(tmp_path / dtype, small_data, dtype=dtype, ref_ema_decay=0.9, **common)
        train_ppo(make_config(PPOConfig, over, "ppo"))
        single[dtype] = over["output_dir"]
    proc = torchrun("ppo", two, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("== ppo summary") == 1  # rank 0 reports
    rows = rows_of(two["output_dir"])
    assert all(r["policy/ratio_max_abs_dev_first_minibatch"] == 0.0 for r in rows)
    assert_runs_close(two["output_dir"], single, ("objective/scores", "objective/kl", "loss/policy_avg",
                                                  "loss/value_avg", "grad_norm", "critic/grad_norm"), 2)
    critic = [load_file(f"{d}/final/critic/{f}") for d in (two["output_dir"], single["float64"], single["float32"])
              for f in ("model.safetensors", "value_head.safetensors")]
    for got, ref64, ref32 in ((critic[0], critic[2], critic[4]), (critic[1], critic[3], critic[5])):
        for name in ref32:
            assert_close_to_ref(got[name], ref64[name], ref32[name], atol=1e-6, name=f"critic {name}")
    resumed = torchrun("ppo", {**two, "resume": "latest", "max_steps": 3}, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and [r["step"] for r in rows_of(two["output_dir"])] == [1, 2, 3]


def test_ppo_on_a_local_hugging_face_model(tmp_path, small_data):
    tiny_qwen2(tmp_path / "qwen2")
    over = ppo_over(tmp_path, small_data, model=str(tmp_path / "qwen2"), tokenizer="embedded", max_steps=2)
    summary = train_ppo(make_config(PPOConfig, over, "ppo"))
    assert summary["start_model"] == str(tmp_path / "qwen2")  # a real model starts as it is: no warm start
    assert all(r["policy/ratio_max_abs_dev_first_minibatch"] == 0.0 for r in rows_of(over["output_dir"]))


def test_ppo_with_lora_trains_adapters_and_saves_the_merged_policy(tmp_path, small_data):
    pytest.importorskip("peft")
    over = ppo_over(tmp_path, small_data, max_steps=2, use_lora=True, lora_r=4, save_steps=1)
    summary = train_ppo(make_config(PPOConfig, over, "ppo"))
    final = Path(summary["final_model"])
    assert (final / "adapter" / "adapter_config.json").exists() and (final / "model.safetensors").exists()
    assert all(r["policy/ratio_max_abs_dev_first_minibatch"] == 0.0 for r in rows_of(over["output_dir"]))
    with pytest.raises(ConfigError, match="use_lora must be false with ref_ema_decay"):
        make_config(PPOConfig, {**over, "ref_ema_decay": 0.9}, "ppo")
