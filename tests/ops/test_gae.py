import math

import pytest
import torch

from fastalign import discounted_returns, gae
from fastalign.ops.gae import naive
from fastalign.testing import assert_close_to_ref

# "triton@cuda" is the Triton impl on a GPU; plain "triton" runs under the interpreter on the CPU.
IMPLS = ["torch", "triton", "cpp"] + [pytest.param(i, marks=pytest.mark.gpu) for i in ("cuda", "triton@cuda")]
GPU_IMPLS = [pytest.param(i, marks=pytest.mark.gpu) for i in ("triton", "cuda")]


def _dev(impl):
    """``(impl name, device)`` of a parametrized impl."""
    if impl == "triton@cuda":
        return "triton", "cuda"
    return impl, "cuda" if impl == "cuda" else "cpu"


def _mask(kind, B, T, device):
    """0/1 masks of every padding kind, with lengths that include 0 and T."""
    if kind == "none":
        return None
    lengths = torch.randint(0, T + 1, (B,))
    if B > 0:
        lengths[0] = T
    if B > 1:
        lengths[1] = 0
    pos = torch.arange(T)[None, :]
    if kind == "right":
        m = pos < lengths[:, None]
    elif kind == "left":
        m = pos >= (T - lengths)[:, None]
    else:  # holes anywhere
        m = torch.rand(B, T) > 0.35
    return m.to(device)


def _offsets(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _check(impl, rewards, values, mask=None, cu=None, bootstrap=None, gamma=0.97, lam=0.9, atol_scale=1e-5):
    """Values of gae and discounted_returns against the float64 reference (float32-math reference as low-p)."""
    adv, ret = gae(rewards, values, mask=mask, cu_seqlens=cu, gamma=gamma, lam=lam, bootstrap=bootstrap, impl=impl)
    assert adv.dtype == ret.dtype == torch.float32 and not adv.requires_grad
    d = lambda t: None if t is None else t.double()
    f = lambda t: None if t is None else t.float()
    adv64, ret64 = naive.gae(d(rewards), d(values), mask, cu, gamma, lam, d(bootstrap))
    adv32, ret32 = naive.gae(f(rewards), f(values), mask, cu, gamma, lam, f(bootstrap))
    # The scan kernels sum the same terms in another order than the loop: atol scales with the magnitudes.
    atol = atol_scale * (1 + (adv64.abs().max().item() if adv64.numel() else 0))
    assert_close_to_ref(adv, adv64, adv32, atol=atol, name=f"{impl} advantages")
    assert_close_to_ref(ret, ret64, ret32, atol=atol, name=f"{impl} returns")
    g = discounted_returns(rewards, mask=mask, cu_seqlens=cu, gamma=gamma, bootstrap=bootstrap, impl=impl)
    g64 = naive.discounted_returns(d(rewards), mask, cu, gamma, d(bootstrap))
    g32 = naive.discounted_returns(f(rewards), mask, cu, gamma, f(bootstrap))
    atol = atol_scale * (1 + (g64.abs().max().item() if g64.numel() else 0))
    assert_close_to_ref(g, g64, g32, atol=atol, name=f"{impl} discounted_returns")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["none", "right", "left", "holes"])
@pytest.mark.parametrize("B, T", [(1, 1), (9, 37), (2, 130), (2, 0), (0, 5)])
def test_padded_matches_reference(impl, kind, B, T, impl_on):
    impl, device = _dev(impl)
    impl_on(impl, device)
    r, v = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    _check(impl, r, v, mask=_mask(kind, B, T, device))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_and_float64_inputs(impl, dtype, impl_on):
    impl, device = _dev(impl)
    impl_on(impl, device)
    r, v = torch.randn(3, 40, device=device, dtype=dtype), torch.randn(3, 40, device=device, dtype=dtype)
    _check(impl, r, v, mask=_mask("holes", 3, 40, device), bootstrap=torch.randn(3, device=device, dtype=dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lengths", [[1], [0], [3, 0, 50, 1, 7], [0, 0], []])
def test_packed_matches_reference(impl, lengths, impl_on):
    impl, device = _dev(impl)
    impl_on(impl, device)
    N = sum(lengths)
    r, v = torch.randn(N, device=device), torch.randn(N, device=device)
    _check(impl, r, v, cu=_offsets(lengths, device), bootstrap=torch.randn(len(lengths), device=device))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.0, 0.5), (0.9, 0.0), (0.99, 0.95)])
