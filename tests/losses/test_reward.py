"""reward_model_loss: Bradley-Terry loss with margin and centering, against the formula."""

import pytest
import torch

from fastalign import reward_model_loss
from fastalign.testing import assert_close_to_ref


def formula(rc, rr, margin, coef):
    return (torch.log1p(torch.exp(-(rc - rr - margin)))).mean() + coef * ((rc + rr) ** 2).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("margin_kind", ["none", "scalar", "tensor"])
@pytest.mark.parametrize("coef", [None, 0.01])
def test_matches_formula_values_and_grads(dtype, margin_kind, coef):
    B = 9
    rc64, rr64 = torch.randn(B, dtype=torch.float64) * 2, torch.randn(B, dtype=torch.float64) * 2
    margin = {"none": None, "scalar": 0.3, "tensor": torch.rand(B, dtype=torch.float64)}[margin_kind]
    m64 = 0.0 if margin is None else margin

    def run(fn, dt):
        rc, rr = rc64.to(dt).requires_grad_(), rr64.to(dt).requires_grad_()
        m = margin.to(dt) if isinstance(margin, torch.Tensor) else margin
        loss = fn(rc, rr, m)
        return (loss.detach(), *torch.autograd.grad(loss, (rc, rr)))

    ours = run(lambda a, b, m: reward_model_loss(a, b, margin=m, center_rewards_coefficient=coef)[0], dtype)
    ref = lambda a, b, m: formula(a.double() if dtype == torch.float64 else a.float(),
                                  b.double() if dtype == torch.float64 else b.float(),
                                  (0.0 if m is None else m) if not isinstance(m, torch.Tensor) else m.to(a.dtype),
                                  coef or 0.0)
    ref64 = run(lambda a, b, m: formula(a, b, m64 if not isinstance(m64, torch.Tensor) else m, coef or 0.0),
                torch.float64)
    ref_lowp = run(ref, dtype)
    for name, o, r, rl in zip(("loss", "grad chosen", "grad rejected"), ours, ref64, ref_lowp):
        assert_close_to_ref(o, r, rl, atol=1e-6, name=name)


def test_metrics_and_value_head_shape():
    rc, rr = torch.tensor([[1.0], [0.2], [3.0]]), torch.tensor([[0.5], [0.4], [-1.0]])
    loss, m = reward_model_loss(rc, rr)
    assert loss.dim() == 0
    expected = {"accuracy": 2 / 3, "margin": (0.5 - 0.2 + 4.0) / 3, "mean_reward": 4.1 / 6, "min_reward": -1.0,
                "max_reward": 3.0}
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert abs(float(m[k]) - v) < 1e-6, k


@pytest.mark.parametrize("call, error, match", [
    (lambda: reward_model_loss(torch.randn(3), torch.randn(4)), ValueError, "one reward per pair"),
    (lambda: reward_model_loss(torch.randn(3, 2), torch.randn(3, 2)), ValueError, r"must be \[B\] or \[B, 1\]"),
    (lambda: reward_model_loss(torch.randn(3), torch.randn(3), margin=torch.randn(2)), ValueError,
     "margin must be a number or one value per pair"),
    (lambda: reward_model_loss(torch.randn(3), torch.randn(3), center_rewards_coefficient=-1), ValueError,
     "center_rewards_coefficient must be >= 0"),
    (lambda: reward_model_loss(torch.randn(3), torch.randn(3), margin="x"), TypeError, "margin must be a real"),
    (lambda: reward_model_loss(torch.randn(0), torch.randn(0)), ValueError, "at least one pair"),
    (lambda: reward_model_loss(torch.arange(3), torch.randn(3)), TypeError, "chosen_rewards must have dtype"),
])
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
