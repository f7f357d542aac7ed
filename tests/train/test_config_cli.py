"""Configs and the command line: defaults < YAML < overrides, typed values, --help, clear errors."""

import dataclasses

import pytest

from fastalign.cli import main
from fastalign.train.config import (
    ConfigError,
    DPOConfig,
    GRPOConfig,
    IterDPOConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    make_config,
    parse_args,
)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.01\nmax_steps: 7\nloss_type: [ipo]\nbeta: 0.2\n")
    cfg = parse_args(DPOConfig, "dpo", ["--config", str(path), "max_steps=9", "--skip-bad-rows",
                                        "--loss_type", "sigmoid,sft", "loss_weights=1,0.5", "bf16=false"])
    assert (cfg.learning_rate, cfg.max_steps, cfg.beta) == (0.01, 9, 0.2)
    assert cfg.skip_bad_rows is True and cfg.bf16 is False
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5]
    assert cfg.output_dir == "runs/dpo"


@pytest.mark.parametrize("override, message", [
    ({"max_stepz": 3}, r"unknown option 'max_stepz'; valid options: .*max_steps"),
    ({"max_steps": "abc"}, r"max_steps must be a int; got 'abc'"),
    ({"max_steps": 2.5}, r"max_steps must be a int; got 2.5"),
    ({"bf16": "maybe"}, r"bf16 must be a bool; got 'maybe'"),
    ({"truncation_mode": "middle"}, r"truncation_mode must be keep_end or keep_start; got 'middle'"),
    ({"loss_type": "sigmoid,nope"}, r"loss_type must be a comma-separated list of sigmoid, hinge"),
    ({"loss_type": "ipo", "loss_weights": "1,2"}, r"loss_weights must be empty or one weight per loss type"),
    ({"beta": 0}, r"beta must be > 0; got 0.0"),
    ({"sync_ref_model": True, "precompute_ref_log_probs": True}, r"precompute_ref_log_probs must be false"),
])
def test_bad_options_raise_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        make_config(DPOConfig, override, "dpo")


@pytest.mark.parametrize("command, cls", [("sft", SFTConfig), ("dpo", DPOConfig)])
def test_help_lists_every_option_and_default(capsys, command, cls):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"--{f.name}" in text and f"default: {default!r})" in text, f.name


def test_cli_reports_errors_without_a_traceback(capsys, tmp_path):
    assert main(["dpo", "nonsense=1"]) == 1
    assert "fastalign dpo: error: dpo: unknown option 'nonsense'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    assert main(["rm", f"data={bad}", f"output_dir={tmp_path / 'out'}", "progress_bar=false"]) == 1
    assert f"{bad}:1: missing field 'rejected'" in capsys.readouterr().err


def test_env_command_still_works(capsys):
    assert main(["env"]) in (0, None)
    assert "fastalign" in capsys.readouterr().out


def test_the_warm_start_inherits_every_option_but_its_own_schedule():
    from fastalign.train.config import WARM_START_OWN, DPOConfig, SFTConfig, warm_start_config

    dpo = make_config(DPOConfig, {"packing": True, "check_model": False, "max_new_tokens": 9, "learning_rate": 1e-5,
                                  "per_device_train_batch_size": 3, "seed": 7}, "dpo")
    sft = warm_start_config(dpo, max_steps=5)
    assert (sft.packing, sft.check_model, sft.max_new_tokens, sft.seed) == (True, False, 9, 7)
    assert sft.learning_rate == SFTConfig.learning_rate and sft.per_device_train_batch_size == 64
    assert sft.max_steps == 5 and "learning_rate" in WARM_START_OWN


