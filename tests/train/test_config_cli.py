"""Configs and the command line: defaults < YAML < overrides, typed values, --help, clear errors."""

import dataclasses

import pytest

from fastalign.cli import main
from fastalign.train.config import ConfigError, DPOConfig, SFTConfig, make_config, parse_args


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
