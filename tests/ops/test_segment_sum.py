import pytest
import torch

from fastalign import segment_sum
from fastalign.ops.segment_sum import naive
from fastalign.testing import assert_close_to_ref

IMPLS = ["torch", "cpp", pytest.param("cuda", marks=pytest.mark.gpu)]


def _offsets(lengths, device):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("lengths", [[1], [3, 0, 700, 5], [0], [1000]])
def test_matches_reference_values_and_grads(impl, dtype, lengths, impl_on):
    device = "cuda" if impl == "cuda" else "cpu"
    impl_on(impl, device)
    cu = _offsets(lengths, device)
    x = torch.randn(sum(lengths), dtype=dtype, device=device, requires_grad=True)
    out = segment_sum(x, cu, impl=impl)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref64 = torch.stack([x.detach().double()[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
    # The op accumulates in float64 whatever the input: only the final rounding to float32 differs.
    assert_close_to_ref(out, ref64, atol=1e-6 * (1 + ref64.abs().max().item()), name=f"{impl} segment_sum")
    g = torch.randn_like(out)
    (out * g).sum().backward()
    expected = torch.repeat_interleave(g, torch.tensor(lengths, device=device)).to(dtype)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_cpp_and_naive_agree_bitwise(impl_on):
    impl_on("cpp", "cpu")
    x = torch.randn(5000)
    cu = _offsets([100, 2000, 0, 2900], "cpu")
    assert torch.equal(segment_sum(x, cu, impl="cpp"), naive.segment_sum(x, cu))


@pytest.mark.parametrize("bad, match", [
    (lambda x, cu: (x, cu[1:]), "must start at 0"),
    (lambda x, cu: (x, cu[:-1]), "must end at the number"),
    (lambda x, cu: (x, torch.tensor([0, 5, 3, 10], dtype=torch.int32)), "non-decreasing"),
    (lambda x, cu: (x[None], cu), "values must be 1-D"),
    (lambda x, cu: (x, cu.float()), "cu_seqlens must"),
    (lambda x, cu: (x.long(), cu), "values must"),
    (lambda x, cu: (x, cu[:0]), "at least one offset"),
])
@pytest.mark.parametrize("entry", ["public", "compiled"])
def test_bad_arguments_raise_clear_errors(bad, match, entry, impl_on):
    x = torch.randn(10)
    cu = _offsets([4, 6], "cpu")
    args = bad(x, cu)
    if entry == "public":
        with pytest.raises((ValueError, TypeError), match=match):
            segment_sum(*args, impl="torch")
    else:
        # Straight into the C++ op, bypassing Python validation: its own checks must raise, not crash.
        impl_on("cpp", "cpu")
        with pytest.raises((ValueError, TypeError), match=match):
            torch.ops.fastalign.segment_sum(*args)


def test_compiled_op_is_traceable_by_torch_compile(impl_on):
    impl_on("cpp", "cpu")
    from fastalign.ops.segment_sum.cpu import segment_sum_fwd

    x, cu = torch.randn(12), _offsets([5, 7], "cpu")
    torch.library.opcheck(torch.ops.fastalign.segment_sum.default, (x, cu),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda v, c: segment_sum_fwd(v, c) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, cu), naive.segment_sum(x, cu) * 2)


def test_outputs_are_poisoned_under_test():
    from fastalign._utils import new_output

    assert new_output((3,), dtype=torch.float32, device="cpu").isnan().all()


def test_cuda_impl_never_runs_the_cpu_kernel(monkeypatch):
    """impl="cuda" raises when unavailable (here: CPU tensors), and its launcher refuses CPU tensors rather than let
    the dispatcher run the CPU kernel of the shared op in its name."""
    from fastalign import ImplUnavailableError
    from fastalign.ops.segment_sum import api

    x, cu = torch.randn(5), _offsets([2, 3], "cpu")
    with pytest.raises(ImplUnavailableError, match="segment_sum: impl='cuda' is unavailable"):
        segment_sum(x, cu, impl="cuda")
    monkeypatch.setattr(api, "resolve_impl", lambda impl, device, op, impls: impl)
    with pytest.raises(ValueError, match="the cuda impl of segment_sum takes CUDA tensors; got values on cpu"):
        segment_sum(x, cu, impl="cuda")


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_cu_seqlens_as_a_list_of_ints_works_and_anything_else_is_a_clear_error(impl, impl_on):
    impl_on(impl, "cpu")
    x = torch.randn(10)
    want = segment_sum(x, torch.tensor([0, 4, 10]), impl=impl)
    assert torch.equal(segment_sum(x, [0, 4, 10], impl=impl), want)
    assert torch.equal(segment_sum(x, (0, 4, 10), impl=impl), want)
    with pytest.raises(TypeError, match=r"cu_seqlens given as a list must hold ints; got \[0, 4.0, 10\]"):
        segment_sum(x, [0, 4.0, 10], impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of tokens"):
        segment_sum(x, [0, 4, 9], impl=impl)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor; got str"):
        segment_sum(x, "0,4,10", impl=impl)
