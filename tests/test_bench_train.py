"""The end-to-end benchmark against TRL compares the same work: on a tiny random-init Llama, fastalign and TRL's
trainers agree on the first steps (loss, grad norm, DPO log-probabilities, the loss after one update)."""

import copy
import math

import pytest

from bench import bench_train


def _run(**first):
    base = {"loss": 0.6931, "grad_norm": 2.5, "logps/chosen": -700.0, "logps/rejected": -701.0}
    return {"metrics": [dict(base, **first), {"loss": 0.61, "rewards/margins": 0.2}]}


def test_parity_flags_a_difference_and_a_missing_metric():
    a = _run()
    assert bench_train.parity("dpo", a, copy.deepcopy(a))["ok"]
    off = bench_train.parity("dpo", a, _run(grad_norm=2.5 * (1 + 1e-3)))
    assert not off["ok"] and off["max_rel"] == pytest.approx(1e-3, rel=1e-2)
    assert not bench_train.parity("dpo", a, _run(**{"logps/chosen": -700.5}))["ok"]
    missing = _run()
    del missing["metrics"][1]["rewards/margins"]
    assert bench_train.parity("dpo", a, missing)["max_rel"] == math.inf
    assert bench_train.parity("sft", a, missing)["ok"]  # sft compares no DPO metric


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_fastalign_and_trl_compute_the_same_first_steps(method, tmp_path):
    pytest.importorskip("trl", reason="TRL is the peer of this benchmark (pip install trl, the [bench] extra)")
    result = bench_train.check_parity(method, bench_train.SHAPES["tiny"], tmp_path, fresh=False)
    assert result["ok"], result["detail"]
    if method == "dpo":  # the policy is its reference at step 1: the sigmoid loss is log 2 on both sides
        assert result["detail"]["step1 loss"]["a"] == pytest.approx(math.log(2), abs=1e-6)
