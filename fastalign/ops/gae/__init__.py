from fastalign.ops.gae.api import discounted_returns, gae

__all__ = ["discounted_returns", "gae"]
