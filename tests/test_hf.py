"""linear_logprobs on real (tiny, randomly initialized) Hugging Face causal LMs: ``causal_lm_logprobs`` must equal
``log_softmax(model(...).logits).gather`` of the model's own logits, values and gradients, tied or untied heads,
with the softcap / logit scaling read from each model's config."""

import copy

import pytest
import torch

from fastalign import causal_lm_logprobs, linear_logprobs
from fastalign.hf import final_hidden, output_head
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
