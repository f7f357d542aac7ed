"""``python -m fastalign.env`` / ``fastalign env``: versions, and which implementations run here and why not."""

from __future__ import annotations

import platform
import sys

import torch

from fastalign import _backend, _ext
from fastalign._version import __version__


def report() -> str:
    lines = [f"fastalign {__version__}", f"python {platform.python_version()} ({sys.platform}, {platform.machine()})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    version, why = _backend._triton_import()
    lines.append(f"triton {version}" if version else f"triton: unavailable ({why})")
    lines.append(f"TRITON_INTERPRET={'1' if _backend.triton_interpret() else '0'}")
    ext, why = _ext.load()
    lines.append(f"fastalign._C: built, {'with' if ext.WITH_CUDA else 'without'} CUDA" if ext else
                 f"fastalign._C: unavailable ({why})")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    else:
        lines.append("GPU: none visible to torch")
    for device in devices:
        lines.append(f"implementations on {device} (auto -> {_backend.resolve_impl('auto', device, op='env')}):")
        for impl in _backend.IMPLS:
            ok, reason = _backend.availability(impl, device)
            lines.append(f"  {impl:<7} {'yes' if ok else 'no: ' + reason}")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