def test_bootstrap_and_extreme_coefficients(impl, gamma, lam, impl_on):
    impl, device = _dev(impl)
    impl_on(impl, device)
    r, v = torch.randn(4, 23, device=device), torch.randn(4, 23, device=device)
    _check(impl, r, v, mask=_mask("left", 4, 23, device), bootstrap=torch.randn(4, device=device), gamma=gamma,
           lam=lam)


def test_triton_chains_many_tiles(impl_on):
    """Tiles of 16 over sequences of up to 100 tokens: the carry crosses 7 tile boundaries, masked or packed."""
    impl_on("triton", "cpu")
    from fastalign.ops.gae.triton import gae_fwd

    r, v, boot = torch.randn(3, 100), torch.randn(3, 100), torch.randn(3)
    m = _mask("holes", 3, 100, "cpu")
    adv, ret = gae_fwd(r, v, m, None, boot, 0.95, 0.9, block=16)
    adv64, ret64 = naive.gae(r.double(), v.double(), m, None, 0.95, 0.9, boot.double())
    assert_close_to_ref(adv, adv64, atol=2e-5, name="triton advantages")
    assert_close_to_ref(ret, ret64, atol=2e-5, name="triton returns")
    cu = _offsets([40, 0, 17, 33], "cpu")
    x = torch.randn(90)
    (g, none) = gae_fwd(x, None, None, cu, None, 0.9, 1.0, block=16)
    assert none is None
    assert_close_to_ref(g, naive.discounted_returns(x.double(), None, cu, 0.9), atol=2e-5, name="triton returns")


@pytest.mark.parametrize("impl", ["cpp", pytest.param("cuda", marks=pytest.mark.gpu),
                                  pytest.param("triton", marks=pytest.mark.gpu)])
def test_long_sequences(impl, impl_on):
    device = "cpu" if impl == "cpp" else "cuda"
    impl_on(impl, device)
    r, v = torch.randn(9, 8192, device=device), torch.randn(9, 8192, device=device)
    _check(impl, r, v, mask=_mask("right", 9, 8192, device), bootstrap=torch.randn(9, device=device),
           gamma=0.999, lam=0.98)
    lengths = [8192, 1, 5000, 0, 3000]
    x, y = torch.randn(sum(lengths), device=device), torch.randn(sum(lengths), device=device)
    _check(impl, x, y, cu=_offsets(lengths, device), gamma=1.0, lam=0.99)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_derived_values(impl, impl_on):
    impl, device = _dev(impl)
    impl_on(impl, device)
    r = torch.tensor([[1.0, 2.0, 3.0]], device=device)
    v = torch.tensor([[0.5, 1.0, 1.5]], device=device)
    # delta_2 = 3 - 1.5 = 1.5; delta_1 = 2 + .9 * 1.5 - 1 = 2.35, A_1 = 2.35 + .45 * 1.5 = 3.025;
    # delta_0 = 1 + .9 - .5 = 1.4, A_0 = 1.4 + .45 * 3.025 = 2.76125.
    adv, ret = gae(r, v, gamma=0.9, lam=0.5, impl=impl)
    torch.testing.assert_close(adv.cpu(), torch.tensor([[2.76125, 3.025, 1.5]]))
    torch.testing.assert_close(ret.cpu(), torch.tensor([[3.26125, 4.025, 3.0]]))
    # A hole at t=1: t=0 sees V_2 and A_2: delta_0 = 1 + .9 * 1.5 - .5 = 1.85, A_0 = 1.85 + .45 * 1.5 = 2.525.
    adv, ret = gae(r, v, mask=torch.tensor([[1, 0, 1]], device=device), gamma=0.9, lam=0.5, impl=impl)
    torch.testing.assert_close(adv.cpu(), torch.tensor([[2.525, 0.0, 1.5]]))
    torch.testing.assert_close(ret.cpu(), torch.tensor([[3.025, 0.0, 3.0]]))
    # Bootstrap 2 (truncated): delta_2 = 3 + 1.8 - 1.5 = 3.3, A_1 = 2.35 + .45 * 3.3, A_0 = 1.4 + .45 * A_1.
    adv, _ = gae(r, v, gamma=0.9, lam=0.5, bootstrap=torch.tensor([2.0], device=device), impl=impl)
    torch.testing.assert_close(adv.cpu(), torch.tensor([[1.4 + 0.45 * 3.835, 3.835, 3.3]]))
    g = discounted_returns(r, gamma=0.5, bootstrap=torch.tensor([4.0], device=device), impl=impl)
    torch.testing.assert_close(g.cpu(), torch.tensor([[1 + 0.5 * 4.5, 2 + 0.5 * 5, 3 + 0.5 * 4]]))


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_agrees_with_trl_and_verl_loops(impl, impl_on):
    impl_on(impl, "cpu")
    B, T = 4, 50
    m = _mask("right", B, T, "cpu")
    r, v = torch.randn(B, T).double() * m, torch.randn(B, T).double() * m
    adv, ret = gae(r.float(), v.float(), mask=m, gamma=0.99, lam=0.95, impl=impl)
    trl_adv, trl_ret = naive.trl_style_gae(r, v, 0.99, 0.95)
    assert_close_to_ref(adv, torch.where(m, trl_adv, 0.0), atol=1e-5, name="vs TRL loop")
    assert_close_to_ref(ret, torch.where(m, trl_ret, 0.0), atol=1e-5, name="vs TRL loop")
    m = _mask("holes", B, T, "cpu")
    r, v = torch.randn(B, T).double(), torch.randn(B, T).double()
    adv, ret = gae(r.float(), v.float(), mask=m, gamma=0.99, lam=0.95, impl=impl)
    verl_adv, verl_ret = naive.verl_style_gae(r, v, m, 0.99, 0.95)
    assert_close_to_ref(adv, torch.where(m, verl_adv, 0.0), atol=1e-5, name="vs verl loop")
    assert_close_to_ref(ret, torch.where(m, verl_ret, 0.0), atol=1e-5, name="vs verl loop")


