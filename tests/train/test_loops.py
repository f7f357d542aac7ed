"""The real loops on the embedded model for a few steps: each command end to end, accumulation, DPO's loss."""

import importlib.util
import json

import pytest
import torch
from trainhelp import quick
from transformers import AutoModelForCausalLM

from fastalign import dpo_loss
from fastalign.hf import RewardModel, SequenceLogps, ValueHead
from fastalign.testing import assert_close_to_ref
from fastalign.train import DPOConfig, RMConfig, SFTConfig, train_dpo, train_rm, train_sft
from fastalign.train.common import Run
from fastalign.train.config import make_config
from fastalign.train.data import Encoder, collate_pref, encode_pref_row, load_examples
from fastalign.train.dpo import dpo_batch_loss, loss_options
from fastalign.train.model import load_model, load_tokenizer


def metrics_of(out_dir):
    """The rows of metrics.jsonl (a step-0 row holds the evaluation before training)."""
    with open(f"{out_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_rows(rows):
    return [r for r in rows if "loss" in r]


def test_sft_end_to_end(tmp_path, small_data):
    cfg = make_config(SFTConfig, quick(tmp_path, small_data, "sft", eval_data=small_data["gen"], eval_steps=3,
                                       plots=True, save_steps=2, report_to_tensorboard=True), "sft")
    summary = train_sft(cfg)
    rows = metrics_of(cfg.output_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert {"loss", "grad_norm", "learning_rate", "num_tokens", "epoch"} <= set(rows[0])
    # the rate each step used (TRL logs the same): warmup 1/(1+1) of the peak, the peak, then half-way down the cosine
    assert [r["learning_rate"] for r in rows if "loss" in r] == pytest.approx([1.5e-3, 3e-3, 1.5e-3])
    assert "eval_loss" in rows[-1] and 0 <= summary["exact_match_after"] <= 1
    assert (tmp_path / "run_sft" / "curves.png").stat().st_size > 1000
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "run_sft" / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "run_sft").glob("checkpoint-*")) == ["checkpoint-000002",
                                                                                 "checkpoint-000003"]
    final = AutoModelForCausalLM.from_pretrained(summary["final_model"])  # plain transformers loads it
    assert (final.model.embed_tokens.weight != load_model("embedded").model.embed_tokens.weight).any()


def test_rm_end_to_end(tmp_path, small_data):
    cfg = make_config(RMConfig, quick(tmp_path, small_data, "rm", eval_steps=3, gradient_checkpointing=True), "rm")
    summary = train_rm(cfg)
    rows = metrics_of(cfg.output_dir)
    assert rows[0]["step"] == 0 and "eval_accuracy" in rows[0]
    assert {"loss", "accuracy", "margin", "grad_norm"} <= set(train_rows(rows)[0])
    assert summary["eval_accuracy after"] == pytest.approx(rows[-1]["eval_accuracy"], abs=1e-6)
    head = ValueHead.load(summary["final_model"], 96)
    rm = RewardModel(AutoModelForCausalLM.from_pretrained(summary["final_model"]), head)
    assert rm(torch.tensor([[1, 20, 21]]), torch.ones(1, 3, dtype=torch.long)).shape == (1,)


@pytest.mark.parametrize("ref", ["frozen", "precomputed", "sync"])
def test_dpo_end_to_end(tmp_path, small_data, ref):
    over = {"precomputed": {"precompute_ref_log_probs": True},
            "sync": {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5,
                     "save_steps": 3}}.get(ref, {})
    cfg = make_config(DPOConfig, quick(tmp_path, small_data, "dpo", eval_steps=3, **over), "dpo")
    summary = train_dpo(cfg)
    rows = metrics_of(cfg.output_dir)
    names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "grad_norm", "learning_rate"}
    first = train_rows(rows)[0]
    assert names <= set(first) and "eval_rewards/accuracies" in rows[-1]
    assert first["step"] == 1 and first["rewards/margins"] == 0.0  # step 1: the policy is the reference
    assert rows[0] == {"step": 0, **{k: pytest.approx(v, abs=1e-6) for k, v in rows[0].items() if k != "step"}}
    assert rows[0]["eval_rewards/accuracies"] == 0.0
    assert summary["eval_rewards/accuracies before"] == 0.0
    assert {"exact_match before", "exact_match after", "eval_rewards/accuracies after"} <= set(summary)
    if ref == "precomputed":
        cached = list((tmp_path / "run_dpo" / "cache").glob("ref_logps-*.pt"))
        assert len(cached) == 2  # train and held-out pairs
        stamps = [p.stat().st_mtime_ns for p in cached]
        train_dpo(make_config(DPOConfig, {**vars(cfg), "overwrite_output_dir": True}, "dpo"))  # the cache is reused
        assert [p.stat().st_mtime_ns for p in cached] == stamps
    if ref == "sync":  # the moving reference is saved and is no longer the starting model
        ref_saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run_dpo" / "checkpoint-000003" / "ref"))
        start = load_model("embedded")
        assert (ref_saved.model.norm.weight != start.model.norm.weight).any()


