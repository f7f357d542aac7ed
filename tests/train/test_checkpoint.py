"""Checkpoints: a killed run resumes to bitwise-identical weights; corrupt checkpoints and NaN losses are caught."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainhelp import quick

from fastalign.hf import SequenceLogps
from fastalign.train import DPOConfig, SFTConfig, train_dpo, train_sft
from fastalign.train.checkpoint import CheckpointError, list_checkpoints, verify
from fastalign.train.common import TrainingDiverged
from fastalign.train.config import make_config

REPO = Path(__file__).resolve().parents[2]


KILL_AT_STEP = Path(__file__).with_name("kill_at_step.py")


def weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def cli_args(over: dict) -> list[str]:
    return [f"{k}={v}" for k, v in over.items()]


needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")


@pytest.mark.parametrize("kind,lora", [("sft", False), ("dpo", False), pytest.param("sft", True, marks=needs_peft)])
def test_killed_run_resumes_bitwise(tmp_path, small_data, kind, lora):
    cls, fn = (SFTConfig, train_sft) if kind == "sft" else (DPOConfig, train_dpo)
    common = {"max_steps": 5, "save_steps": 2, "gen_eval_data": "", "eval_data": ""}
    if lora:  # the checkpoints hold the adapter only: the resumed run puts it back on the base model
        common.update(use_lora=True, lora_r=4)
    if kind == "dpo":
        common.update(sync_ref_model=True, ref_model_sync_steps=1)  # the moving reference must resume too
    whole = quick(tmp_path / "whole", small_data, kind, **common)
    fn(make_config(cls, whole, kind))

    cut = quick(tmp_path / "cut", small_data, kind, **common)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(KILL_AT_STEP), "3", kind, *cli_args(cut)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed after step 3, before the step-4 save
    assert [p.name for p in list_checkpoints(cut["output_dir"])] == ["checkpoint-000002"]
    assert not (Path(cut["output_dir"]) / "final").exists()
    fn(make_config(cls, {**cut, "resume": "latest"}, kind))

    steps = [json.loads(line)["step"] for line in open(Path(cut["output_dir"]) / "metrics.jsonl")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no rows repeated by the resumed run
    a, b = weights(whole["output_dir"]), weights(cut["output_dir"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_corrupt_and_incomplete_checkpoints_are_reported(tmp_path, small_data):
    cfg = make_config(SFTConfig, quick(tmp_path, small_data, "sft", max_steps=2, save_steps=1, gen_eval_data=""),
                      "sft")
    train_sft(cfg)
    first, last = list_checkpoints(cfg.output_dir)
    verify(last)
    model_file = last / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[:-100])  # truncated
    with pytest.raises(CheckpointError, match=r"model\.safetensors has \d+ bytes, expected \d+ \(truncated\?\)"):
        train_sft(make_config(SFTConfig, {**vars(cfg), "resume": "latest"}, "sft"))
    model_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        verify(last)
    (first / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: no manifest.json"):
        verify(first)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        train_sft(make_config(SFTConfig, {**vars(cfg), "resume": str(tmp_path / "nope")}, "sft"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, small_data, monkeypatch):
    calls = {"n": 0}
    forward = SequenceLogps.forward

    def poisoned(self, *args, **kwargs):
        logps, n = forward(self, *args, **kwargs)
        calls["n"] += torch.is_grad_enabled()  # count the policy's training forwards only
        return (logps * float("nan") if calls["n"] >= 3 else logps), n

    monkeypatch.setattr(SequenceLogps, "forward", poisoned)
    cfg = make_config(DPOConfig, quick(tmp_path, small_data, "dpo", max_steps=4, save_steps=1, gen_eval_data="",
                                       eval_data=""), "dpo")
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*last good checkpoint is .*checkpoint-000002"):
        train_dpo(cfg)
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["checkpoint-000001", "checkpoint-000002"]
    verify(list_checkpoints(cfg.output_dir)[-1])


class _WritesAFile:
    """Unpickling this runs ``Path(target).write_text("pwned")``: what a hostile checkpoint could do."""

    def __init__(self, target):
        self.target = Path(target)

    def __reduce__(self):
        return Path.write_text, (self.target, "pwned")


def _rewrite_manifest(ckpt: Path) -> None:
    """Make the manifest match the files again, as whoever crafted them would."""
    import hashlib

    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        meta.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_a_checkpoint_that_needs_unpickling_is_refused_and_runs_nothing(tmp_path, small_data):
    from fastalign.train.checkpoint import load_state

    over = quick(tmp_path, small_data, "sft", max_steps=2, save_steps=1, gen_eval_data="")
    train_sft(make_config(SFTConfig, over, "sft"))
    ckpt = list_checkpoints(over["output_dir"])[-1]
    state = load_state(ckpt)  # an honest checkpoint holds tensors and plain values only
    assert state["step"] == 2
    marker = tmp_path / "pwned.txt"
    torch.save({**state, "extra": _WritesAFile(marker)}, ckpt / "trainer_state.pt")
    _rewrite_manifest(ckpt)  # the manifest is written by the same hand: it authenticates nothing
    verify(ckpt)
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt holds objects that need unpickling \(\S+\)"):
        load_state(ckpt)
    with pytest.raises(CheckpointError, match="need unpickling"):
        train_sft(make_config(SFTConfig, {**over, "max_steps": 3, "resume": str(ckpt)}, "sft"))
    assert not marker.exists()


def test_the_reference_logps_cache_is_loaded_without_unpickling(tmp_path, small_data):
    over = quick(tmp_path, small_data, "dpo", max_steps=1, gen_eval_data="", eval_data="",
                 precompute_ref_log_probs=True)
    train_dpo(make_config(DPOConfig, over, "dpo"))
    (cache,) = (Path(over["output_dir"]) / "cache").glob("ref_logps-*.pt")
    marker = tmp_path / "pwned.txt"
    torch.save(_WritesAFile(marker), cache)
    with pytest.raises(Exception, match="Weights only load failed"):
        train_dpo(make_config(DPOConfig, {**over, "overwrite_output_dir": True}, "dpo"))  # a new run reads the cache
    assert not marker.exists()


@pytest.mark.parametrize("name", ["trainer_state.pt", "model.safetensors", "config.json"])
def test_the_manifest_must_list_every_file_the_loader_reads(tmp_path, small_data, name):
    over = quick(tmp_path, small_data, "sft", max_steps=1, save_steps=1, gen_eval_data="")
    train_sft(make_config(SFTConfig, over, "sft"))
    (ckpt,) = list_checkpoints(over["output_dir"])
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"][name]  # the entry is gone: the file must not be opened unchecked
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    resume = make_config(SFTConfig, {**over, "max_steps": 2, "resume": "latest"}, "sft")
    for damage in (lambda b: b[:len(b) // 2], lambda b: os.urandom(len(b)), lambda b: b):
        (ckpt / name).write_bytes(damage((ckpt / name).read_bytes()))
        with pytest.raises(CheckpointError, match=rf"{name} is not listed in manifest\.json"):
            train_sft(resume)
    (ckpt / name).unlink()  # entry and file both gone
    with pytest.raises(CheckpointError, match=rf"incomplete: {name} is missing"):
        verify(ckpt)


def test_a_checkpoint_needs_its_state_and_model_files(tmp_path, small_data):
    over = quick(tmp_path, small_data, "sft", max_steps=1, save_steps=1, gen_eval_data="")
    train_sft(make_config(SFTConfig, over, "sft"))
    (ckpt,) = list_checkpoints(over["output_dir"])
    (ckpt / "notes.txt").write_text("an unlisted file")
    with pytest.raises(CheckpointError, match=r"notes\.txt is not listed in manifest\.json"):
        verify(ckpt)
    (ckpt / "notes.txt").unlink()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = []
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unreadable manifest.json"):
        verify(ckpt)
