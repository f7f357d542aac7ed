"""gae and discounted_returns launchers of the ``cuda`` impl: fastalign._C's CUDA kernels (``kernels/gae.cu``, one
block per sequence, a block-wide reverse scan of affine maps; host side in ``csrc/cuda/gae.cpp``).

They are the CUDA-key implementations of the torch.library ops ``fastalign::gae`` and
``fastalign::discounted_returns``, whose CPU key the cpp impl runs and whose fake impls ``cpu.py`` registers. The
dispatcher picks a kernel by the tensors' device, so this launcher checks the device itself: given CPU tensors it
raises rather than run the CPU kernel in the cuda impl's name. ``fastalign._backend.resolve_impl`` raises first
when the extension was built without CUDA.
"""

from __future__ import annotations

import torch

from fastalign.ops.gae import cpu


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor | None, mask, cu_seqlens, bootstrap, gamma: float,
            lam: float):
    """Same contract as ``triton.gae_fwd``: ``(advantages, returns)`` float32, ``returns`` None when ``values`` is
    None; the tensors on one CUDA device (the op checks that the others match ``rewards``)."""
    if rewards.device.type != "cuda":
        raise ValueError(f"the cuda impl of gae takes CUDA tensors; got rewards on {rewards.device} "
                         "(impl='cpp' runs on CPU tensors)")
    return cpu.gae_fwd(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam)
