"""Loads the compiled extension ``fastalign._C`` once, remembering why it is missing if it is."""

from __future__ import annotations

import functools


@functools.cache
def load():
    """Return ``(module, None)`` when ``fastalign._C`` imports, else ``(None, reason)``. Never raises."""
    try:
        from fastalign import _C  # noqa: F401  (importing registers the torch.library ops)
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        return None, f"fastalign._C is not built or does not load ({type(e).__name__}: {e}); " \
            "build it with `pip install --no-build-isolation -e .`"
    return _C, None


def get():
    """Return the extension module or None."""
    return load()[0]
