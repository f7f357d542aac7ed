"""gae and discounted_returns launchers of the ``cpp`` impl: fastalign._C's CPU kernels (``csrc/cpu/gae.cpp``),
the torch.library ops ``fastalign::gae`` and ``fastalign::discounted_returns``, whose fake impls are registered here.

The ``cuda`` impl (``cuda.py``) calls the same ops on CUDA tensors: the dispatcher picks the kernel by the tensors'
device.
"""

import torch

from fastalign import _ext

if _ext.get() is not None:

    @torch.library.register_fake("fastalign::gae")
    def _gae_fake(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam):
        return rewards.new_empty(rewards.shape, dtype=torch.float32), rewards.new_empty(rewards.shape,
                                                                                        dtype=torch.float32)

    @torch.library.register_fake("fastalign::discounted_returns")
    def _discounted_returns_fake(rewards, mask, cu_seqlens, bootstrap, gamma):
        return rewards.new_empty(rewards.shape, dtype=torch.float32)


def gae_fwd(rewards, values, mask, cu_seqlens, bootstrap, gamma: float, lam: float):
    """Same contract as ``triton.gae_fwd``: ``(advantages, returns)``, ``returns`` None when ``values`` is None."""
    if values is None:
        return torch.ops.fastalign.discounted_returns(rewards, mask, cu_seqlens, bootstrap, gamma), None
    return torch.ops.fastalign.gae(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam)
