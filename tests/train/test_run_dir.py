"""The output directory: an earlier run is never replaced by accident, a resumed run is the same run, a failed
write loses nothing already saved (issue 12, items 3, 4 and 7)."""

import errno
import json
import shutil
from pathlib import Path

import pytest
from trainhelp import quick, write_jsonl

from fastalign.train import DPOConfig, SFTConfig, train_dpo, train_sft
from fastalign.train.checkpoint import CheckpointError, list_checkpoints, load_state, verify
from fastalign.train.config import RESUME_SAFE, ConfigError, TrainConfig, make_config
from fastalign.train.data import DataError


def snapshot(directory) -> dict:
    """Every file under ``directory`` and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def sft_run(tmp_path, small_data, **over) -> dict:
    over = quick(tmp_path, small_data, "sft", max_steps=2, save_steps=1, gen_eval_data="", **over)
    train_sft(make_config(SFTConfig, over, "sft"))
    return over


# ---- item 3: a fresh run in an existing output_dir ------------------------------------------------------------
def test_a_fresh_run_refuses_a_directory_holding_an_earlier_run_and_touches_nothing(tmp_path, small_data):
    over = sft_run(tmp_path, small_data)
    before = snapshot(over["output_dir"])
    with pytest.raises(ConfigError, match=r"holds an earlier run.*resume=latest.*overwrite_output_dir=true"):
        train_sft(make_config(SFTConfig, {**over, "max_steps": 1}, "sft"))
    assert snapshot(over["output_dir"]) == before


def test_overwrite_output_dir_replaces_the_earlier_run_once_the_inputs_are_valid(tmp_path, small_data, capsys):
    over = sft_run(tmp_path, small_data)
    before = snapshot(over["output_dir"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1="}])
    with pytest.raises(DataError, match="missing field 'completion'"):  # the new run's data are bad: nothing changes
        train_sft(make_config(SFTConfig, {**over, "data": bad, "overwrite_output_dir": True}, "sft"))
    with pytest.raises(OSError):  # nor when its model cannot be loaded
        train_sft(make_config(SFTConfig, {**over, "model": str(tmp_path / "no_model"), "overwrite_output_dir": True},
                              "sft"))
    assert snapshot(over["output_dir"]) == before
    capsys.readouterr()
    train_sft(make_config(SFTConfig, {**over, "max_steps": 1, "overwrite_output_dir": True}, "sft"))
    assert "replacing the earlier run" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(over["output_dir"])] == ["checkpoint-000001"]
    assert [json.loads(line)["step"] for line in open(Path(over["output_dir"]) / "metrics.jsonl")] == [1]
    assert json.loads((Path(over["output_dir"]) / "config.json").read_text())["max_steps"] == 1


def test_a_directory_holding_only_the_sft_warm_start_is_reused_or_redone(tmp_path, small_data, capsys):
    """A dpo attempt that stopped after its warm start leaves only sft_warmup/: the next run reuses it when complete,
    and redoes it when it is not."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "chosen": "2"}])
    over = quick(tmp_path, small_data, "dpo", max_steps=1, eval_data="", gen_eval_data="", sft_warmup_steps=2)
    with pytest.raises(DataError, match="missing field 'rejected'"):
        train_dpo(make_config(DPOConfig, {**over, "data": bad}, "dpo"))
    assert [p.name for p in Path(over["output_dir"]).iterdir()] == ["sft_warmup"]
    capsys.readouterr()
    train_dpo(make_config(DPOConfig, over, "dpo"))
    assert "reusing the SFT warm start" in capsys.readouterr().out
    shutil.rmtree(over["output_dir"] + "/final")
    (Path(over["output_dir"]) / "sft_warmup" / "summary.json").unlink()  # as if the warm start had been killed
    for p in Path(over["output_dir"]).iterdir():
        if p.name != "sft_warmup":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    train_dpo(make_config(DPOConfig, over, "dpo"))
    assert "SFT warm start for 2 steps" in capsys.readouterr().out


