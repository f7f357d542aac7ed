"""The cuda impl of gae is the same torch.library op as the cpp one (``kernels/gae.cu``)."""

from fastalign.ops.gae.cpu import gae_fwd

__all__ = ["gae_fwd"]
