"""Model adapter: sequence log-probabilities without logits equal the naive materialized-logits path."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fastalign.assets import ASSETS
from fastalign.hf import RewardModel, SequenceLogps, ValueHead, head_options
from fastalign.testing import assert_close_to_ref
from fastalign.train.data import Encoder, collate_sft, encode_sft_row
from fastalign.train.model import load_model, load_tokenizer


def naive_sequence_logps(lm, batch):
    """What user code does: build the logits, log_softmax, gather the labels, sum the completion tokens."""
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, -1)
    lp = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1), mask.sum(-1)


def untied_model(seed=0):
    config = AutoConfig.from_pretrained(str(ASSETS / "model"))
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def batch():
    tok = load_tokenizer("embedded")
    enc = Encoder(tok, 64)
    rows = [{"prompt": "12+34=", "completion": "46"}, {"prompt": "9+99=", "completion": "108"},
            {"prompt": "1+1=", "completion": "2"}]
    return collate_sft([encode_sft_row(enc, r, "x") for r in rows], tok.pad_token_id)


@pytest.mark.parametrize("tied", [True, False])
def test_sequence_logps_match_naive_values_and_grads(batch, tied):
    lm32 = load_model("embedded", seed=1) if tied else untied_model(1)
    assert (lm32.get_output_embeddings().weight is lm32.get_input_embeddings().weight) == tied
    lm64 = (load_model("embedded", seed=1) if tied else untied_model(1)).double()
    out, n = SequenceLogps(lm32)(**batch)
    ref64, n64 = naive_sequence_logps(lm64, batch)
    ref32, _ = naive_sequence_logps(lm32, batch)
    assert torch.equal(n, n64) and n.tolist() == [3, 4, 2]  # completion digits + eos
    assert_close_to_ref(out, ref64, ref32, atol=1e-5, name="sequence logps")
    w = torch.tensor([0.3, -1.0, 2.0])
    grads = {}
    for name, model, value in [("out", lm32, out), ("ref64", lm64, ref64), ("ref32", lm32, ref32)]:
        model.zero_grad()
        (value * w.to(value.dtype)).sum().backward(retain_graph=True)
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    for k in grads["out"]:
        assert_close_to_ref(grads["out"][k], grads["ref64"][k], grads["ref32"][k], atol=1e-5, name=k)


def test_head_options_read_softcap_and_logit_scale():
    config = AutoConfig.from_pretrained(str(ASSETS / "model"))
    assert head_options(config) == {"softcap": None, "logit_scale": 1.0}
    config.final_logit_softcapping, config.logit_scale = 30.0, 0.5
    assert head_options(config) == {"softcap": 30.0, "logit_scale": 0.5}


def test_embedded_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b = load_model("embedded", seed=2), load_model("embedded", seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = load_model("embedded", seed=3)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_reward_model_reads_last_real_token_and_head_round_trips(batch, tmp_path):
    rm = RewardModel(load_model("embedded"))
    scores = rm(batch["input_ids"], batch["attention_mask"])
    hidden = rm.lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    last = batch["attention_mask"].sum(1) - 1
    expect = rm.value_head(hidden[torch.arange(3), last])
    assert_close_to_ref(scores, expect.double(), atol=1e-6)
    rm.value_head.save(tmp_path)
    head = ValueHead.load(tmp_path, rm.lm.config.hidden_size)
    assert torch.equal(head.weight, rm.value_head.weight) and torch.equal(head.bias, rm.value_head.bias)
    assert ValueHead.load(tmp_path / "none", 8) is None
