import pytest
import torch

from fastalign import ImplUnavailableError, _backend, _ext, resolve_impl


def test_unknown_impl_raises_with_choices():
    with pytest.raises(ValueError, match=r"impl must be one of .*got 'fast'"):
        resolve_impl("fast", "cpu", op="x")


def test_impl_the_op_lacks_raises():
    with pytest.raises(ValueError, match=r"does not exist for this op"):
        resolve_impl("triton", "cpu", op="x", impls=("torch", "cpp"))


def test_auto_on_cpu_prefers_cpp_when_built():
    expected = "cpp" if _ext.get() is not None else "torch"
    assert resolve_impl("auto", "cpu", op="x") == expected
    assert resolve_impl("auto", "cpu", op="x", impls=("torch",)) == "torch"


def test_cuda_impl_on_cpu_tensor_raises_with_reason():
    with pytest.raises(ImplUnavailableError, match=r"impl='cuda' is unavailable: "):
        resolve_impl("cuda", "cpu", op="x")


def test_triton_needs_interpreter_on_cpu(monkeypatch):
    if _backend._triton_import()[0] is None:
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ImplUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", torch.device("cpu"), op="x")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", "cpu", op="x") == "triton"


def test_cpp_on_cuda_device_raises():
    with pytest.raises(ImplUnavailableError):
        resolve_impl("cpp", "cuda", op="x")