def test_dpo_loss_equals_dpo_loss_on_naive_logps(small_data):
    """The trainer's loss for a batch equals dpo_loss on logps from materialized logits (values and grads)."""
    tok = load_tokenizer("embedded")
    pairs = load_examples(small_data["pref"], encode_pref_row, Encoder(tok, 64), False)[:6]
    batch = collate_pref(pairs, tok.pad_token_id)
    cfg = make_config(DPOConfig, {"output_dir": "unused", "beta": 0.5, "loss_type": "sigmoid,sft",
                                  "loss_weights": "1,0.3"}, "dpo")
    run = Run.__new__(Run)  # only .autocast() and .device are used
    run.cfg, run.device = cfg, torch.device("cpu")

    def naive(lm, ref_lm):
        out = []
        for model in (lm, ref_lm):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            lp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)
            lp = (lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)).sum(-1)
            out.append(lp)
        n = (batch["labels"][:, 1:] != -100).sum(-1)
        B = len(pairs)
        return dpo_loss(out[0][:B], out[0][B:], out[1][:B].detach(), out[1][B:].detach(),
                        chosen_lengths=n[:B], rejected_lengths=n[B:], **loss_options(cfg))[0]

    policy, ref = load_model("embedded", seed=0), load_model("embedded", seed=7)
    with torch.no_grad():
        ref_logps = SequenceLogps(ref)(**batch)[0]
    B = len(pairs)
    loss, metrics = dpo_batch_loss(SequenceLogps(policy), batch, (ref_logps[:B], ref_logps[B:]), cfg, run)
    assert 0 < float(metrics["rewards/accuracies"]) < 1  # two different random models: a non-trivial batch
    policy64, ref64 = load_model("embedded", seed=0).double(), load_model("embedded", seed=7).double()
    ref_loss64, ref_loss32 = naive(policy64, ref64), naive(load_model("embedded", seed=0), ref)
    assert_close_to_ref(loss, ref_loss64, ref_loss32, atol=1e-6, name="dpo loss")
    loss.backward()
    ref_loss64.backward()
    lowp = load_model("embedded", seed=0)
    naive(lowp, ref).backward()
    lowp_grads = dict(lowp.named_parameters())
    for name, p in policy.named_parameters():
        p64 = dict(policy64.named_parameters())[name]
        assert_close_to_ref(p.grad, p64.grad, lowp_grads[name].grad, atol=1e-6, name=name)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_gradient_accumulation_equals_the_large_batch(tmp_path, small_data, kind, monkeypatch):
    """One optimizer step over 2 micro-batches of 4 has the gradient of one batch of 8 (float64 reference)."""
    captured = []
    original = Run.step

    def capture(self, module, opt, sched):
        captured.append({k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None})
        return original(self, module, opt, sched)

    monkeypatch.setattr(Run, "step", capture)
    cls, fn = (SFTConfig, train_sft) if kind == "sft" else (DPOConfig, train_dpo)
    for i, (bs, accum, dtype) in enumerate([(8, 1, "float64"), (8, 1, "float32"), (4, 2, "float32")]):
        over = quick(tmp_path / str(i), small_data, kind, max_steps=1, per_device_train_batch_size=bs,
                     gradient_accumulation_steps=accum, dtype=dtype, gen_eval_data="", eval_data="")
        if kind == "dpo":  # a pair-mean loss (the NLL terms sft/cpo/orpo are token means per micro-batch)
            over["loss_type"] = "sigmoid"
        fn(make_config(cls, over, kind))
    big64, big32, accumulated = captured
    assert set(accumulated) == set(big64)
    for name in big64:
        assert_close_to_ref(accumulated[name], big64[name], big32[name], atol=1e-6, name=name)


def test_dpo_on_chat_rows(tmp_path, small_data):
    """Preference rows as chat messages (implicit prompt) train end to end through the chat template."""
    rows = []
    for r in map(json.loads, open(small_data["pref"])):
        user = {"role": "user", "content": r["prompt"]}
        rows.append({"chosen": [user, {"role": "assistant", "content": r["chosen"]}],
                     "rejected": [user, {"role": "assistant", "content": r["rejected"]}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = {**quick(tmp_path, small_data, "dpo", eval_data="", gen_eval_data="", max_steps=2), "data": str(path)}
    cfg = make_config(DPOConfig, over, "dpo")
    train_dpo(cfg)
    first = train_rows(metrics_of(cfg.output_dir))[0]
    assert first["logps/chosen"] < 0 and first["rewards/margins"] == 0.0


def test_bco_pair_is_trls_by_default_and_bco_shift_reaches_the_loss(tmp_path, small_data):
    """``loss_type=bco_pair``: TRL 1.16's loss (no shift) by default; ``bco_shift=true`` subtracts the running mean
    of the implicit rewards. At step 1 the policy is its reference (rewards 0, mean 0): both are 2 log 2; once the
    rewards move, the shift changes the loss."""
    import math

    from trainhelp import logged

    losses = {}
    for shift in (False, True):
        over = quick(tmp_path / str(shift), small_data, "dpo", loss_type="bco_pair", bco_shift=shift, max_steps=3,
                     learning_rate=1e-2, eval_data="", gen_eval_data="")
        train_dpo(make_config(DPOConfig, over, "dpo"))
        losses[shift] = logged(over["output_dir"], "loss").tolist()
    assert losses[False][0] == pytest.approx(2 * math.log(2), abs=1e-5) == losses[True][0]
    assert abs(losses[False][2] - losses[True][2]) > 1e-4
