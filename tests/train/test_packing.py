"""Packing (padding-free batches): the same values as padded batches, the check that catches a leaking model,
and packed runs of every command that track padded ones.

The rule is the project's: ``max|packed32 - padded64| <= 2 * max|padded32 - padded64| + atol``: packing may
change the rounding (other matmul shapes, another mask), nothing else.
"""

import contextlib

import pytest
import torch
import transformers.masking_utils
from trainhelp import logged, quick

from fastalign.hf import RewardModel, SequenceLogps, scored_positions
from fastalign.testing import assert_close_to_ref
from fastalign.train import DPOConfig, RMConfig, SFTConfig, train_dpo, train_rm, train_sft
from fastalign.train.config import ConfigError, make_config, resolve_attention
from fastalign.train.data import (
    Batcher,
    Encoder,
    check_packing,
    collate_pref,
    encode_pref_row,
    encode_sft_row,
    pack,
)
from fastalign.train.model import load_model, load_tokenizer

ROWS = [{"prompt": "12+34=", "completion": "46"}, {"prompt": "9+99=", "completion": "108"},
        {"prompt": "1+1=", "completion": "2"}, {"prompt": "70+5=", "completion": "75"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


@pytest.fixture(scope="module")
def examples(tok):
    return [encode_sft_row(Encoder(tok, 64), r, "x") for r in ROWS]


def test_pack_one_row():
    batch = pack([[5, 6, 7], [8, 9], [4]], [[-100, 6, 7], [8, 9], [4]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    # every sequence's first label is dropped: it is not the next token of the sequence before it
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100]]
    assert batch["seq_ids"].tolist() == [[0, 0, 0, 1, 1, 2]] and batch["seq_last"].tolist() == [2, 4, 5]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == [0, 3, 5, 6]
    assert batch["max_seqlen"] == 3


def test_pack_rows_first_fit_decreasing():
    ids = [[1, 2], [3, 4, 5, 6], [7], [8, 9, 10]]
    batch = pack(ids, ids, row_tokens=5, pad_id=0)
    # by decreasing length: [3..6] opens row 0, [8..10] row 1, [1, 2] fits row 1, [7] fits row 0
    assert batch["input_ids"].tolist() == [[3, 4, 5, 6, 7], [8, 9, 10, 1, 2]]
    assert batch["seq_ids"].tolist() == [[1, 1, 1, 1, 2], [3, 3, 3, 0, 0]]
    assert batch["seq_last"].tolist() == [9, 3, 4, 7]
    ids = [[1, 2], [3, 4, 5]]
    batch = pack(ids, ids, row_tokens=4, pad_id=99)  # one sequence per row: padding tails of their own
    assert batch["input_ids"].tolist() == [[3, 4, 5], [1, 2, 99]]
    assert batch["labels"].tolist() == [[-100, 4, 5], [-100, 2, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["seq_ids"].tolist() == [[1, 1, 1], [0, 0, -1]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 6] and batch["max_seqlen"] == 3
    with pytest.raises(ValueError, match=r"row_tokens must be at least the longest sequence \(3\); got 2"):
        pack(ids, ids, row_tokens=2)


def test_scored_positions_group_each_sequence():
    labels = torch.tensor([[-100, 6, 7, -100, 9], [-100, 2, -100, -100, 3]])
    seq_ids = torch.tensor([[2, 2, 2, 0, 0], [1, 1, 3, 4, 4]])
    mask, targets, order, cu = scored_positions(labels, seq_ids, 5)
    assert mask.tolist() == [[True, True, False, True], [True, False, False, True]]
    assert targets[order].tolist() == [9, 2, 6, 7, 3] and cu.tolist() == [0, 1, 2, 4, 4, 5]  # sequence 3: none


def test_collate_pref_packs_chosen_then_rejected(tok):
    row = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}
    e = encode_pref_row(Encoder(tok, 64), row, "x")
    packed, padded = collate_pref([e, e], tok.pad_token_id, packing=True), collate_pref([e, e], tok.pad_token_id)
    assert packed["input_ids"].shape == (1, padded["attention_mask"].sum())
    assert packed["cu_seqlens"].shape == (5,)
    chosen_end = int(packed["cu_seqlens"][1])
    assert packed["input_ids"][0, :chosen_end].tolist() == e[0]


def _logps(lm, batch):
    out, n = SequenceLogps(lm)(**batch)
    (out * torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=out.dtype)).sum().backward()
    return out, n, {k: p.grad.clone() for k, p in lm.named_parameters()}


@pytest.mark.parametrize("completion_only", [True, False])
@pytest.mark.parametrize("row_tokens", [None, 16])
def test_packed_sequence_logps_equal_padded_values_and_grads(tok, examples, completion_only, row_tokens):
    if not completion_only:  # labels on every token (completion_only_loss=False): the boundaries matter
        examples = [(ids, list(ids)) for ids, _ in examples]
    batcher, packed = Batcher(tok.pad_token_id), Batcher(tok.pad_token_id, True, row_tokens)
    assert packed.sft(examples)["input_ids"].shape[0] == (1 if row_tokens is None else 3)
    pad32 = _logps(load_model("embedded", seed=1), batcher.sft(examples))
    pad64 = _logps(load_model("embedded", seed=1).double(), batcher.sft(examples))
    out = _logps(load_model("embedded", seed=1), packed.sft(examples))
    lengths = [3, 4, 2, 3] if completion_only else [len(ids) - 1 for ids, _ in examples]
    assert torch.equal(out[1], pad32[1]) and out[1].tolist() == lengths
    assert_close_to_ref(out[0], pad64[0], pad32[0], atol=1e-5, name="sequence logps")
    for name in pad64[2]:
        assert_close_to_ref(out[2][name], pad64[2][name], pad32[2][name], atol=1e-6, name=name)


@pytest.mark.parametrize("row_tokens", [None, 16])
def test_packed_reward_model_equals_padded(tok, examples, row_tokens):
    torch.manual_seed(0)
    rm = RewardModel(load_model("embedded", seed=3))
    padded = Batcher(tok.pad_token_id).sft(examples)
    packed = Batcher(tok.pad_token_id, True, row_tokens).sft(examples)
    want32 = rm(padded["input_ids"], padded["attention_mask"])
    got = rm(**{k: v for k, v in packed.items() if k != "labels"})
    want64 = rm.double()(padded["input_ids"], padded["attention_mask"])
    assert_close_to_ref(got, want64, want32, atol=1e-6, name="rewards")


def test_check_packing_passes_and_catches_a_model_that_leaks(monkeypatch):
    lm = load_model("embedded", seed=0)
    check_packing(lm, "cpu", contextlib.nullcontext())
    # a model that does not turn restarting position ids into per-sequence attention: a plain causal mask
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(RuntimeError, match=r"packing=true needs a model whose attention keeps packed sequences "
                                           r"apart: LlamaForCausalLM with attn_implementation=sdpa"):
        check_packing(lm, "cpu", contextlib.nullcontext())


def test_a_leaking_model_stops_the_run_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    cfg = make_config(SFTConfig, {"output_dir": str(tmp_path), "packing": True, "max_steps": 1,
                                  "progress_bar": False, "plots": False, "report_to_tensorboard": False}, "sft")
    with pytest.raises(RuntimeError, match="packing=true needs"):
        train_sft(cfg)
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.parametrize("kind", ["sft", "dpo", "rm"])
def test_packed_runs_track_padded_runs(tmp_path, small_data, kind):
    """Three optimizer steps: every logged metric of the packed run against the padded float64 run."""
    cls, fn = {"sft": (SFTConfig, train_sft), "dpo": (DPOConfig, train_dpo), "rm": (RMConfig, train_rm)}[kind]
    runs = {}
    for name, packing, dtype in [("pad64", False, "float64"), ("pad32", False, "float32"), ("packed", True, "float32")]:
        over = quick(tmp_path / name, small_data, kind, packing=packing, dtype=dtype, gen_eval_data="", seed=1,
                     max_length=32)  # packed rows of at most 32 tokens: several per batch
        fn(make_config(cls, over, kind))
        runs[name] = over["output_dir"]
    keys = {"sft": ["loss", "grad_norm"], "dpo": ["loss", "grad_norm", "rewards/margins", "logps/chosen", "eval_loss"],
            "rm": ["loss", "grad_norm", "margin", "eval_loss"]}[kind]
    for key in keys:
        got = logged(runs["packed"], key)
        assert got.numel() >= 1, key
        assert_close_to_ref(got, logged(runs["pad64"], key), logged(runs["pad32"], key), atol=1e-5, name=key)


def test_attention_options_are_checked():
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attention("eager", torch.device("cpu")) == "eager"
    with pytest.raises(ConfigError, match=r"attn_implementation must be auto, sdpa, eager, flash_attention_2; "
                                          r"got 'flash'"):
        make_config(DPOConfig, {"attn_implementation": "flash"}, "dpo")
    with pytest.raises(ConfigError, match=r"attn_implementation must be auto, sdpa or eager on device cpu"):
        resolve_attention("flash_attention_2", torch.device("cpu"))


def test_flash_attention_needs_flash_attn(monkeypatch):
    import fastalign.train.config as config

    monkeypatch.setattr(config, "flash_attn_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"flash-attn is not installed \(pip install 'fastalign\[flash\]'\)"):
        make_config(SFTConfig, {"attn_implementation": "flash_attention_2"}, "sft")


def varlen_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                               **kwargs):
    """flash-attn's varlen contract in plain torch: no mask, causal attention inside each ``cu_seq_lens`` segment
    of the flattened rows (query/key/value ``[R, H, W, d]``; returns ``[R, W, H, d]``)."""
    assert attention_mask is None, "a varlen attention gets the segments, not a mask"
    assert cu_seq_lens_q is not None and cu_seq_lens_k is cu_seq_lens_q and max_length_q == max_length_k
    R, H, W, d = query.shape
    groups = H // key.shape[1]
    q, k, v = (x.transpose(1, 2).reshape(R * W, x.shape[1], d) for x in (query, key, value))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.empty_like(q)
    bounds = cu_seq_lens_q.tolist()
    assert max(b - a for a, b in zip(bounds, bounds[1:])) == max_length_q and bounds[-1] == R * W
    for a, b in zip(bounds, bounds[1:]):
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True,
            scale=scaling).transpose(0, 1)
    return out.reshape(R, W, H, d), None


@pytest.mark.parametrize("row_tokens", [None, 16])
def test_flash_varlen_route_gets_the_segments(tok, examples, row_tokens):
    """The flash_attention_2 route without flash-attn: an attention that transformers builds no mask for gets the
    packed segments (cu_seq_lens_*, max_length_*) as flash-attn's varlen kernel does; a plain-torch varlen
    attention there gives the padded model's values."""
    from transformers import AttentionInterface

    AttentionInterface.register("varlen_reference", varlen_reference_attention)
    lm = load_model("embedded", seed=2, attn_implementation="varlen_reference")
    packed = Batcher(tok.pad_token_id, True, row_tokens).sft(examples)
    padded = Batcher(tok.pad_token_id).sft(examples)
    got, n = SequenceLogps(lm)(**packed)
    want32, n32 = SequenceLogps(load_model("embedded", seed=2))(**padded)
    want64, _ = SequenceLogps(load_model("embedded", seed=2).double())(**padded)
    assert torch.equal(n, n32)
    assert_close_to_ref(got, want64, want32, atol=1e-5, name="sequence logps")
