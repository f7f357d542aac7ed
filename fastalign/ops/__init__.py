"""Kernel ops: one folder per op with ``naive.py`` (the reference), and ``triton.py``/``cpu.py``/``cuda.py``
implementations behind ``api.py`` (validation, autograd, dispatch)."""
