"""A two-process gloo (DDP) run under torchrun matches the single-process run on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainhelp import quick

from fastalign.testing import assert_close_to_ref
from fastalign.train import DPOConfig, train_dpo
from fastalign.train.config import make_config

REPO = Path(__file__).resolve().parents[2]


def logged(run_dir, key):
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return torch.tensor([r[key] for r in map(json.loads, f) if key in r], dtype=torch.float64)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_dpo_matches_single_process(tmp_path, small_data):
    # a pair-mean loss: the NLL terms (sft/cpo/orpo) are token means per rank, so they differ slightly
    common = {"max_steps": 2, "gen_eval_data": "", "eval_data": "", "device": "cpu", "loss_type": "sigmoid"}
    single = {}
    for dtype in ("float64", "float32"):
        over = quick(tmp_path / dtype, small_data, "dpo", per_device_train_batch_size=8, dtype=dtype, **common)
        train_dpo(make_config(DPOConfig, over, "dpo"))
        single[dtype] = over["output_dir"]
    two = quick(tmp_path / "ddp", small_data, "dpo", per_device_train_batch_size=4, **common)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "fastalign.cli", "dpo", *[f"{k}={v}" for k, v in two.items()]]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("== dpo summary") == 1  # only rank 0 reports
    for key in ("loss", "rewards/margins", "grad_norm"):
        out = logged(two["output_dir"], key)
        assert out.shape == (2,)
        assert_close_to_ref(out, logged(single["float64"], key), logged(single["float32"], key), atol=1e-5,
                            name=key)
