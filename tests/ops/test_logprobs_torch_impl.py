"""The ``torch`` impl of linear_logprobs (the launchers of ``ops/logprobs/naive.py``, the fallback without the
extension): float32 accumulation of its logit blocks, and bounded memory for expanded (stride-0) weights."""

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastalign import linear_logprobs
from fastalign.ops.logprobs import naive


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bf16_logit_blocks_accumulate_in_float32(dtype):
    """The logits of 16-bit inputs are float32 sums (as on the fused impls), not rounded to the inputs' dtype:
    against the float64 reference on the same (exactly representable) inputs, the error is that of float32 sums
    over D = 64 products of size ~1 (about 64 * 6e-8 * 3 ~ 1e-5 on logits ~3), far below the 16-bit rounding
    of the logits (bf16: 2^-8 relative, ~1e-2 on logprob and entropy)."""
    N, D, V = 7, 64, 1000
    h = torch.randn(N, D).to(dtype)
    w = (torch.randn(V, D) * (3.0 / math.sqrt(D))).to(dtype)
    b = torch.randn(V).to(dtype)
    t = torch.randint(0, V, (N,))
    lp, ent = linear_logprobs(h, w, t, b, return_entropy=True, impl="torch")
    lp64, ent64 = naive.linear_logprobs(h.double(), w.double(), t, b.double(), return_entropy=True)
    assert (lp.double() - lp64).abs().max() < 1e-4
    assert (ent.double() - ent64).abs().max() < 1e-4


def _largest_allocation(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events()] + [0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expanded_weight_is_not_copied_whole(dtype, monkeypatch):
    """A weight expanded from one row (stride 0) is never copied whole or upcast whole: the largest allocation
    stays below half of a [V, D] float32 copy (the 64-row logit block, [64, V] float32, is 8x smaller here, and
    the weight is upcast in chunks of 1 MiB, 1024 rows, for the test: 8 chunks)."""
    monkeypatch.setattr(naive, "_CHUNK_BYTES", 1 << 20)
    N, D, V = 5, 256, 8192
    row = torch.randn(1, D, dtype=dtype)
    w = row.expand(V, D)  # frozen: a weight gradient would be [V, D] by definition
    h = torch.randn(N, D, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,))

    def run():
        lp, ent = linear_logprobs(h, w, t, return_entropy=True, impl="torch")
        torch.autograd.grad(lp.sum() + ent.sum(), h)

    assert _largest_allocation(run) < V * D * 4 // 2
    got = linear_logprobs(h, w, t, return_entropy=True, impl="torch")
    want = naive.linear_logprobs(h.double(), w.double(), t, return_entropy=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-4)
