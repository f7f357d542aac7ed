"""Fixtures of the trainer tests: small, fast runs on the embedded model."""

import pytest
import torch
from trainhelp import head, write_jsonl


@pytest.fixture
def small_data(tmp_path):
    """Paths of small SFT, preference and exact-match files cut from the embedded data."""
    return {"sft": write_jsonl(tmp_path / "sft.jsonl", head("sft_train.jsonl", 64)),
            "pref": write_jsonl(tmp_path / "pref.jsonl", head("pref_train.jsonl", 64)),
            "pref_eval": write_jsonl(tmp_path / "pref_eval.jsonl", head("pref_eval.jsonl", 12)),
            "gen": write_jsonl(tmp_path / "gen.jsonl", head("eval.jsonl", 8))}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A run on the embedded model sets torch to 1 thread (restored at its end, but not when it raises)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
