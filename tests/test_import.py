import subprocess
import sys

import pytest

import fastalign


@pytest.mark.parametrize("name", fastalign.__all__)
def test_every_export_imports(name):
    assert getattr(fastalign, name) is not None


def test_import_never_touches_cuda_or_triton():
    code = ("import sys, fastalign, torch; "
            "assert 'triton' not in sys.modules, 'triton imported at import time'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialized at import time'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_env_report_runs():
    out = subprocess.run([sys.executable, "-m", "fastalign.env"], check=True, capture_output=True, text=True).stdout
    assert "fastalign " + fastalign.__version__ in out
    assert "implementations on cpu" in out