# ---- item 4: resuming with other settings ----------------------------------------------------------------------
def test_resume_refuses_changed_settings_listing_each(tmp_path, small_data):
    over = sft_run(tmp_path, small_data)
    before = snapshot(over["output_dir"])
    changed = {**over, "resume": "latest", "learning_rate": 0.01, "per_device_train_batch_size": 8, "seed": 3}
    with pytest.raises(ConfigError) as e:
        train_sft(make_config(SFTConfig, changed, "sft"))
    text = str(e.value)
    for line in ("learning_rate: 0.003 in the checkpoint, 0.01 now", "per_device_train_batch_size: 4 in the "
                 "checkpoint, 8 now", "seed: 0 in the checkpoint, 3 now", "max_steps"):
        assert line in text
    Path(over["data"]).write_text(Path(over["data"]).read_text().replace("1", "2"))  # same path, other rows
    with pytest.raises(ConfigError, match=r"data: the content of .*sft\.jsonl differs from the checkpoint's"):
        train_sft(make_config(SFTConfig, {**over, "resume": "latest"}, "sft"))
    assert snapshot(over["output_dir"]) == before


def test_resume_allows_the_safe_changes_and_moved_data(tmp_path, small_data):
    over = sft_run(tmp_path, small_data)
    moved = shutil.copy(over["data"], tmp_path / "moved.jsonl")  # the same rows at another path
    train_sft(make_config(SFTConfig, {**over, "resume": "latest", "max_steps": 3, "logging_steps": 2, "save_steps": 0,
                                      "data": str(moved), "progress_bar": True, "cpu_threads": 2}, "sft"))
    assert [p.name for p in list_checkpoints(over["output_dir"])] == ["checkpoint-000002", "checkpoint-000003"]
    record = load_state(list_checkpoints(over["output_dir"])[-1])["run"]
    assert record["command"] == "sft" and "learning_rate" in record["settings"]
    assert not set(RESUME_SAFE) & set(record["settings"])


def test_the_safe_options_are_options():
    names = {f for f in TrainConfig.__dataclass_fields__}
    assert set(RESUME_SAFE) <= names, set(RESUME_SAFE) - names


# ---- item 7: disk and directory errors ------------------------------------------------------------------------
def test_an_output_dir_that_is_a_file_or_read_only_is_a_config_error(tmp_path, small_data, monkeypatch):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(ConfigError, match=r"output_dir .* is a file, not a directory; choose another output_dir"):
            train_sft(make_config(SFTConfig, quick(tmp_path, small_data, "sft", output_dir=str(out)), "sft"))
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real(p, mode, **kw))
    with pytest.raises(ConfigError, match=r"output_dir \S+ro is not writable"):
        train_sft(make_config(SFTConfig, quick(tmp_path, small_data, "sft", output_dir=str(tmp_path / "ro")), "sft"))


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")])
def test_a_failed_save_keeps_every_checkpoint_already_saved(tmp_path, small_data, monkeypatch, error):
    over = sft_run(tmp_path, small_data)
    kept = snapshot(over["output_dir"])
    import torch

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # part of the file is written, then the disk is full
        raise error

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"saving checkpoint-000003 .* failed: .*(No space left|unexpected pos)"
                                              r".*free space.*resume=latest"):
        train_sft(make_config(SFTConfig, {**over, "resume": "latest", "max_steps": 4, "save_steps": 1}, "sft"))
    monkeypatch.setattr(torch, "save", real_save)
    after = snapshot(over["output_dir"])
    assert {k: after[k] for k in kept if "checkpoint-" in k} == {k: v for k, v in kept.items() if "checkpoint-" in k}
    assert not any(".tmp" in k for k in after)  # the partial save is cleaned up
    for ckpt in list_checkpoints(over["output_dir"]):
        verify(ckpt)
        load_state(ckpt)
    train_sft(make_config(SFTConfig, {**over, "resume": "latest", "max_steps": 4}, "sft"))  # and it resumes
