"""Generate the embedded default: a character-level tokenizer, a tiny Llama config and the arithmetic data.

Run ``python -m fastalign.assets.build`` to regenerate everything under ``fastalign/assets/`` (deterministic:
the same files byte for byte). The task is two-digit addition, checked exactly: the prompt ``"47+38="``, the
completion ``"85"``.

- ``sft_train.jsonl`` holds *sloppy demonstrations*: when the sum has a carry, 60% of the completions
  forget it (``47+38=`` -> ``75``), as imperfect human demonstrations would; the others are correct.
- ``pref_train.jsonl`` / ``pref_eval.jsonl`` hold preference pairs: ``chosen`` is the correct sum, ``rejected``
  a typical wrong one (the forgotten carry, or an off-by-one / off-by-ten slip).
- ``eval.jsonl`` holds held-out prompts with their correct completions (the exact-match metric's answers).

Held-out problems (``eval.jsonl``, ``pref_eval.jsonl``) never appear in the training files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
# every printable ASCII character is one token, so any short text (and the chat markers) can be encoded
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
    "vocab_size": len(SPECIAL) + len(CHARS),
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def build_tokenizer(out_dir: Path) -> None:
    """Save a character-level ``PreTrainedTokenizerFast`` (with a chat template) to ``out_dir``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|[a-z]+\|>|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    bos = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    fast.save_pretrained(str(out_dir))


def _wrong_answers(a: int, b: int) -> list[int]:
    s = a + b
    typical = s - 10 if _has_carry(a, b) else s + 1  # the forgotten carry, or an off-by-one slip
    cands = [typical, s + 1, s - 1, s + 10, s - 10]
    return [c for c in dict.fromkeys(cands) if c != s and c >= 0]


def _has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def build_data(out_dir: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    problems = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(problems)
    held_out, train = problems[:300], problems[300:]

    def write(name, rows):
        with open(out_dir / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    sft = []
    for a, b in train[:4000]:
        answer = a + b
        if _has_carry(a, b) and rng.random() < 0.6:
            answer = _wrong_answers(a, b)[0]  # the forgotten carry: a sloppy demonstration
        sft.append({"prompt": f"{a}+{b}=", "completion": str(answer)})
    write("sft_train.jsonl", sft)

    def pairs(items):
        out = []
        for a, b in items:
            wrong = _wrong_answers(a, b)
            # half the time the typical error (the forgotten carry when there is one), else another slip
            rejected = wrong[0] if rng.random() < 0.5 else rng.choice(wrong)
            out.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(rejected)})
        return out

    write("pref_train.jsonl", pairs(train[4000:]))
    write("pref_eval.jsonl", pairs(held_out[:150]))
    write("eval.jsonl", [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in held_out[150:]])


def main() -> None:
    build_tokenizer(ASSETS / "tokenizer")
    (ASSETS / "model").mkdir(exist_ok=True)
    with open(ASSETS / "model" / "config.json", "w") as f:
        json.dump(MODEL_CONFIG, f, indent=2, sort_keys=True)
        f.write("\n")
    (ASSETS / "data").mkdir(exist_ok=True)
    build_data(ASSETS / "data")
    print(f"wrote the embedded default under {ASSETS}")


if __name__ == "__main__":
    main()
