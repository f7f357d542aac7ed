"""The parts every training loop shares: device and ranks, optimizer and schedule, the optimizer step,
metrics (progress bar, ``metrics.jsonl``, TensorBoard, plots, summary), checkpoint/resume and the exact-match
evaluation of greedy generations."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastalign.hf import check_model
from fastalign.train import checkpoint
from fastalign.train.config import DATA_OPTIONS, RESUME_SAFE, ConfigError, resolve_attention, to_dict
from fastalign.train.data import Batcher, check_packing
from fastalign.train.model import greedy_complete, save_merged

_MODES = {"fsdp": "with distributed=fsdp under torchrun", "ddp": "on one process or with distributed=ddp"}
# What a run writes into its output_dir (besides checkpoint-<step>/): an output_dir holding any of them holds an
# earlier run. sft_warmup/ (the warm start, reused when complete) and cache/ (keyed by model and data) are not.
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "final", "curves.png", "tensorboard")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stopped without saving the bad weights."""


class Run:
    """One training run's environment: device, ranks (``torchrun``), output directory and metric sinks."""

    def __init__(self, cfg, command: str):
        self.cfg, self.command = cfg, command
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if cfg.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = cfg.device
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device == "cuda" and self.world > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = torch.device(device)
        self._threads = torch.get_num_threads()  # restored by finish()
        threads = cfg.cpu_threads or (1 if cfg.model == "embedded" else 0)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.attn = resolve_attention(cfg.attn_implementation, self.device)  # what models are loaded with
        self.main = self.rank == 0
        self.out = Path(cfg.output_dir)
        self.history: list[dict] = []
        self._tb = self._bar = None
        self.wrapped = None  # the module given to wrap(), sharded in place under FSDP2
        self._postfix: dict[str, str] = {}
        self.started = time.time()
        try:  # the checkpoints' "Writing model shards" bars would break the run's progress bar
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        self._claimed, self._resumed, self._record = False, None, None
        check_output_dir(self.out, command)
        if cfg.resume not in ("", "latest"):
            checkpoint.resume_dir(cfg.resume)
        earlier = earlier_run(self.out) if self.main else []
        (refuse,) = self.sum_all(float(bool(earlier) and not cfg.overwrite_output_dir and not self._continues()))
        if refuse:  # decided on rank 0 (which writes), before anything is read or written
            found = f" ({', '.join(earlier)})" if earlier else ""
            raise ConfigError(f"{command}: output_dir {self.out} holds an earlier run{found}; pass resume=latest to "
                              f"continue it, overwrite_output_dir=true to replace it, or choose another output_dir")

    def _continues(self) -> bool:
        """True when ``resume`` continues the run of ``output_dir`` (``latest``, or one of its checkpoints)."""
        resume = self.cfg.resume
        return resume == "latest" or (bool(resume) and Path(resume).resolve().parent == self.out.resolve())

    def claim(self) -> None:
        """Take ``output_dir`` for this run, at its first write (so a run that fails on its model, data or options
        leaves the directory as it was): create it; starting fresh where an earlier run is (``overwrite_output_dir``,
        or ``resume=latest`` with no checkpoint yet), remove that run's outputs; write ``config.json`` and
        ``metrics.jsonl`` (the rows up to the checkpoint of a resumed run). Rank 0 only."""
        if self._claimed:
            return
        self._claimed = True
        if not self.main:
            return
        with self._writing(f"output_dir {self.out}"):
            self.out.mkdir(parents=True, exist_ok=True)
            old = earlier_run(self.out) if self._resumed is None else []
            for name in old:
                p = self.out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            if old:
                self.say(f"{self.command}: starting fresh in {self.out}, replacing the earlier run there (removed "
                         f"{', '.join(old)})")
            (self.out / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=1))
            with open(self.out / "metrics.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Report a failed write (a full disk, a read-only directory) as a CheckpointError saying what to do."""
        try:
            yield
        except OSError as e:
            found = checkpoint.list_checkpoints(self.out)
            kept = f"the checkpoints already saved (the newest: {found[-1]}) are intact" if found else \
                "no checkpoint was saved yet"
            raise checkpoint.CheckpointError(
                f"{self.command}: writing {what} failed: {e}; free space (the disk may be full) or fix the "
                f"directory's permissions, then resume=latest; {kept}") from None

    def run_record(self) -> dict:
        """What defines this run, saved in each checkpoint and compared on resume: the command, every option but
        the data files and ``RESUME_SAFE``, and the sha256 of each data file's content."""
        if self._record is None:
            settings = {k: v for k, v in to_dict(self.cfg).items() if k not in RESUME_SAFE and k not in DATA_OPTIONS}
            data = {k: {"path": getattr(self.cfg, k), "sha256": checkpoint.content_digest(getattr(self.cfg, k))}
                    for k in DATA_OPTIONS if hasattr(self.cfg, k)}
            self._record = {"command": self.command, "settings": settings, "data": data}
        return self._record

    def _check_same_run(self, path, state: dict) -> None:
        """Refuse to resume from ``path`` with other settings or data than the checkpoint's run (ConfigError
        listing each difference); the options of ``RESUME_SAFE`` may change."""
        saved = state.get("run")
        if not (isinstance(saved, dict) and isinstance(saved.get("settings"), dict) and
                isinstance(saved.get("data"), dict)):
            raise checkpoint.CheckpointError(f"checkpoint {path} has no record of its run's settings (saved by an "
                                             f"older fastalign?); its weights load as model={path}")
        now, diffs = self.run_record(), []
        if saved.get("command") != self.command:
            diffs.append(f"the command: {saved.get('command')} in the checkpoint, {self.command} now")
        defaults = type(self.cfg)()
        for k, v in now["settings"].items():
            old = saved["settings"].get(k, getattr(defaults, k))  # an option newer than the checkpoint: its default
            if old != v:
                diffs.append(f"{k}: {old!r} in the checkpoint, {v!r} now")
        for k, d in now["data"].items():
            old = saved["data"].get(k)
            if old is not None and old.get("sha256") != d["sha256"]:
                diffs.append(f"{k}: the content of {d['path']} differs from the checkpoint's ({old.get('path')}: "
                             f"sha256 {str(old.get('sha256'))[:16]}, now {d['sha256'][:16]})")
        if diffs:
            raise ConfigError(f"{self.command}: resume={self.cfg.resume}: the checkpoint {path} is of a run with other "
                              f"settings:\n  " + "\n  ".join(diffs) + f"\nResume it with its own settings (only "
                              f"{', '.join(RESUME_SAFE)} may change), or start a new run (another output_dir, or "
                              f"overwrite_output_dir=true)")

    # ---- model and optimization -------------------------------------------------------------------------
    @property
    def fsdp(self) -> bool:
        """True when the model is sharded with FSDP2 (``distributed=fsdp`` under torchrun with 2+ processes)."""
        return self.world > 1 and self.cfg.distributed == "fsdp"

    def batcher(self, tokenizer) -> Batcher:
        """Padded batches, or with ``packing`` packed rows: one row for flash-attn's varlen kernel, rows of at most
        ``max_length`` tokens for a masked attention (SDPA/eager compute the whole row x row block-diagonal mask,
        so a row's cost grows with its square)."""
        row_tokens = None if "flash" in self.attn else self.cfg.max_length
        return Batcher(tokenizer.pad_token_id, self.cfg.packing, row_tokens)

    def check(self, lm) -> None:
        """The start-up checks of a loaded model, on this device (moves ``lm`` there): with ``check_model``, that the
        fused log-probabilities equal the model's own (:func:`fastalign.hf.check_model`); with ``packing``, that it
        keeps packed sequences apart."""
        lm.to(self.device)
        if self.cfg.check_model:
            check_model(lm)
        if self.cfg.packing:
            check_packing(lm, self.device, self.autocast())

    def wrap(self, module, primary: bool = True):
        """Move to the device; across ranks (torchrun) wrap with DDP, or shard with FSDP2 (``distributed=fsdp``).
        The ``primary`` module (the policy) is the one :meth:`generator`, :meth:`full_states` and :meth:`restore`
        default to; another (PPO's critic) is passed to them as ``root``.

        FSDP2 shards each decoder layer (:func:`decoder_layers`) as its own group, then the root ``module``
        (embeddings, final norm, LM head). :class:`SequenceLogps` reads the LM-head weight inside its own forward,
        which is the root's: FSDP has gathered the full weight there and reduce-scatters its gradient in
        backward, so the fused op sees the whole ``[V, D]`` matrix and the sharded parameter gets its gradient.
        """
        module = module.to(self.device)
        if primary:
            self.wrapped = module
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            for layer in decoder_layers(module.lm):
                fully_shard(layer)
            fully_shard(module)
            if hasattr(module, "generate"):  # greedy evaluation runs through the root's unshard hooks too
                register_fsdp_forward_method(module, "generate")
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return module

    def generator(self, lm):
        """What greedy generation calls ``generate`` on: the LM, or under FSDP2 the sharded root (whose
        ``generate`` gathers the root's parameters first; every rank must call it)."""
        return self.wrapped if self.fsdp else lm

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimizer(self, params, lr: float | None = None, total_steps: int | None = None):
        """AdamW (peak rate ``lr``, default ``learning_rate``) with a linear warmup then cosine decay to 0 over
        ``total_steps`` optimizer steps (default ``max_steps``)."""
        cfg = self.cfg
        total = cfg.max_steps if total_steps is None else total_steps
        opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.learning_rate if lr is None else lr,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)

        def factor(step):
            if step < cfg.warmup_steps:
                return (step + 1) / (cfg.warmup_steps + 1)
            progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def accumulate(self, step: int, n: int, loss_of, reduce: str = "mean") -> dict:
        """Backpropagate one accumulation cycle of ``n`` micro-batches: ``loss_of(i) -> (loss, metrics)`` builds
        micro-batch ``i`` (one at a time, so each graph is freed before the next); the cycle's loss is the mean of
        the ``n`` losses (``reduce="sum"``: their sum, for losses already normalized over the cycle). Returns the
        metrics (``loss`` included) reduced the same way over micro-batches and averaged over ranks."""
        w = 1.0 / n if reduce == "mean" else 1.0
        sums: dict[str, float] = {}
        for i in range(n):
            loss, metrics = loss_of(i)
            self.check_finite(loss, step)
            (loss * w).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * w
        return self.mean_metrics(sums)

    def step(self, module, opt, sched) -> dict:
        """Clip, step, schedule, zero the gradients; return the pre-clipping ``grad_norm`` and the
        ``learning_rate`` this step used."""
        lr = sched.get_last_lr()[0]
        params = [p for p in module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.max_grad_norm, norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm of sharded gradients, reduced over ranks here
            norm = norm.full_tensor()
        norm = float(norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "learning_rate": lr}

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        (bad,) = self.sum_all(float(not bool(torch.isfinite(loss.detach()).all())))  # every rank stops together
        if bad:
            found = checkpoint.list_checkpoints(self.out)
            last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"
            raise TrainingDiverged(f"{self.command}: the loss is {float(loss.detach())} at step {step + 1}; stopped "
                                   f"without saving these weights ({last}). Lower learning_rate or check the data.")

    def sum_all(self, *values: float) -> list[float]:
        """Sum numbers over ranks (identity on one process)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def mean_metrics(self, metrics: dict) -> dict:
        """Mean of each scalar metric over ranks."""
        keys = sorted(metrics)
        vals = self.sum_all(*[float(metrics[k]) for k in keys])
        return {k: v / self.world for k, v in zip(keys, vals)}

    # ---- logging ---------------------------------------------------------------------------------------------
    def progress(self, start: int):
        if self.main and self.cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.cfg.max_steps, initial=start, desc=self.command, dynamic_ncols=True)

    def log(self, step: int, metrics: dict, show: tuple = ()) -> None:
        """Record metrics of ``step`` (1-based): metrics.jsonl, TensorBoard, the progress bar (rank 0 only)."""
        if not self.main:
            return
        self.claim()
        row = {"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}
        self.history.append(row)
        with self._writing(self.out / "metrics.jsonl"), open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.cfg.report_to_tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    self.cfg.report_to_tensorboard = False
                else:
                    self._tb = SummaryWriter(str(self.out / "tensorboard"))
            if self._tb is not None:
                for k, v in metrics.items():
                    self._tb.add_scalar(k, float(v), step)
        if self._bar is None and show:
            self.say(f"{self.command} step {step}: " + ", ".join(f"{k} {float(metrics[k]):.4g}" for k in show
                                                                 if k in metrics))
        if self._bar is not None and show:
            self._postfix.update({k.split("/")[-1]: f"{float(metrics[k]):.3g}" for k in show if k in metrics})
            self._bar.set_postfix(self._postfix, refresh=False)

    def advance(self, step: int) -> None:
        """After step ``step`` (1-based) is done."""
        if self._bar is not None:
            self._bar.update(1)

    def say(self, text: str) -> None:
        if not self.main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def finish(self, summary: dict, plot_keys: list[list[str]]) -> dict:
        """Close the sinks, write ``summary.json`` and the plots, print the summary (rank 0)."""
        summary = {"command": self.command, "output_dir": str(self.out),
                   "seconds": round(time.time() - self.started, 1), **summary}
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self.main:
            self.claim()
            with self._writing(f"the summary and plots in {self.out}"):
                if self.cfg.plots and self.history:
                    summary["plot"] = str(plot_history(self.history, plot_keys, self.out / "curves.png",
                                                       self.command))
                (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            print(f"== {self.command} summary")
            for k, v in summary.items():
                print(f"  {k}: {round(v, 4) if isinstance(v, float) else v}")
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
        torch.set_num_threads(self._threads)
        return summary

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def full_states(self, lm, opt=None, root=None):
        """``(weights, optimizer_state)`` to checkpoint. Without FSDP: ``(None, opt.state_dict())`` (the model
        saves its own parameters). Under FSDP2 (a collective: every rank calls it): the full state dict of ``lm``
        (any module inside the sharded ``root``, by default the primary one) and the optimizer's full state dict
        (keyed by parameter name), gathered to CPU on rank 0."""
        if not self.fsdp:
            return None, None if opt is None else opt.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(lm, options=full)
        first: dict[int, str] = {}  # tied parameters (embedding and LM head) share one gathered tensor again,
        for name, p in lm.named_parameters(remove_duplicate=False):  # so save_pretrained drops the duplicate
            alias = first.setdefault(id(p), name)
            if alias != name and alias in weights:
                weights[name] = weights[alias]
        root = self.wrapped if root is None else root
        return weights, None if opt is None else get_optimizer_state_dict(root, opt, options=full)

    def save(self, step: int, lm, tokenizer, opt, sched, consumed: int, extra_state=None, extra_models=None):
        """Write ``checkpoint-<step>``: the model, and the trainer state (optimizer, scheduler, RNG, data position,
        the history, the run's record for resume, and ``extra_state``). Every value of ``extra_state`` must be a
        tensor or a plain value (None, bool, int, float, str, and dicts/lists/tuples of them): the state loads with
        ``weights_only=True``; anything else is a TypeError here, at the first save."""
        weights, optim = self.full_states(lm, opt)
        if not self.main:
            return None
        self.claim()
        state = {"step": step, "consumed": consumed, "optimizer": optim, "scheduler": sched.state_dict(),
                 "distributed": "fsdp" if self.fsdp else "ddp", "rng": checkpoint.rng_state(),
                 "history": self.history, "run": self.run_record(), **(extra_state or {})}
        return checkpoint.save(self.out, step, lm, tokenizer, state, extra_models, weights=weights)

    def save_final(self, lm, tokenizer, extra=None) -> Path:
        final = self.out / "final"
        weights, _ = self.full_states(lm)
        if self.main:
            self.claim()
            with self._writing(f"the final model to {final}"):
                if weights is None:
                    save_merged(lm, final)
                else:
                    lm.save_pretrained(str(final), safe_serialization=True, state_dict=weights)
                tokenizer.save_pretrained(str(final))
                if extra is not None:
                    extra(final)
        return final

    def resume_point(self):
        """``(path, state)`` of the checkpoint to resume from, or ``(None, None)``. A checkpoint of a run with other
        settings or data is refused (:meth:`_check_same_run`). Nothing is written here (:meth:`claim` does, at the
        run's first write)."""
        path = checkpoint.find_resume(self.cfg.resume, self.out)
        self._resumed = path
        if path is None:
            return None, None
        state = checkpoint.load_state(path)
        self._check_same_run(path, state)
        self.history = [r for r in state.get("history", []) if r["step"] <= state["step"]]  # not the rows logged
        self.say(f"{self.command}: resuming from {path} (step {state['step']})")  # after it by the interrupted run
        return path, state

    def restore(self, state: dict, opt, sched) -> None:
        saved = state.get("distributed", "ddp")
        mode = "fsdp" if self.fsdp else "ddp"
        if saved != mode:
            raise checkpoint.CheckpointError(
                f"{self.command}: the checkpoint's optimizer state was saved {_MODES[saved]}; resume it "
                f"{_MODES[saved]} (this run is {_MODES[mode]})")
        self.load_optimizer(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])

    def load_optimizer(self, opt, optimizer_state, root=None) -> None:
        """Load an optimizer state saved by :meth:`full_states` (under FSDP2, into the shards of ``root``, by
        default the primary module)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.wrapped if root is None else root, opt, optimizer_state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(optimizer_state)

    def every(self, k: int, step: int) -> bool:
        """True at steps that are multiples of ``k`` (``k = 0``: never) and at the last step."""
        return step == self.cfg.max_steps or (k > 0 and step % k == 0)


def earlier_run(out: Path) -> list[str]:
    """The names of an earlier run's outputs in ``out`` (:data:`RUN_OUTPUTS`, ``checkpoint-<step>[.tmp]``)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name in RUN_OUTPUTS or re.fullmatch(r"checkpoint-\d+(\.tmp|\.old)?", p.name))


def check_output_dir(out: Path, command: str) -> None:
    """Raise ConfigError when ``out`` cannot be a run's directory: it, or the nearest existing folder above it, is
    a file, or is not writable."""
    p = out.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        what = f"{out} is" if p == out.absolute() else f"{out} cannot be made: {p} is"
        raise ConfigError(f"{command}: output_dir {what} a file, not a directory; choose another output_dir")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{command}: output_dir {out} is not writable ({p} does not allow this user to write): "
                          f"choose another output_dir, or make it writable")


def decoder_layers(lm) -> list:
    """The decoder layers of a transformers model (the classes named in its ``_no_split_modules``)."""
    blocks = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ValueError(f"distributed=fsdp: no decoder layers to shard in {type(lm).__name__}: expected modules "
                         f"of the classes in its _no_split_modules, got {sorted(blocks)}; use distributed=ddp")
    return layers


def exact_match(lm, tokenizer, prompts, max_new_tokens: int) -> float:
    """Fraction of greedy completions equal (after strip) to the answer, for ``(prompt_ids, answer)`` pairs."""
    if not prompts:
        return float("nan")
    outs = greedy_complete(lm, tokenizer, [p for p, _ in prompts], max_new_tokens)
    return sum(o.strip() == a for o, (_, a) in zip(outs, prompts)) / len(prompts)


def plot_history(history: list[dict], groups: list[list[str]], path: Path, title: str) -> Path:
    """One panel per group of metric names (those present), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [[k for k in g if any(k in r for r in history)] for g in groups]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, keys in zip(axes[0], groups):
        for k in keys:
            pts = [(r["step"], r[k]) for r in history if k in r]
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=k)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"fastalign {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
