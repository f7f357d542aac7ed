"""Builds the compiled extension ``fastalign._C`` and nothing else (metadata lives in pyproject.toml).

Every ``csrc/**/*.cpp`` is always compiled. Every ``kernels/*.cu`` is added, with ``-DWITH_CUDA``, when
the installed torch was built with CUDA and nvcc is found; otherwise the CPU extension is built and
one line says why CUDA was skipped. Set ``FASTALIGN_NO_CUDA=1`` to force the CPU-only build.
"""

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_skip_reason():
    if os.environ.get("FASTALIGN_NO_CUDA", "0") == "1":
        return "FASTALIGN_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return "nvcc was not found (set CUDA_HOME)"
    return None


def _extension():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)
    cpp = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    cu = rel(glob.glob(os.path.join(ROOT, "kernels", "*.cu")))
    cxx = ["-O3", "-std=c++17"]
    if os.name != "nt":
        cxx += ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
    reason = _cuda_skip_reason()
    if reason is None:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        print(f"fastalign: building with CUDA {torch.version.cuda} ({len(cu)} kernel files, archs {archs})")
        return CUDAExtension(
            "fastalign._C",
            cpp + cu,
            include_dirs=include_dirs,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"] if os.name != "nt" else [],
        )
    print(f"fastalign: building the CPU-only extension; CUDA skipped: {reason}")
    return CppExtension(
        "fastalign._C",
        cpp,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"] if os.name != "nt" else [],
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
