import math

import pytest
import torch

from fastalign import rl
from fastalign.testing import assert_close_to_ref


def _ref(lp, ref, kind):
    lr = lp - ref
    return {"k1": lr, "k2": 0.5 * lr**2, "k3": torch.exp(ref - lp) - 1 - (ref - lp)}[kind]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimators_match_formulas_with_grads(kind, dtype):
    lp = (-torch.rand(4, 6) * 3).to(dtype).requires_grad_()
    ref = (-torch.rand(4, 6) * 3).to(dtype).requires_grad_()
    out = getattr(rl, kind)(lp, ref)
    assert out.dtype == torch.float32
    lp64, ref64 = lp.detach().double().requires_grad_(), ref.detach().double().requires_grad_()
    r64 = _ref(lp64, ref64, kind)
    r32 = _ref(lp.detach().float(), ref.detach().float(), kind)
    assert_close_to_ref(out, r64, r32, atol=1e-6, name=kind)
    g = torch.randn(4, 6)
    (out * g).sum().backward()
    (r64 * g.double()).sum().backward()
    assert_close_to_ref(lp.grad, lp64.grad, atol=1e-5 if dtype == torch.float32 else 1e-2, name=f"{kind} d lp")
    assert_close_to_ref(ref.grad, ref64.grad, atol=1e-5 if dtype == torch.float32 else 1e-2, name=f"{kind} d ref")


def test_k3_is_nonnegative_unbiased_and_clamped():
    # E_{x~p}[k3] = KL(p || q): check on two categorical distributions by exact expectation.
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    kl = (p * (p / q).log()).sum()
    k3 = rl.k3(p.log(), q.log())
    assert (k3 >= 0).all()
    assert math.isclose(float((p * k3).sum()), float(kl), rel_tol=1e-12)
    assert math.isclose(float((p * rl.k1(p.log(), q.log())).sum()), float(kl), rel_tol=1e-12)
    # A huge log-ratio does not overflow; clamp bounds the estimate.
    big = rl.k3(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert torch.isfinite(big).all() and float(big) == pytest.approx(math.exp(20) - 21, rel=1e-6)
    assert float(rl.k3(torch.tensor([-200.0]), torch.tensor([0.0]), clamp=10.0)) == 10.0
    assert float(rl.k1(torch.tensor([-5.0]), torch.tensor([0.0]), clamp=2.0)) == -2.0


def test_kl_penalized_rewards():
    lp, ref = torch.randn(3, 5), torch.randn(3, 5)
    m = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    scores = torch.tensor([1.0, 2.0, 3.0])
    out = rl.kl_penalized_rewards(scores, lp, ref, m, beta=0.1, kind="k1")
    expected = torch.where(m.bool(), -0.1 * (lp - ref), 0.0)
    expected[0, 2] += 1.0
    expected[1, 4] += 2.0
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("call, err, match", [
    (lambda: rl.kl_estimate(torch.zeros(3), torch.zeros(4)), ValueError, "ref_logprobs must have the shape"),
    (lambda: rl.kl_estimate(torch.zeros(3), torch.zeros(3), "k4"), ValueError, "kind must be one of"),
    (lambda: rl.kl_estimate(torch.zeros(3), torch.zeros(3), "k3", clamp=0.0), ValueError, "clamp must be"),
    (lambda: rl.kl_estimate(torch.zeros(3, dtype=torch.long), torch.zeros(3)), TypeError, "logprobs must have"),
    (lambda: rl.kl_penalized_rewards(torch.zeros(2), torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3, 4), 0.1),
     ValueError, "scores must be \\[B\\] with B = logprobs.shape\\[0\\] = 3"),
    (lambda: rl.kl_penalized_rewards(torch.zeros(3), torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3, 4), -1.0),
     ValueError, "beta must be >= 0"),
])
def test_bad_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call()
