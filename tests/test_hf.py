"""linear_logprobs on real (tiny, randomly initialized) Hugging Face causal LMs: ``causal_lm_logprobs`` must equal
``log_softmax(model(...).logits).gather`` of the model's own logits, values and gradients, tied or untied heads,
with the softcap / logit scaling read from each model's config."""

import copy

import pytest
import torch

from fastalign import causal_lm_logprobs, linear_logprobs
from fastalign.hf import (
    SequenceLogps,
    UnsupportedModelError,
    check_model,
    decoder,
    final_hidden,
    output_head,
    scored_tokens,
)
from fastalign.losses.sequence import sequence_logps
from fastalign.ops.logprobs import api
from fastalign.testing import assert_close_to_ref

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=97)
MODELS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}, {}),
    "llama_tied": ("LlamaForCausalLM", "LlamaConfig", {"tie_word_embeddings": True}, {}),
    "gemma2_softcap": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 3.0},
                       {"softcap": 3.0}),
    "cohere_logit_scale": ("CohereForCausalLM", "CohereConfig", {"logit_scale": 0.25}, {"logit_scale": 0.25}),
    "granite_logits_scaling": ("GraniteForCausalLM", "GraniteConfig", {"logits_scaling": 4.0},
                               {"logit_scale": 0.25}),
}


def _build(name):
    model_cls, config_cls, extra, expected = MODELS[name]
    config = getattr(transformers, config_cls)(**SMALL, **extra)
    config.eos_token_id = config.bos_token_id = config.pad_token_id = None
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random init gives logits of ~0.3: spread them so softcap and scaling matter
        model.get_output_embeddings().weight.mul_(30.0)
    return model, expected


