"""gae / discounted_returns take the mask in any dtype a user has (bool, integer, floating; a Hugging Face
``attention_mask`` is int64) and read it as it comes: same outputs bitwise, a value other than 0/1 raises on CPU
tensors (the cpp kernel checks in its own pass), and ``cu_seqlens`` may be a list of ints."""

import math

import pytest
import torch

from fastalign import discounted_returns, gae
from fastalign.ops.gae import api

MASK_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
               torch.float32, torch.float64]
IMPLS = ["torch", "cpp", "triton"] + [pytest.param(i, marks=pytest.mark.gpu) for i in ("cuda", "triton@cuda")]


def _dev(impl):
    if impl == "triton@cuda":
        return "triton", "cuda"
    return impl, "cuda" if impl == "cuda" else "cpu"


def _inputs(B, T, device, seed):
    g = torch.Generator().manual_seed(seed)
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.3
    m[0] = True
    if B > 1:
        m[1] = False
    return r.to(device), v.to(device), m.to(device), torch.randn(B, generator=g).to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("B, T", [(3, 17), (19, 33)])  # 19 rows: two lockstep groups of 8 and 3 single rows (cpp)
def test_every_mask_dtype_gives_bitwise_the_bool_result(impl, dtype, B, T, impl_on):
    impl, device = _dev(impl)
    impl_on(impl, device)
    if impl == "triton" and device == "cpu" and B > 8:
        pytest.skip("interpreted Triton: the small shape is enough (the large one is for cpp's lockstep rows)")
    r, v, m, boot = _inputs(B, T, device, seed=B * T)
    expected = gae(r, v, mask=m, bootstrap=boot, gamma=0.9, lam=0.8, impl=impl)
    got = gae(r, v, mask=m.to(dtype), bootstrap=boot, gamma=0.9, lam=0.8, impl=impl)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    g = discounted_returns(r, mask=m.to(dtype), bootstrap=boot, gamma=0.9, impl=impl)
    assert torch.equal(g, discounted_returns(r, mask=m, bootstrap=boot, gamma=0.9, impl=impl))


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_mask_reaches_the_kernel_in_its_own_dtype(impl, impl_on):
    """No conversion pass before the kernel: the compiled impls get the user's mask as it is."""
    impl_on(impl, "cpu")
    r, v, m, _ = _inputs(2, 9, "cpu", seed=0)
    for dtype in (torch.int64, torch.float32):
        out = api._prepare(r, v, m.to(dtype), None, None, 1.0, 0.95, impl, "gae")
        assert out[2].dtype == dtype


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
def test_negative_zero_is_zero(impl, dtype, impl_on):
    impl_on(impl, "cpu")
    if not dtype.is_floating_point:
        pytest.skip("-0.0 exists in floating dtypes only")
    r, v, m, _ = _inputs(3, 11, "cpu", seed=1)
    mm = m.to(dtype)
    mm[~m] = -0.0
    assert torch.signbit(mm[~m]).all()
    for a, b in zip(gae(r, v, mask=mm, impl=impl), gae(r, v, mask=m, impl=impl)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("row", [3, 17])  # a lockstep row and a single row of the cpp kernel (B=19)
def test_values_other_than_0_1_raise_with_their_position(impl, dtype, row, impl_on):
    impl_on(impl, "cpu")
    if impl != "cpp" and row != 3:
        pytest.skip("the row matters to the cpp kernel only (lockstep rows vs single rows)")
    r, v, m, _ = _inputs(19, 12, "cpu", seed=2)
    bads = [2, -1] + ([0.5, math.nan, -1.0] if dtype.is_floating_point else [])
    if dtype == torch.uint8:
        bads = [2, 255]
    for bad in bads:
        mm = m.to(dtype)
        mm[row, 5] = bad
        shown = "nan" if isinstance(bad, float) and math.isnan(bad) else f"{bad:g}"
        with pytest.raises(ValueError, match=rf"mask must hold only 0 and 1; got {shown}.* at index \({row}, 5\)"):
            gae(r, v, mask=mm, impl=impl)
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            discounted_returns(r, mask=mm, impl=impl)


def test_bad_value_at_a_masked_row_is_found_first_in_row_major_order(impl_on):
    impl_on("cpp", "cpu")
    r, v, m, _ = _inputs(19, 12, "cpu", seed=3)
    mm = m.long()
    mm[11, 2], mm[4, 9] = 3, 7
    with pytest.raises(ValueError, match=r"got 7 at index \(4, 9\)"):
        gae(r, v, mask=mm, impl="cpp")


@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
def test_compiled_op_reads_every_mask_dtype(dtype, impl_on):
    """Straight into the C++ op (no Python conversion in between)."""
    impl_on("cpp", "cpu")
    r, v, m, boot = _inputs(9, 20, "cpu", seed=4)
    expected = torch.ops.fastalign.gae(r, v, m, None, boot, 0.9, 0.8)
    for a, b in zip(torch.ops.fastalign.gae(r, v, m.to(dtype), None, boot, 0.9, 0.8), expected):
        assert torch.equal(a, b)
    g = torch.ops.fastalign.discounted_returns(r, m.to(dtype), None, boot, 0.9)
    assert torch.equal(g, torch.ops.fastalign.discounted_returns(r, m, None, boot, 0.9))


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_non_contiguous_int64_mask(impl, impl_on):
    impl_on(impl, "cpu")
    r, v, m, _ = _inputs(5, 14, "cpu", seed=5)
    mt = m.long().T.contiguous().T  # same values, column-major
    assert not mt.is_contiguous()
    for a, b in zip(gae(r, v, mask=mt, impl=impl), gae(r, v, mask=m, impl=impl)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("container", [list, tuple])
def test_cu_seqlens_as_a_list_of_ints(impl, container, impl_on):
    impl_on(impl, "cpu")
    r, v = torch.randn(12), torch.randn(12)
    offsets = [0, 5, 5, 12]
    expected = gae(r, v, cu_seqlens=torch.tensor(offsets), gamma=0.9, lam=0.8, impl=impl)
    for a, b in zip(gae(r, v, cu_seqlens=container(offsets), gamma=0.9, lam=0.8, impl=impl), expected):
        assert torch.equal(a, b)
    g = discounted_returns(r, cu_seqlens=container(offsets), gamma=0.9, impl=impl)
    assert torch.equal(g, discounted_returns(r, cu_seqlens=torch.tensor(offsets), gamma=0.9, impl=impl))


@pytest.mark.parametrize("offsets, err, match", [
    ([0, 5.0, 12], TypeError, r"cu_seqlens given as a list must hold ints; got float 5.0 at position 1"),
    ([0, True, 12], TypeError, r"must hold ints; got bool True at position 1"),
    ([0, 5, 11], ValueError, r"cu_seqlens must end at the number of tokens \(12\); got 11"),
    ([], ValueError, r"cu_seqlens must hold at least one offset"),
])
def test_bad_cu_seqlens_lists_raise_clear_errors(offsets, err, match):
    with pytest.raises(err, match=match):
        gae(torch.randn(12), torch.randn(12), cu_seqlens=offsets)