@pytest.mark.parametrize("impl", IMPLS)
def test_discounted_returns_is_gae_with_lam_1_and_zero_values(impl, impl_on):
    impl, device = _dev(impl)
    impl_on(impl, device)
    r, m, boot = torch.randn(3, 20, device=device), _mask("holes", 3, 20, device), torch.randn(3, device=device)
    g = discounted_returns(r, mask=m, gamma=0.9, bootstrap=boot, impl=impl)
    adv, ret = gae(r, torch.zeros_like(r), mask=m, gamma=0.9, lam=1.0, bootstrap=boot, impl=impl)
    torch.testing.assert_close(g, adv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, ret, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_reward_propagates_to_earlier_valid_tokens_of_its_sequence_only(impl, impl_on):
    impl, device = _dev(impl)
    impl_on(impl, device)
    r, v = torch.randn(3, 12, device=device), torch.randn(3, 12, device=device)
    m = torch.ones(3, 12, dtype=torch.bool, device=device)
    m[1, 9] = False
    r[1, 6] = math.nan
    r[1, 9] = math.nan  # masked: ignored
    adv, ret = gae(r, v, mask=m, gamma=0.9, lam=0.9, impl=impl)
    g = discounted_returns(r, mask=m, gamma=0.9, impl=impl)
    for out in (adv, ret, g):
        out = out.cpu()
        assert out[1, :7].isnan().all()
        assert torch.isfinite(out[1, 7:]).all() and out[1, 9] == 0
        assert torch.isfinite(out[[0, 2]]).all()
    ref = naive.gae(r.cpu().double(), v.cpu().double(), m.cpu(), None, 0.9, 0.9)[0]
    assert_close_to_ref(adv, ref, atol=1e-5, name="advantages with NaN")


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_mask_dtypes_are_equivalent(impl, impl_on):
    impl_on(impl, "cpu")
    r, v, m = torch.randn(2, 9), torch.randn(2, 9), _mask("holes", 2, 9, "cpu")
    expected = gae(r, v, mask=m, impl=impl)
    for mm in (m.float(), m.long(), m.to(torch.uint8)):
        for a, b in zip(gae(r, v, mask=mm, impl=impl), expected):
            assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_non_contiguous_inputs_and_int64_offsets(impl, impl_on):
    impl_on(impl, "cpu")
    r, v = torch.randn(20, 3).T, torch.randn(20, 3).T  # [3, 20], transposed views
    m = (torch.rand(20, 3) > 0.3).T
    _check(impl, r, v, mask=m, bootstrap=torch.randn(6)[::2])
    x, y = torch.randn(40)[::2], torch.randn(40)[::2]
    _check(impl, x, y, cu=torch.tensor([0, 7, 7, 20], dtype=torch.int64))


def test_mixed_input_dtypes_are_promoted(impl_on):
    impl_on("cpp", "cpu")
    r, v = torch.randn(2, 9), torch.randn(2, 9)
    adv, ret = gae(r.bfloat16(), v, impl="cpp")
    ref = naive.gae(r.bfloat16().double(), v.double(), None, None, 1.0, 0.95)
    assert_close_to_ref(adv, ref[0], atol=1e-5)
    assert_close_to_ref(ret, ref[1], atol=1e-5)


def _args():
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    return dict(rewards=r, values=v)


@pytest.mark.parametrize("change, err, match", [
    (dict(gamma=1.5), ValueError, "gamma must be in \\[0, 1\\]; got 1.5"),
    (dict(lam=-0.1), ValueError, "lam must be in \\[0, 1\\]; got -0.1"),
    (dict(gamma=math.nan), ValueError, "gamma must be in"),
    (dict(lam="0.9"), TypeError, "lam must be a real number"),
    (dict(values=torch.randn(2, 4)), ValueError, "values must have the shape of rewards \\(2, 5\\); got \\(2, 4\\)"),
    (dict(values=torch.randn(2, 5).long()), TypeError, "values must have dtype"),
    (dict(rewards=torch.randn(2, 5, 1), values=torch.randn(2, 5, 1)), ValueError, "rewards must be \\[B, T\\]"),
    (dict(mask=torch.ones(2, 4)), ValueError, "mask must have the shape of rewards"),
    (dict(mask=torch.tensor([[1, 0, 2, 1, 1], [1] * 5])), ValueError, "mask must hold only 0 and 1; got 2"),
    (dict(mask=torch.full((2, 5), 0.5)), ValueError, "mask must hold only 0 and 1; got 0.5"),
    (dict(bootstrap=torch.zeros(3)), ValueError, "bootstrap must have one value per sequence \\(2\\)"),
    (dict(bootstrap=torch.zeros(2, 1)), ValueError, "bootstrap must be 1-D"),
    (dict(rewards=torch.randn(10), values=torch.randn(10), cu_seqlens=torch.tensor([0, 4, 9])), ValueError,
     "must end at the number of tokens \\(10\\); got 9"),
    (dict(rewards=torch.randn(10), values=torch.randn(10), cu_seqlens=torch.tensor([1, 4, 10])), ValueError,
     "must start at 0"),
    (dict(rewards=torch.randn(10), values=torch.randn(10), cu_seqlens=torch.tensor([0, 6, 4, 10])), ValueError,
     "non-decreasing"),
    (dict(rewards=torch.randn(10), values=torch.randn(10), cu_seqlens=torch.tensor([0, 10.0])), TypeError,
     "cu_seqlens must have dtype"),
    (dict(rewards=torch.randn(10), values=torch.randn(10), cu_seqlens=torch.tensor([0, 10]),
          mask=torch.ones(10)), ValueError, "mask must be None with cu_seqlens"),
    (dict(values=None), TypeError, "values must be a torch.Tensor"),
    (dict(impl="fast"), ValueError, "impl must be one of"),
])
def test_bad_arguments_raise_clear_errors(change, err, match):
    with pytest.raises(err, match=match):
        gae(**{**_args(), **change})


@pytest.mark.parametrize("call, match", [
    (lambda r, v, m, cu, b: (r, v, m, cu, b, 1.5, 0.9), "gamma must be in"),
    (lambda r, v, m, cu, b: (r, v, m, cu, b, 0.9, 2.0), "lam must be in"),
    (lambda r, v, m, cu, b: (r, v[:, :3], m, cu, b, 0.9, 0.9), "values must have the shape"),
    (lambda r, v, m, cu, b: (r, v.double(), m, cu, b, 0.9, 0.9), "values must have the dtype"),
    (lambda r, v, m, cu, b: (r, v, m.to(torch.complex64), cu, b, 0.9, 0.9), "mask must be bool, uint8"),
    (lambda r, v, m, cu, b: (r, v, m.float() * 2, cu, b, 0.9, 0.9), "mask must hold only 0 and 1; got 2"),
    (lambda r, v, m, cu, b: (r, v, m[:1], cu, b, 0.9, 0.9), "mask must have the shape"),
    (lambda r, v, m, cu, b: (r, v, m, cu, b[:1], 0.9, 0.9), "bootstrap must have one value"),
    (lambda r, v, m, cu, b: (r[0], v[0], None, torch.tensor([0, 3, 2, 5]), None, 0.9, 0.9), "non-decreasing"),
    (lambda r, v, m, cu, b: (r[0], v[0], None, torch.tensor([0, 3, 4]), None, 0.9, 0.9), "must end at"),
    (lambda r, v, m, cu, b: (r[0], v[0], None, torch.tensor([2, 3, 5]), None, 0.9, 0.9), "must start at 0"),
    (lambda r, v, m, cu, b: (r[0], v[0], m, torch.tensor([0, 5]), None, 0.9, 0.9), "mask must be None"),
    (lambda r, v, m, cu, b: (r[0], v[0], None, None, None, 0.9, 0.9), "rewards must be 2-D"),
])
def test_compiled_op_checks_its_arguments(call, match, impl_on):
    # Straight into the C++ op, bypassing Python validation: it must raise, never crash.
    impl_on("cpp", "cpu")
    r, v, m, b = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool), torch.randn(2)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.fastalign.gae(*call(r, v, m, None, b))