def _reference_logprobs(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    lp = torch.log_softmax(logits.to(torch.float64), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.where((mask[:, 1:] == 1) & (mask[:, :-1] == 1), lp, 0.0)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("impl", api.IMPLS)
def test_matches_the_models_own_logits(impl, name, impl_on):
    impl_on(impl, "cpu")
    model, expected = _build(name)
    assert output_head(model).options.items() >= expected.items()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding
    if not name.startswith("gemma2"):  # (Gemma-2 in float64 gives NaN everywhere on a left-padded row)
        mask[1, :3] = 0  # left padding
    model64 = copy.deepcopy(model).double()

    lp = causal_lm_logprobs(model, ids, mask, impl=impl)
    ref64, ref32 = _reference_logprobs(model64, ids, mask), _reference_logprobs(model, ids, mask)
    assert_close_to_ref(lp, ref64, ref32, atol=1e-5, name=f"{name} logprobs")
    assert (lp[0, -2:] == 0).all() and (lp[1, :3] == 0).all() == (mask[1, 0] == 0)

    upstream = torch.randn(lp.shape, dtype=torch.float64)
    params = [model.get_output_embeddings().weight, model.get_input_embeddings().weight]
    params64 = [model64.get_output_embeddings().weight, model64.get_input_embeddings().weight]
    got = torch.autograd.grad((lp * upstream).sum(), params)
    want64 = torch.autograd.grad((ref64 * upstream).sum(), params64)
    want32 = torch.autograd.grad((ref32 * upstream).sum(), params)
    for g, g64, g32, what in zip(got, want64, want32, ["lm_head", "embed_tokens"]):
        assert_close_to_ref(g, g64, g32, atol=1e-5 * (1 + float(g64.abs().max())), name=f"{name} grad {what}")


def test_options_override_the_config():
    model, _ = _build("gemma2_softcap")
    ids = torch.randint(0, SMALL["vocab_size"], (2, 6))
    lp, ent = causal_lm_logprobs(model, ids, softcap=None, return_entropy=True)
    with torch.no_grad():
        hidden = final_hidden(model, ids)[:, :-1]
    want_lp, want_ent = linear_logprobs(hidden, model.get_output_embeddings().weight, ids[:, 1:], return_entropy=True)
    assert torch.equal(lp, want_lp) and torch.equal(ent, want_ent)
    assert not torch.equal(lp, causal_lm_logprobs(model, ids))  # the config's softcap of 3 matters


# ---- architecture coverage: bench/hf_sweep.py's checks on a fast subset, the self-check, the full sweep ---------

sweep = pytest.importorskip("bench.hf_sweep")

FAST = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt",
        "cohere", "granite", "falcon_h1", "recurrent_gemma", "olmo2", "stablelm", "llama4_text", "hyperclovax"]
# the logit processing each must be read with (sweep.LOGIT_KNOBS sharpens the family's defaults)
EXPECTED_OPTIONS = {"gemma2": {"softcap": 3.0}, "gemma3_text": {}, "cohere": {"logit_scale": 0.25},
                    "granite": {"logit_scale": 0.25}, "falcon_h1": {"logit_scale": 0.5},
                    "recurrent_gemma": {"softcap": 3.0}, "hyperclovax": {"logit_scale": 4.0}}


def _family(model_type):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sweep.check_family(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


@pytest.mark.parametrize("model_type", FAST)
def test_family_matches_its_own_logits_on_every_path(model_type):
    """check_model, causal_lm_logprobs and SequenceLogps (padded and packed) against the model's logits."""
    row = _family(model_type)
    assert row["status"] == "pass", (row.get("stage"), row["detail"])
    want = {"check_model", "causal_lm_logprobs", "SequenceLogps padded"} | (
        {"SequenceLogps packed"} if row["packing"] == "apart" else set())
    assert set(row["paths"]) == want and set(row["paths"].values()) == {"ok"}
    assert row["options"] == EXPECTED_OPTIONS.get(model_type, {})


def test_bert_style_head_transform():
    """RoBERTa's LM head (dense + GELU + LayerNorm before the linear layer): causal_lm_logprobs and the trainers'
    SequenceLogps apply it (every path matches the model's logits, gradients reach the head's layers), and a caller
    that feeds hidden states to the weight directly gets the clear error instead of wrong values."""
    row = _family("roberta")
    assert row["head_transform"] and row["status"] == "pass", (row.get("stage"), row["detail"])
    assert set(row["paths"].values()) == {"ok"}
    model = sweep.build("roberta", "RobertaForCausalLM")
    with pytest.raises(UnsupportedModelError, match=r"RobertaForCausalLM .*\(BERT-style\)"):
        output_head(model)
    ids = torch.randint(0, 128, (2, 6))
    for lp in (causal_lm_logprobs(model, ids), SequenceLogps(model)(ids, ids)[0]):
        model.zero_grad()
        lp.sum().backward()  # the transform's own layers get gradients
        assert model.lm_head.dense.weight.grad.abs().sum() > 0 and model.lm_head.layer_norm.weight.grad.abs().sum() > 0


def test_unsupported_family_raises_the_clear_error():
    row = _family("prophetnet")
    assert row["status"] == "clear error" and "ProphetNetForCausalLM (model_type='prophetnet')" in row["detail"]
    assert "n-gram predicting streams" in row["detail"]


def test_decoder_found_where_get_decoder_returns_the_model_itself():
    model = sweep.build("llama4_text", "Llama4ForCausalLM")
    assert model.get_decoder() is model  # (transformers 5.x) what decoder() must see through
    assert decoder(model) is model.model


def test_granite_trainer_path_equals_the_models_logits():
    """Regression: the trainers' SequenceLogps once missed Granite's logits_scaling that causal_lm_logprobs had."""
    model = sweep.build("granite", "GraniteForCausalLM")
    assert model.config.logits_scaling == 4.0
    batch, _ = sweep.batches(128)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    got, n = SequenceLogps(model)(ids, labels, attention_mask=mask)
    ref32, ref64 = (sweep.references(m, batch, _)[1] for m in (model, copy.deepcopy(model).double()))
    assert_close_to_ref(got, ref64, ref32, atol=1e-5 * int(n.max()), name="granite SequenceLogps")
    head = output_head(model)
    assert head.options["logit_scale"] == 0.25
    with torch.no_grad():  # the same sums without the scaling are far off: the check above can fail
        h, targets, cu = scored_tokens(model, ids, labels, attention_mask=mask)
        wrong = sequence_logps(h, head.weight, targets, cu_seqlens=cu)[0]
    assert (wrong.double() - ref64).abs().max() > 1.0


def test_check_model_passes_on_a_supported_model():
    model = sweep.build("llama", "LlamaForCausalLM")
    assert check_model(model) < 1e-4


def test_check_model_catches_logits_processed_in_an_unknown_way(monkeypatch):
    model = sweep.build("llama", "LlamaForCausalLM")
    forward = model.forward

    def scaled(*args, **kwargs):  # a model whose forward scales its logits where no config says so
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    monkeypatch.setattr(model, "forward", scaled)
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM \(model_type='llama'\): fastalign's "
                                                    r"log-probabilities \(causal_lm_logprobs\) differ .* check_model"):
        check_model(model)


def test_check_model_catches_a_missing_table_entry(monkeypatch):
    """Without the table's Granite row, the self-check refuses Granite (it does not trust the table)."""
    import fastalign.hf as hf

    model = sweep.build("granite", "GraniteForCausalLM")
    monkeypatch.setattr(hf, "LOGIT_PROCESSING", tuple(r for r in hf.LOGIT_PROCESSING if r[0] != "logits_scaling"))
    with pytest.raises(UnsupportedModelError, match=r"GraniteForCausalLM \(model_type='granite'\): .* differ"):
        check_model(model)


@pytest.mark.slow
def test_every_causal_lm_family_passes_or_raises_the_clear_error():
    """The whole sweep (about a minute on two cores): no family is silently wrong or crashes."""
    rows = sweep.sweep(log=None)
    failed = {r["model_type"]: f"{r['stage']}: {r['detail'][:300]}" for r in rows if r["status"] == "FAIL"}
    assert not failed, failed
    assert sum(r["status"] == "pass" for r in rows) >= 100
