"""Reward functions for rollouts (PPO, GRPO, iterative DPO): the embedded task's, user functions, and the checked call.

A reward function takes the prompts and the generated completions (the text after the prompt, EOS removed) and
returns one number per completion: ``fn(prompts: list[str], completions: list[str]) -> list[float]`` (a 1-D
tensor or array works too). ``load_reward_fn`` finds one from a config string, ``call_reward_fn`` calls it and
checks what comes back.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from fastalign.train.config import ConfigError

__all__ = ["RewardError", "addition_reward", "call_reward_fn", "load_reward_fn"]

_ADDITION = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*")


class RewardError(ValueError):
    """A reward function that raised, or returned something other than one finite number per completion."""


def _check_pair(prompts, completions) -> None:
    for name, xs in (("prompts", prompts), ("completions", completions)):
        if isinstance(xs, str) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"{name} must be a list of str; got {type(xs).__name__}")
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must have the same length; got {len(prompts)} and "
                         f"{len(completions)}")


def addition_reward(prompts: list[str], completions: list[str], *, partial_credit: float = 0.0) -> list[float]:
    """The embedded task's reward: 1.0 when the completion is the sum of the prompt's two operands.

    The prompt is ``"a+b="`` (e.g. ``"26+78="``, spaces around the parts allowed); the completion is compared
    after ``str.strip()`` with ``str(a + b)`` (so ``"104"`` and ``" 104\\n"`` are right, ``"0104"`` and
    ``"104 apples"`` are wrong). A wrong answer gets 0, or with ``partial_credit`` in [0, 1) some credit for the
    digits it has right: a completion of digits only and of the sum's length earns ``partial_credit`` times the
    fraction of digit positions that match. With ``partial_credit=0.3``, ``"105"`` for ``"26+78="`` earns
    ``0.3 * 2/3 = 0.2`` (0.1 per right digit of a 3-digit sum), ``"14"`` earns 0. A wrong answer therefore earns
    less than ``partial_credit``, always below the 1.0 of the right one.

    Raises:
        ValueError: a prompt that is not ``a+b=`` (naming it and its index), lists of different lengths, or a
            ``partial_credit`` outside [0, 1).

    Example:
        >>> addition_reward(["26+78=", "13+39=", "82+11="], ["104", "53", "x"])
        [1.0, 0.0, 0.0]
        >>> addition_reward(["26+78="], ["105"], partial_credit=0.3)
        [0.2]
    """
    _check_pair(prompts, completions)
    if isinstance(partial_credit, bool) or not isinstance(partial_credit, numbers.Real) or \
            not 0.0 <= partial_credit < 1.0:
        raise ValueError(f"partial_credit must be a number in [0, 1); got {partial_credit!r}")
    out = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        match = _ADDITION.fullmatch(prompt) if isinstance(prompt, str) else None
        if match is None:
            raise ValueError(f"addition_reward: prompt {i} must look like 'a+b=' (e.g. '26+78='); got {prompt!r}")
        if not isinstance(completion, str):
            raise TypeError(f"addition_reward: completion {i} must be a str; got {type(completion).__name__}")
        target, answer = str(int(match[1]) + int(match[2])), completion.strip()
        if answer == target:
            out.append(1.0)
        elif partial_credit and len(answer) == len(target) and answer.isascii() and answer.isdigit():
            right = sum(a == t for a, t in zip(answer, target))
            out.append(partial_credit * right / len(target))
        else:
            out.append(0.0)
    return out


def _load_file(path: Path, spec: str):
    if not path.is_file():
        raise ConfigError(f"reward function {spec!r}: no such file {str(path)!r}")
    # A stable module name per file, registered so that the module's own classes and pickling work.
    name = f"fastalign_reward_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"reward function {spec!r}: running {str(path)!r} raised {type(e).__name__}: {e}") from e
    return module


def load_reward_fn(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """The reward function named by a config string.

    - ``"embedded"``: :func:`addition_reward` (the embedded two-digit addition task).
    - ``"package.module:function"``: imported with ``importlib`` (the module must be importable).
    - ``"path/to/file.py:function"``: the file is run as a module (a spec whose left part ends in ``.py``).

    The function part may be dotted (``"mod:obj.method"``). Raises :class:`ConfigError` (a ValueError) for a bad
    spec, a missing module, file or attribute (listing what the module does define), or an object that is not
    callable.

    Example:
        >>> load_reward_fn("embedded")(["1+2="], ["3"])
        [1.0]
    """
    if not isinstance(spec, str):
        raise ConfigError(f"reward function must be a string ('embedded', 'module:function' or "
                          f"'path/file.py:function'); got {type(spec).__name__}")
    if spec.strip() == "embedded":
        return addition_reward
    where, sep, attr = spec.strip().rpartition(":")
    if not sep or not where or not attr:
        raise ConfigError(f"reward function must be 'embedded', 'module:function' or 'path/file.py:function'; "
                          f"got {spec!r}")
    if where.endswith(".py"):
        obj = _load_file(Path(where).expanduser(), spec)
    else:
        try:
            obj = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"reward function {spec!r}: cannot import module {where!r}: {e}") from e
        except Exception as e:
            raise ConfigError(f"reward function {spec!r}: importing {where!r} raised {type(e).__name__}: {e}") from e
    module = obj
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n]))
            raise ConfigError(f"reward function {spec!r}: {where!r} has no attribute {attr!r}; its callables: "
                              f"{', '.join(names) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward function {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def call_reward_fn(fn: Callable, prompts: list[str], completions: list[str], name: str) -> torch.Tensor:
    """``fn(prompts, completions)`` as a float32 ``[S]`` CPU tensor, or a :class:`RewardError` saying what went
    wrong: the function raised (chained, so the traceback shows where), returned the wrong number of values,
    something that is not a number, or NaN/Inf (with its index and prompt).

    Accepted results: a list or tuple of real numbers (bools and 1-element tensors count), or a 1-D tensor or
    array of ``S`` real values. ``name`` names the function in the messages (e.g. the config's spec).

    Example:
        >>> call_reward_fn(addition_reward, ["1+2=", "2+2="], ["3", "5"], "embedded")
        tensor([1., 0.])
    """
    _check_pair(prompts, completions)
    S = len(prompts)
    try:
        out = fn(list(prompts), list(completions))
    except Exception as e:
        raise RewardError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    if hasattr(out, "__array__") and not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out.__array__())
    if isinstance(out, torch.Tensor):
        if out.dim() != 1 or out.is_complex():
            raise RewardError(f"reward function {name} must return {S} real numbers; got a tensor of shape "
                              f"{tuple(out.shape)} and dtype {str(out.dtype).replace('torch.', '')}")
        values = out.detach().cpu().tolist()
    elif isinstance(out, (list, tuple)):
        values = list(out)
    else:
        raise RewardError(f"reward function {name} must return a list of {S} numbers; got {type(out).__name__}")
    if len(values) != S:
        raise RewardError(f"reward function {name} must return one reward per completion: expected {S}, "
                          f"got {len(values)}")
    floats = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
            v = v.item()
        if not isinstance(v, numbers.Real):
            raise RewardError(f"reward function {name} returned a {type(v).__name__} at index {i} "
                              f"(prompt {prompts[i]!r}); expected a real number, got {v!r}")
        floats.append(float(v))
    rewards = torch.tensor(floats, dtype=torch.float32)
    bad = (~torch.isfinite(rewards)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise RewardError(f"reward function {name} returned a non-finite reward {floats[i]!r} at index {i} "
                          f"(prompt {prompts[i]!r}, completion {completions[i]!r})" +
                          (" (too large for float32)" if math.isfinite(floats[i]) else ""))
    return rewards
