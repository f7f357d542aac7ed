import os

import pytest
import torch
import torch.multiprocessing as mp

from fastalign.rl import whiten
from fastalign.testing import assert_close_to_ref


def _ref_whiten(x, m, shift_mean=True, unbiased=True, eps=1e-8):
    """Straight formula on the selected elements, float64."""
    v = x.double()[m]
    mean, var = v.mean(), v.var(unbiased=unbiased)
    out = (x.double() - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_formula_values_and_grads(shift_mean, unbiased, dtype):
    x = (torch.randn(4, 9) * 3 + 1).to(dtype).requires_grad_()
    m = torch.rand(4, 9) > 0.3
    out = whiten(x, m.int(), shift_mean, unbiased=unbiased)
    assert out.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    ref = _ref_whiten(x64, m, shift_mean, unbiased)
    x32 = x.detach().float().requires_grad_()
    ref32 = _ref_whiten(x32, m, shift_mean, unbiased).float()
    atol = 1e-6 if dtype != torch.bfloat16 else 2e-2
    assert_close_to_ref(out, ref, ref32 if dtype != torch.float64 else None, atol=atol, name="whiten")
    g = torch.randn(4, 9)
    (out.float() * g).sum().backward()
    (ref * g.double()).sum().backward()
    assert_close_to_ref(x.grad, x64.grad, atol=atol, name="whiten grad")


def test_no_mask_and_bad_mask():
    x = torch.randn(7)
    assert_close_to_ref(whiten(x), _ref_whiten(x, torch.ones(7, dtype=torch.bool)), atol=1e-6)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1; got 3"):
        whiten(x, torch.tensor([1, 0, 3, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="mask must have the shape \\(7,\\); got \\(6,\\)"):
        whiten(x, torch.ones(6))
    with pytest.raises(TypeError, match="x must have dtype"):
        whiten(torch.arange(7))


def _worker(rank, world, init, xs, ms, gs, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x = xs[rank].clone().requires_grad_()
    out = whiten(x, ms[rank], process_group=dist.group.WORLD)
    (out * gs[rank]).sum().backward()
    torch.save({"out": out.detach(), "grad": x.grad}, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_two_gloo_processes_equal_whitening_of_the_concatenation(tmp_path):
    xs = [torch.randn(3, 8, dtype=torch.float64) * 2 + 1, torch.randn(5, 8, dtype=torch.float64) - 1]
    ms = [torch.rand(3, 8) > 0.3, torch.rand(5, 8) > 0.5]
    gs = [torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)]
    init = f"file://{tmp_path / 'rendezvous'}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, init, xs, ms, gs, str(tmp_path / "res")), nprocs=2, join=True)
    x = torch.cat(xs).requires_grad_()
    ref = whiten(x, torch.cat(ms))
    (ref * torch.cat(gs)).sum().backward()
    got = [torch.load(tmp_path / f"res.{r}") for r in range(2)]
    assert_close_to_ref(torch.cat([g["out"] for g in got]), ref, atol=1e-12, name="distributed whiten")
    assert_close_to_ref(torch.cat([g["grad"] for g in got]), x.grad, atol=1e-12, name="distributed whiten grad")
    # And a single rank alone is *not* the global whitening (the test can fail).
    assert not torch.allclose(whiten(xs[0], ms[0]), ref[:3])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_out_nonfinite_values_give_no_value_and_no_gradient(bad, shift_mean):
    """A NaN or inf outside the mask must touch neither the result nor any gradient (the forward used to be right
    and the backward NaN everywhere: 0 * NaN in the gradient of the masked-out squared deviation)."""
    x = torch.randn(3, 7, dtype=torch.float64)
    m = torch.rand(3, 7) > 0.3
    m[1, 2], m[2, 5] = False, True
    upstream = torch.randn(3, 7, dtype=torch.float64)
    clean = x.clone().requires_grad_()
    dirty = torch.where(m, x, bad).requires_grad_()
    out_clean, out_dirty = whiten(clean, m, shift_mean), whiten(dirty, m, shift_mean)
    assert torch.equal(out_dirty, out_clean)
    g_clean = torch.autograd.grad((out_clean * upstream).sum(), clean)[0]
    g_dirty = torch.autograd.grad((out_dirty * upstream).sum(), dirty)[0]
    assert torch.isfinite(g_dirty).all()
    assert torch.equal(g_dirty, g_clean) and (g_dirty[~m] == 0).all()
