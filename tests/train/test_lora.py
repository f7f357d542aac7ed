"""LoRA through peft (optional): adapters train, the base stays frozen, and final/ holds the merged model."""

import json

import pytest
import torch
from trainhelp import quick

from fastalign.hf import SequenceLogps
from fastalign.testing import assert_close_to_ref
from fastalign.train import DPOConfig, SFTConfig, train_dpo
from fastalign.train.config import ConfigError, RMConfig, make_config
from fastalign.train.data import Encoder, collate_pref, encode_pref_row, load_examples
from fastalign.train.model import load_model, load_tokenizer

peft = pytest.importorskip("peft")


def test_lora_dpo_trains_adapters_and_saves_the_merged_model(tmp_path, small_data):
    over = quick(tmp_path, small_data, "dpo", max_steps=3, gen_eval_data="", use_lora=True, lora_r=4,
                 lora_alpha=8, lora_target_modules="q_proj,v_proj", learning_rate=1e-2)
    summary = train_dpo(make_config(DPOConfig, over, "dpo"))
    final = tmp_path / "run_dpo" / "final"
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    assert summary["eval_loss after"] != summary["eval_loss before"]

    base = load_model("embedded", seed=0).eval()
    merged = load_model(str(final)).eval()
    b, m = base.state_dict(), merged.state_dict()
    assert b.keys() == m.keys()  # a plain transformers model: no LoRA keys left
    changed = {k for k in b if not torch.equal(b[k], m[k])}
    assert changed and all(".q_proj." in k or ".v_proj." in k for k in changed)  # only the adapted layers moved

    # the merged weights compute what the adapter on the base computes (float64 adapter: the reference)
    tok = load_tokenizer("embedded")
    rows = load_examples(small_data["pref_eval"], encode_pref_row, Encoder(tok, 64, "keep_end"), False, None)
    batch = collate_pref(rows[:4], tok.pad_token_id)
    with torch.no_grad():
        out = SequenceLogps(merged)(**batch)[0]
        refs = [SequenceLogps(peft.PeftModel.from_pretrained(load_model("embedded", seed=0, dtype=dt),
                                                             str(final / "adapter")).eval())(**batch)[0]
                for dt in (torch.float64, torch.float32)]
    assert_close_to_ref(out, refs[0], refs[1], atol=1e-5, name="merged logps")


@pytest.mark.parametrize("cls,over,match", [
    (RMConfig, {}, "false for rm"),
    (SFTConfig, {"distributed": "fsdp"}, "false with distributed=fsdp"),
    (DPOConfig, {"sync_ref_model": True}, "false with sync_ref_model"),
    (SFTConfig, {"lora_r": 0}, "lora_r must be >= 1; got 0"),
    (SFTConfig, {"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
])
def test_lora_options_are_checked(cls, over, match):
    with pytest.raises(ConfigError, match=match):
        make_config(cls, {"use_lora": True, **over}, "cmd")
