"""Rollout sampling: exact samples of the softmax, the same completion for the same prompt and seed in any batch."""

import pytest
import torch

from fastalign.train.model import load_model, load_tokenizer
from fastalign.train.rollout import Prompt, SeededSampling, sample


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (2, 1.0), (0, 0.7)])
def test_seeded_sampling_draws_from_the_tempered_softmax(top_k, top_p):
    z = torch.tensor([[1.5, 1.0, 0.2, -1.0, 0.7]])
    T = 0.8
    p = torch.softmax(z[0] / T, -1).double()
    keep = torch.zeros(5, dtype=torch.bool)
    order = p.argsort(descending=True)
    if top_k:
        keep[order[:top_k]] = True
    else:
        mass = p[order].cumsum(0) - p[order]
        keep[order[mass < top_p]] = True
    want = torch.where(keep, p, 0.0)
    want /= want.sum()
    n = 8000
    counts = torch.zeros(5, dtype=torch.float64)
    for seed in range(n):
        counts[int(SeededSampling([seed], 0, T, top_k, top_p)(torch.zeros(1, 3, dtype=torch.long), z).argmax())] += 1
    freq = counts / n
    assert torch.equal(freq > 0, keep)  # never a token top-k / top-p removed
    assert (freq - want).abs().max() < 4 * (want * (1 - want) / n).sqrt().max() + 1e-3  # 4 sigma


def test_a_prompts_completion_does_not_depend_on_its_batch():
    lm, tok = load_model("embedded", seed=1), load_tokenizer("embedded")
    texts = ["12+34=", "9+99=", "70+5=", "1+1=", "45+45="]
    prompts = [Prompt(tok(t)["input_ids"], t) for t in texts]
    seeds = [11, 12, 13, 14, 15]
    together = sample(lm, tok, prompts, seeds, max_new_tokens=5)
    alone = [sample(lm, tok, [p], [s], max_new_tokens=5).completions[0] for p, s in zip(prompts, seeds)]
    shuffled = sample(lm, tok, prompts[::-1], seeds[::-1], max_new_tokens=5, batch_size=2).completions[::-1]
    assert together.completions == alone == shuffled
    assert len(set(map(tuple, together.completions))) > 1  # a random init samples different completions
    before = torch.get_rng_state()
    again = sample(lm, tok, prompts, [s + 100 for s in seeds], max_new_tokens=5)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    assert again.completions != together.completions  # other seeds, other samples
    with pytest.raises(ValueError, match="seeds must give one seed per prompt \\(5\\); got 4"):
        sample(lm, tok, prompts, seeds[:4], max_new_tokens=5)