@pytest.mark.parametrize("cls, override, message", [
    (SFTConfig, {"save_steps": -1}, r"save_steps must be >= 0 \(0: only at the end\); got -1"),
    (SFTConfig, {"logging_steps": -1}, r"logging_steps must be >= 0 \(0: only at the end\); got -1"),
    (SFTConfig, {"eval_steps": -3}, r"eval_steps must be >= 0 \(0: only at the end\); got -3"),
    (SFTConfig, {"max_grad_norm": "nan"}, r"max_grad_norm must be a finite number; got nan"),
    (SFTConfig, {"max_grad_norm": -1}, r"max_grad_norm must be >= 0 \(0: no clipping\); got -1.0"),
    (SFTConfig, {"learning_rate": "inf"}, r"learning_rate must be a finite number; got inf"),
    (SFTConfig, {"learning_rate": "nan"}, r"learning_rate must be a finite number; got nan"),
    (DPOConfig, {"label_smoothing": 2}, r"label_smoothing must be in \[0, 0.5\]; got 2.0"),
    (DPOConfig, {"label_smoothing": 0.5, "loss_type": "robust"}, r"label_smoothing must be in \[0, 0.5\) with "
                                                                 r"loss_type robust; got 0.5"),
    (SFTConfig, {"weight_decay": -5}, r"weight_decay must be >= 0; got -5.0"),
    (SFTConfig, {"adam_beta1": 2}, r"adam_beta1 must be in \[0, 1\); got 2.0"),
    (SFTConfig, {"adam_beta2": 1}, r"adam_beta2 must be in \[0, 1\); got 1.0"),
    (SFTConfig, {"adam_beta1": -0.1}, r"adam_beta1 must be in \[0, 1\); got -0.1"),
    (SFTConfig, {"cpu_threads": -1}, r"cpu_threads must be >= 0 \(0: the default\); got -1"),
    (SFTConfig, {"device": "foo"}, r"device must be auto, cpu, cuda or cuda:<index>; got 'foo'"),
    (SFTConfig, {"max_new_tokens": -1}, r"max_new_tokens must be >= 1; got -1"),
    (DPOConfig, {"max_new_tokens": 0}, r"max_new_tokens must be >= 1; got 0"),
    (PPOConfig, {"max_new_tokens": 64}, r"max_new_tokens must be in \[1, max_length - 1 = 63\]; got 64"),
    (SFTConfig, {"per_device_train_batch_size": 1000000000},
     r"per_device_train_batch_size must be in \[1, 65536\]; got 1000000000"),
    (SFTConfig, {"per_device_train_batch_size": 4096, "gradient_accumulation_steps": 4096},
     r"gradient_accumulation_steps must be at most 65536 / per_device_train_batch_size = 16"),
    (PPOConfig, {"rollout_batch_size": 1000000000}, r"rollout_batch_size must be in \[1, 65536\]; got 1000000000"),
    (GRPOConfig, {"rollout_batch_size": 40000, "num_generations": 4},
     r"num_generations must be at most 65536 / rollout_batch_size = 1"),
    (SFTConfig, {"seed": -1}, r"seed must be in \[0, 2\*\*31\); got -1"),
    (SFTConfig, {"max_steps": 0}, r"max_steps must be >= 1; got 0"),
    (DPOConfig, {"sft_warmup_steps": -1}, r"sft_warmup_steps must be >= 0; got -1"),
    (RMConfig, {"center_rewards_coefficient": -1}, r"center_rewards_coefficient must be >= 0; got -1.0"),
    (DPOConfig, {"cpo_alpha": -1}, r"cpo_alpha must be >= 0; got -1.0"),
    (DPOConfig, {"loss_type": "sigmoid,sft", "loss_weights": "1,-2"}, r"loss_weights must be >= 0 each; got"),
    (PPOConfig, {"vf_coef": "inf"}, r"vf_coef must be a finite number; got inf"),
    (PPOConfig, {"missing_eos_penalty": -1}, r"missing_eos_penalty must be >= 0; got -1.0"),
    (PPOConfig, {"entropy_coef": -1}, r"entropy_coef must be >= 0; got -1.0"),
    (PPOConfig, {"reward_fn": "nocolon"}, r"reward_fn must be 'embedded', 'module:function' or 'file.py:function'"),
    (GRPOConfig, {"num_generations": 70000}, r"num_generations must be at most 65536 / rollout_batch_size = 2048"),
    (IterDPOConfig, {"pair_margin": "nan"}, r"pair_margin must be a finite number; got nan"),
    (SFTConfig, {"lora_r": 0}, r"lora_r must be >= 1; got 0"),
])
def test_every_option_is_range_checked_before_any_work(cls, override, message):
    with pytest.raises(ConfigError, match=message):
        make_config(cls, override, "x")


def test_device_cuda_without_a_gpu_is_a_config_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device must be auto or cpu on this machine \(no CUDA GPU\); got 'cuda'"):
        make_config(SFTConfig, {"device": "cuda"}, "sft")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"device must be cuda:0 to cuda:1 \(2 GPUs\); got 'cuda:2'"):
        make_config(SFTConfig, {"device": "cuda:2"}, "sft")
    assert make_config(SFTConfig, {"device": "cuda:1"}, "sft").device == "cuda:1"


def test_every_default_is_valid():
    for cls in (SFTConfig, RMConfig, DPOConfig, PPOConfig, GRPOConfig, IterDPOConfig):
        make_config(cls, {}, "x")
