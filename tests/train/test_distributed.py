"""Two-process gloo runs under torchrun (DDP and FSDP2) match the single-process run on the same global batch.

Tolerance: the two-process float32 run sums gradients in another order (all-reduce / reduce-scatter over two
half batches), so it is held to the project rule against the float64 single-process run:
``max|two - single64| <= 2 * max|single32 - single64| + atol`` with ``atol = 1e-5`` for logged metrics (rounded
to 6 decimals in metrics.jsonl) and ``atol = 1e-6`` for the final weights (float32 rounding of O(0.1) weights).
"""

import pytest
import torch
from safetensors.torch import load_file
from trainhelp import logged, quick, torchrun

from fastalign.testing import assert_close_to_ref
from fastalign.train import DPOConfig, SFTConfig, train_dpo, train_sft
from fastalign.train.checkpoint import CheckpointError
from fastalign.train.common import decoder_layers
from fastalign.train.config import ConfigError, RMConfig, make_config
from fastalign.train.model import load_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def assert_runs_close(out_dir, single: dict, keys, steps: int) -> None:
    """Logged metrics and final weights of a two-process run against the float64/float32 single-process runs."""
    for key in keys:
        out = logged(out_dir, key)
        assert out.shape == (steps,), key
        assert_close_to_ref(out, logged(single["float64"], key), logged(single["float32"], key), atol=1e-5,
                            name=key)
    got, ref64, ref32 = (load_file(f"{d}/final/model.safetensors") for d in (out_dir, single["float64"],
                                                                          single["float32"]))
    assert sorted(got) == sorted(ref32)  # the tied LM head is saved once, as by save_pretrained on one process
    for name, w in got.items():
        assert_close_to_ref(w, ref64[name], ref32[name], atol=1e-6, name=name)


def single_runs(tmp_path, small_data, kind: str, train, cls, **over) -> dict:
    out = {}
    for dtype in ("float64", "float32"):
        cfg = quick(tmp_path / dtype, small_data, kind, per_device_train_batch_size=8, dtype=dtype, **over)
        train(make_config(cls, cfg, kind))
        out[dtype] = cfg["output_dir"]
    return out


def test_two_process_gloo_dpo_matches_single_process(tmp_path, small_data):
    # a pair-mean loss: the NLL terms (sft/cpo/orpo) are token means per rank, so they differ slightly
    common = {"max_steps": 2, "gen_eval_data": "", "eval_data": "", "device": "cpu", "loss_type": "sigmoid"}
    single = single_runs(tmp_path, small_data, "dpo", train_dpo, DPOConfig, **common)
    for mode in ("ddp", "fsdp"):
        two = quick(tmp_path / mode, small_data, "dpo", per_device_train_batch_size=4, distributed=mode, **common)
        proc = torchrun("dpo", two, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("== dpo summary") == 1  # only rank 0 reports
        assert_runs_close(two["output_dir"], single, ("loss", "rewards/margins", "grad_norm"), 2)


def test_fsdp_sft_killed_and_resumed_matches_single_process(tmp_path, small_data):
    # the greedy exact-match evaluation runs through the sharded root's generate; the FSDP run is killed after
    # the checkpoint of step 2 and resumed: its optimizer state comes back from the gathered full state dict
    common = {"max_steps": 4, "device": "cpu", "save_steps": 1}
    single = single_runs(tmp_path, small_data, "sft", train_sft, SFTConfig, **common)
    two = quick(tmp_path / "fsdp", small_data, "sft", per_device_train_batch_size=4, distributed="fsdp", **common)
    killed = torchrun("sft", two, tmp_path, kill_at=2)
    assert killed.returncode != 0
    assert "sft step 2" in killed.stdout and "sft step 3" not in killed.stdout
    resumed = torchrun("sft", {**two, "resume": "latest"}, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "exact_match_after" in resumed.stdout
    assert_runs_close(two["output_dir"], single, ("loss", "grad_norm"), 4)
    # its checkpoints hold FSDP's optimizer state (keyed by parameter name): one process refuses it clearly
    with pytest.raises(CheckpointError, match="distributed=fsdp"):
        train_sft(make_config(SFTConfig, {**two, "resume": "latest", "max_steps": 5}, "sft"))


def test_distributed_option_is_checked():
    with pytest.raises(ConfigError, match="distributed must be ddp or fsdp; got 'zero3'"):
        make_config(SFTConfig, {"distributed": "zero3"}, "sft")
    with pytest.raises(ConfigError, match="distributed must be ddp for rm"):
        make_config(RMConfig, {"distributed": "fsdp"}, "rm")


def test_decoder_layers_are_found_or_reported():
    lm = load_model("embedded")
    assert decoder_layers(lm) == list(lm.model.layers)
    with pytest.raises(ValueError, match="no decoder layers to shard in Linear"):
        decoder_layers(torch.nn.Linear(2, 2))
