"""Checkpoints: the model as safetensors (``save_pretrained``), the trainer state beside it, written atomically.

A checkpoint is a directory ``<output_dir>/checkpoint-<step>/`` holding the model (``model.safetensors`` +
``config.json``, loadable by ``transformers``), the tokenizer, optional extra modules (``value_head``, the
``ref`` model of a moving reference) and ``trainer_state.pt`` (optimizer, scheduler, RNG states, step, data
position). Everything is written into ``checkpoint-<step>.tmp/``, a ``manifest.json`` with every file's size
and sha256 is written last, and the directory is renamed into place: a killed save leaves only a ``.tmp``
directory, never a half-written checkpoint. :func:`verify` checks the manifest, so a truncated or corrupt
checkpoint is reported instead of loaded.

``trainer_state.pt`` holds tensors and plain values only (:func:`check_plain`) and is loaded with
``torch.load(weights_only=True)``: a checkpoint someone hands you cannot run code when resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

try:
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # older safetensors: its errors are OSError or RuntimeError
    _SafetensorError = OSError

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_digest(path: str) -> str:
    """The sha256 of a data file (of a directory: of its files' names and contents); ``path`` itself when it is
    ``''`` or ``'embedded'``, ``'missing'`` when it does not exist."""
    p = Path(path)
    if path in ("", "embedded"):
        return path
    if p.is_file():
        return _sha256(p)
    if not p.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0" + _sha256(f).encode())
    return h.hexdigest()


def rng_state() -> dict:
    """The RNG states of torch, Python and NumPy (and CUDA when in use) as tensors and plain values."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the legacy global RNG users seed)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],  # noqa: NPY002
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """Python's RNG state with its lists made tuples again (``random.setstate`` wants tuples)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


PLAIN = (type(None), bool, int, float, str, torch.Tensor)


def check_plain(value, where: str = "state") -> None:
    """Raise TypeError naming the first value of ``value`` that is not a tensor or a plain value (None, bool, int,
    float, str; dicts with str/int keys, lists and tuples of them): what ``torch.load(weights_only=True)`` loads
    without running code, and all a checkpoint may hold."""
    if isinstance(value, PLAIN):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: checkpoint state keys must be str or int; got {type(k).__name__} {k!r}")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: a checkpoint holds tensors and plain values only (None, bool, int, float, str, and "
                    f"dicts, lists and tuples of them), so that it loads without unpickling; got "
                    f"{type(value).__module__}.{type(value).__qualname__} (convert it, e.g. with .tolist() or "
                    f"torch.tensor, or save its state_dict)")


def save(output_dir, step: int, lm, tokenizer, state: dict, extra_models: dict | None = None,
         keep: int = 2, weights: dict | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically; keep the newest ``keep`` checkpoints. Returns its path.

    ``extra_models`` maps a name to a ``PreTrainedModel`` (saved with ``save_pretrained`` under that name) or
    to a callable ``f(directory)`` that writes its files into the checkpoint directory. ``weights``: the model's
    full state dict when ``lm``'s own parameters are sharded (FSDP2), else None.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step:06d}"
    tmp = output_dir / f"checkpoint-{step:06d}.tmp"
    check_plain(state)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lm.save_pretrained(str(tmp), safe_serialization=True, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, obj in (extra_models or {}).items():
            if callable(obj) and not hasattr(obj, "save_pretrained"):
                obj(tmp)
            else:
                obj.save_pretrained(str(tmp / name), safe_serialization=True)
        torch.save(state, tmp / STATE)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"step": step, "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size,
                                                                       "sha256": _sha256(p)} for p in files}}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError, _SafetensorError) as e:  # a full disk: torch.save says "unexpected pos ..."
        shutil.rmtree(tmp, ignore_errors=True)  # the space it took back; the complete checkpoints are untouched
        found = list_checkpoints(output_dir)
        kept = (f"the checkpoints already saved (the newest: {found[-1].name}) are intact" if found else
                "no checkpoint was saved before")
        raise CheckpointError(f"saving {final.name} in {output_dir} failed: {e}; free space (the disk may be full) "
                              f"or fix the directory's permissions, then resume=latest; {kept}") from None
    old = final.with_name(final.name + ".old")
    if final.exists():  # the same step saved again (a run resumed from an earlier checkpoint): swap, then delete
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(output_dir) -> list[Path]:
    """Complete (renamed) checkpoint directories of ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# What the loader reads besides the trainer state: a model (config + safetensors, whole or sharded) or a LoRA adapter.
MODEL_FILES = ((("config.json", "model.safetensors"), ("config.json", "model.safetensors.index.json"),
                ("adapter_config.json", "adapter_model.safetensors")))


def verify(path) -> dict:
    """Check the checkpoint against its manifest; return the manifest or raise CheckpointError.

    Every file of the directory must be listed (the loader reads only listed files) with its size and sha256, and
    the files the loader needs (``trainer_state.pt`` and the model's, :data:`MODEL_FILES`) must be there."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(m, dict) and isinstance(m.get("bytes"), int) and
                                                  isinstance(m.get("sha256"), str) for m in files.values()):
            raise KeyError("files must map each file name to its bytes and sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable {MANIFEST} ({e})") from None
    present = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    for name in present:
        if name != MANIFEST and name not in files:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is not listed in {MANIFEST} (a checkpoint's "
                                  f"files are listed with their size and sha256 when it is saved; remove the file if "
                                  f"you added it)")
    needed = [STATE] + min((list(m) for m in MODEL_FILES), key=lambda m: sum(n not in files for n in m))
    for name in needed:
        if name not in files:
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing (not in its {MANIFEST})")
    for name, meta in files.items():
        p = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not p.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {size} bytes, expected "
                                  f"{meta['bytes']} (truncated?)")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its sha256 in {MANIFEST}")
    return manifest


def find_resume(resume: str, output_dir) -> Path | None:
    """The checkpoint to resume from: ``''`` -> None, ``'latest'`` -> the newest in ``output_dir`` (None when
    there is none yet), else the given directory. The checkpoint is verified first."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            return None
        path = found[-1]
    else:
        path = resume_dir(resume)
    verify(path)
    return path


def resume_dir(resume: str) -> Path:
    """The directory ``resume=<dir>`` names, or CheckpointError when there is none."""
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={resume!r}: no such checkpoint directory")
    return path


def load_state(path) -> dict:
    """The trainer state of the checkpoint at ``path``, loaded with ``weights_only=True``: tensors and plain values
    only. A file that would need unpickling (any other object: it could run code) is refused."""
    file = Path(path) / STATE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"checkpoint {path}: {STATE} holds objects that need unpickling{what}, which could "
                              f"run code: refusing to load it. fastalign's own checkpoints hold tensors "
                              f"and plain values only; this one was crafted, or saved by an older fastalign (its "
                              f"model.safetensors still loads as model=<dir>).") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: {STATE} is unreadable ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE} must hold a dict; got {type(state).__name__}")
    missing = [k for k in ("step", "consumed", "optimizer", "scheduler", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: {STATE} lacks {', '.join(missing)}")
    return state