def test_compiled_ops_are_traceable(impl_on):
    impl_on("cpp", "cpu")
    r, v, m, b = torch.randn(2, 6), torch.randn(2, 6), torch.rand(2, 6) > 0.3, torch.randn(2)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    for args in [(r, v, m, None, b, 0.9, 0.8), (r.reshape(-1), v.reshape(-1), None, cu, None, 1.0, 0.95)]:
        torch.library.opcheck(torch.ops.fastalign.gae.default, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastalign.discounted_returns.default, (r, m, None, b, 0.9),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_path_needs_no_host_sync(impl, impl_on):
    impl_on(impl, "cuda")
    r, v = torch.randn(8, 300, device="cuda"), torch.randn(8, 300, device="cuda")
    m, cu = _mask("holes", 8, 300, "cuda"), _offsets([100, 0, 200], "cuda")
    gae(r, v, mask=m, impl=impl)  # warm-up (compilation, allocator)
    torch.cuda.set_sync_debug_mode("error")
    try:
        gae(r, v, mask=m, gamma=0.9, lam=0.9, impl=impl)
        gae(r[:2].reshape(-1)[:300], v[:2].reshape(-1)[:300], cu_seqlens=cu, impl=impl)
        discounted_returns(r, mask=m, gamma=0.9, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_property_random_layouts_and_coefficients(impl, impl_on):
    """Hypothesis over shapes, masks, packing, coefficients and bootstrap (small: Triton runs interpreted)."""
    impl_on(impl, "cpu")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=25 if impl == "cpp" else 8, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(B=st.integers(1, 4), T=st.integers(1, 40), packed=st.booleans(), boot=st.booleans(),
           gamma=st.floats(0, 1), lam=st.floats(0, 1), seed=st.integers(0, 2**16))
    def check(B, T, packed, boot, gamma, lam, seed):
        g = torch.Generator().manual_seed(seed)
        bootstrap = torch.randn(B, generator=g) if boot else None
        if packed:
            lengths = torch.randint(0, T + 1, (B,), generator=g).tolist()
            N = sum(lengths)
            r, v = torch.randn(N, generator=g), torch.randn(N, generator=g)
            _check(impl, r, v, cu=_offsets(lengths, "cpu"), bootstrap=bootstrap, gamma=gamma, lam=lam)
        else:
            r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
            m = torch.rand(B, T, generator=g) > 0.3
            _check(impl, r, v, mask=m, bootstrap=bootstrap, gamma=gamma, lam=lam)

    check()


def test_cpp_lockstep_rows_and_single_rows_agree(impl_on):
    """The padded cpp path walks 8 rows in lockstep and the rest one by one: both give the same bits."""
    impl_on("cpp", "cpu")
    r, v, m, boot = torch.randn(19, 33), torch.randn(19, 33), _mask("holes", 19, 33, "cpu"), torch.randn(19)
    adv, ret = gae(r, v, mask=m, bootstrap=boot, gamma=0.9, lam=0.8, impl="cpp")
    for b in (0, 9, 18):  # in a lockstep group, in another, and a leftover row
        a1, r1 = gae(r[b:b + 1], v[b:b + 1], mask=m[b:b + 1], bootstrap=boot[b:b + 1], gamma=0.9, lam=0.8, impl="cpp")
        assert torch.equal(a1[0], adv[b]) and torch.equal(r1[0], ret[b])
    g = discounted_returns(r, mask=m, bootstrap=boot, gamma=0.9, impl="cpp")
    assert torch.equal(discounted_returns(r[18:], mask=m[18:], bootstrap=boot[18:], gamma=0.9, impl="cpp")[0], g[18])
    assert torch.equal(discounted_returns(r[:8], mask=m[:8], bootstrap=boot[:8], gamma=0.9, impl="cpp")[3], g[3])


def test_triton_custom_ops_pass_opcheck(impl_on):
    impl_on("triton", "cpu")
    from fastalign.ops.gae import triton  # noqa: F401  (registers the ops)

    r, v, m, b = torch.randn(2, 6), torch.randn(2, 6), torch.rand(2, 6) > 0.3, torch.randn(2)
    cu, checks = torch.tensor([0, 5, 12], dtype=torch.int32), ("test_schema", "test_faketensor")
    for args in [(r, v, m, None, b, 0.9, 0.8), (r.reshape(-1), v.reshape(-1), None, cu, None, 1.0, 0.95)]:
        torch.library.opcheck(torch.ops.fastalign.gae_triton.default, args, test_utils=checks)
    for args in [(r, m, None, b, 0.9), (r.reshape(-1), None, cu.long(), None, 0.7)]:
        torch.library.opcheck(torch.ops.fastalign.discounted_returns_triton.default, args, test_utils=checks)


@pytest.mark.parametrize("cu, match", [([0, 7, 5, 12], "non-decreasing"), ([1, 5, 12], "must start at 0"),
                                       ([0, 5, 11], "must end at")])
def test_triton_custom_ops_check_offsets(cu, match, impl_on):
    impl_on("triton", "cpu")
    from fastalign.ops.gae import triton  # noqa: F401  (registers the ops)

    r, cu = torch.randn(12), torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        torch.ops.fastalign.gae_triton(r, r, None, cu, None, 0.9, 0.9)
    with pytest.raises(ValueError, match=match):
        torch.ops.fastalign.discounted_returns_triton(r, None, cu, None, 0.9)


def _gae_and_returns(r, v, m, cu, b, impl):
    adv, ret = gae(r, v, mask=m, cu_seqlens=cu, bootstrap=b, gamma=0.9, lam=0.8, impl=impl)
    return adv, ret, discounted_returns(r, mask=m, cu_seqlens=cu, bootstrap=b, gamma=0.9, impl=impl)


@pytest.mark.parametrize("impl", ["triton", "cpp"])
@pytest.mark.parametrize("packed", [False, True])
def test_traceable_by_torch_compile(impl, packed, impl_on):
    """fullgraph: the triton and cpp impls are one custom op per call, so nothing breaks the graph."""
    impl_on(impl, "cpu")
    r, v, b = torch.randn(3, 7), torch.randn(3, 7), torch.randn(3)
    m = torch.rand(3, 7) > 0.3
    args = (r.reshape(-1), v.reshape(-1), None, _offsets([9, 0, 12], "cpu"), b) if packed else (r, v, m, None, b)
    fn = lambda r, v, m, cu, b: _gae_and_returns(r, v, m, cu, b, impl)
    eager = fn(*args)  # (the first call imports the impl's module, outside any trace)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*args), eager):
        assert torch.equal(got, want)
    if packed:  # offsets are still checked inside the compiled graph (by the op)
        with pytest.raises(ValueError, match="non-decreasing"):
            compiled(args[0], args[1], None, _offsets([9, -3, 15], "cpu"), b)


def test_cuda_impl_never_runs_the_cpu_kernel(monkeypatch):
    """impl="cuda" raises when unavailable (here: CPU tensors), and its launcher refuses CPU tensors rather than let
    the dispatcher run the CPU kernel of the shared op in its name."""
    from fastalign import ImplUnavailableError
    from fastalign.ops.gae import api

    r, v = torch.randn(2, 5), torch.randn(2, 5)
    for call in (lambda: gae(r, v, impl="cuda"), lambda: discounted_returns(r, impl="cuda")):
        with pytest.raises(ImplUnavailableError, match="impl='cuda' is unavailable"):
            call()
    monkeypatch.setattr(api, "resolve_impl", lambda impl, device, op, impls: impl)
    for call in (lambda: gae(r, v, impl="cuda"), lambda: discounted_returns(r, impl="cuda")):
        with pytest.raises(ValueError, match="the cuda impl of gae takes CUDA tensors; got rewards on cpu"):
            call()
