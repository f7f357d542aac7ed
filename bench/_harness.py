"""The benchmark harness: one command, one way of measuring, one output format.

    fastalign bench [logprobs|gae|dpo|ppo|packing|train ...] [--device cpu|cuda] [--quick] [--out DIR]
    python -m bench [...]                 # the same, from a checkout
    python -m bench.bench_gae [...]       # one benchmark, the same options
    python -m bench.report                # docs/benchmarks.md from the committed JSON

A run writes into ``bench/results/<device>-<date>/`` (or ``--out``): ``run.json`` (the device header, the
measured ceilings, what ran and how long it took), and per benchmark ``<name>.json`` (the source of truth:
environment, ceilings, rows, notes), ``<name>.md`` (its table) and ``<name>.png`` (a plot, where the module asks
for one).

The contract of a benchmark module ``bench/bench_<name>.py`` (follow it to add one):

    TITLE = "one line"                                      # the heading of its tables
    COLUMNS = ["case", "provider", "mode", "ms", ...]       # optional: the Markdown columns (default: DEFAULT_COLUMNS)
    PLOT = {"x": "T", "y": "ms", "series": "provider"}      # optional: one PNG line plot of the rows
    def run(device: str, quick: bool, out: pathlib.Path) -> list[dict]: ...
    def notes(rows: list[dict]) -> str: ...                 # optional: text printed under the table
    if __name__ == "__main__":
        raise SystemExit(_harness.main(["<name>", *sys.argv[1:]]))

``run`` returns one dict per measurement. Keys the harness knows: ``case`` (a label of the inputs), ``provider``,
``mode``, ``ms`` (the median), ``ms_min``/``ms_max`` (the spread), ``samples``, ``peak_mib`` (peak memory beyond
the inputs), ``floor``/``floor_ms``/``vs_floor`` (the time the device's measured ceiling allows, and the ratio),
``error`` (a provider that failed, ran out of memory or is not available here: its row has ``error`` instead of
``ms``; a peer's failure is a result, never a crash). Anything else is kept in the JSON. ``--quick`` must keep
the whole run within 5 minutes on 2 CPU cores. ``out`` is the run's directory, for extra files. A ``run`` that
raises is recorded as one error row.

Comparing providers: give :func:`compare` the module's ``make(case, provider, mode, device) -> step`` (a
zero-argument callable doing one measured call, inputs already built). On the CPU every (provider, mode) runs in
its own fresh process; the parent asks them for samples in turn, ``rounds`` times, rotating the order, so that the
machine's drift hits all alike; peak memory is the peak RSS growth of that process's second call (the first is a
warm-up: imports, compilation), with glibc's mmap threshold set to 1 MiB so that buffers the warm-up freed are
mapped again and counted. The second call is also the first time sample; a provider whose samples have used its
time budget is not asked again.
On a GPU they run in this process, timed by ``triton.testing.do_bench`` (CUDA events without Triton), in rounds
too; peak memory is ``torch.cuda.max_memory_allocated`` beyond what was allocated before the call.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCHMARKS = ("logprobs", "gae", "dpo", "ppo", "packing", "train")
PEERS = ("transformers", "liger_kernel", "cut_cross_entropy", "trl")
DEFAULT_COLUMNS = ["case", "provider", "mode", "ms", "spread", "peak_mib", "vs_floor", "error"]
_TAG = "@@fastalign-bench@@ "


# --------------------------------------------------------------------------------------------- the device header

def _version(module: str) -> str | None:
    """The installed version of a distribution (from its metadata: nothing is imported), or None."""
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bench", "fastalign", "csrc", "kernels"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "") if out.returncode == 0 else None
    return None


def environment(device) -> dict:
    """The header stored beside every figure: date, device, the software and every peer's version."""
    device = torch.device(device)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device_type": device.type, "python": platform.python_version(), "torch": torch.__version__,
           "triton": _version("triton"), "cuda": torch.version.cuda, "fastalign": _version("fastalign"),
           "commit": _git_commit()}
    env.update({name: _version(name) for name in PEERS})
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        with contextlib.suppress(Exception):
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().split("\n")[0]
    else:
        env["device"] = f"{_cpu_model()}, {os.cpu_count()} cores"
        env["threads"] = torch.get_num_threads()
        env["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return env


# ------------------------------------------------------------------------------------------------------ timing

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def sample_ms(fn, *, device="cpu", reps: int = 5, max_seconds: float = 20.0) -> list[float]:
    """``reps`` wall-clock (CPU) or CUDA-event (GPU) times of ``fn()`` in ms; stops early, with at least one
    sample, once ``max_seconds`` are spent. No warm-up: the caller's."""
    out, spent = [], 0.0
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        out.append(ms)
        spent += ms / 1e3
        if spent > max_seconds:
            break
    return out


def median_time_ms(fn, *, device="cpu", warmup: int = 2, reps: int = 5, max_seconds: float = 20.0) -> float:
    """Median of :func:`sample_ms` after ``warmup`` calls (for in-process measurements of one thing)."""
    for _ in range(warmup):
        fn()
    return statistics.median(sample_ms(fn, device=device, reps=reps, max_seconds=max_seconds))


def summarize(samples: list[float]) -> dict:
    """``ms`` (median), ``ms_min``, ``ms_max`` and the number of samples."""
    return {"ms": statistics.median(samples), "ms_min": min(samples), "ms_max": max(samples),
            "samples": len(samples)}


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_growth(fn) -> tuple[float, float]:
    """``(RSS before, peak RSS growth during fn())`` in MiB. The kernel's high-water mark is reset first
    (``/proc/self/clear_refs``), so imports and set-up done earlier do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = current_rss_mib()
    fn()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return before, max(0.0, hwm - before)


def cuda_peak_mib(fn, device="cuda") -> float:
    """Peak CUDA memory allocated during ``fn()`` beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def describe_error(e: BaseException) -> str:
    """One line for an error row: ``OOM`` for an out-of-memory error, else its type and message."""
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "OOM"
    return text[:300]


# ------------------------------------------------------------------------------- ceilings: matmul and copy

def matmul_ms(N: int, D: int, V: int, dtype, device, *, reps: int = 5) -> float:
    """Median time of one ``[N, D] @ [D, V]`` matmul (2·N·D·V FLOPs), in this process."""
    a = torch.randn(N, D, device=device).to(dtype)
    b = torch.randn(V, D, device=device).to(dtype)
    return median_time_ms(lambda: a @ b.T, device=device, warmup=2, reps=reps)


def copy_gbs(nbytes: int, device, *, reps: int = 20) -> float:
    """Copy bandwidth ``dst.copy_(src)`` over ``nbytes`` per buffer, in GB/s (bytes read + written)."""
    src = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_time_ms(lambda: dst.copy_(src), device=device, warmup=3, reps=reps)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def ceilings(device, quick: bool) -> dict:
    """The device's ceilings at fixed shapes, for the header: matmul rate (float32 on CPU, bf16 on GPU) and copy
    bandwidth. Each benchmark also measures its own floor at its own shapes, in the same run."""
    cuda = torch.device(device).type == "cuda"
    n, d, v = (4096, 4096, 16384) if cuda else ((512, 256, 16384) if quick else (4096, 256, 32768))
    dtype = torch.bfloat16 if cuda else torch.float32
    ms = matmul_ms(n, d, v, dtype, device)
    nbytes = 2**30 if cuda else 2**26
    return {"matmul": {"shape": f"[{n}, {d}] @ [{d}, {v}] {str(dtype)[6:]}", "ms": ms,
                       "TFLOP/s": 2 * n * d * v / (ms * 1e-3) / 1e12},
            "copy": {"bytes": nbytes, "GB/s": copy_gbs(nbytes, device)}}


# ------------------------------------------------------------------------------------------------- progress

class Progress:
    """A progress bar over every sample of the run (stderr); its total grows as benchmarks add work."""

    def __init__(self, enabled: bool = True):
        self.bar = None
        if enabled and sys.stderr.isatty() or os.environ.get("FASTALIGN_BENCH_PROGRESS") == "1":
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=0, unit="step", dynamic_ncols=True, file=sys.stderr)

    def add(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def step(self, text: str = "") -> None:
        if self.bar is not None:
            self.bar.set_description_str(text[:60], refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


progress = Progress(enabled=False)
DRY_RUN = False  # --dry-run: tiny shapes (each module's cases()), one sample, in-process: a rehearsal of the scripts


# ------------------------------------------------------------------------- workers: a fresh process per provider

def _worker() -> None:
    """The child's loop: JSON requests on stdin, tagged JSON replies on stdout (the provider may print)."""
    step = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "setup":
                torch.manual_seed(0)
                make = importlib.import_module(msg["module"]).make
                step = make(msg["case"], msg["provider"], msg["mode"], msg["device"])
                t0 = time.perf_counter()
                step()  # the warm-up: lazy initialization, compilation, first-touch of the allocator
                t1 = time.perf_counter()
                base, growth = peak_rss_growth(step)  # the second call's memory
                reply = {"base_rss_mib": base, "peak_mib": growth, "first_ms": (t1 - t0) * 1e3,
                         "call_ms": (time.perf_counter() - t1) * 1e3}
            elif msg["op"] == "time":
                reply = {"samples": sample_ms(step, reps=msg["reps"], max_seconds=msg["max_seconds"])}
            else:
                return
        except Exception as e:  # noqa: BLE001 - reported to the parent as the provider's result
            reply = {"error": describe_error(e), "traceback": traceback.format_exc()[-2000:]}
        sys.stdout.write(_TAG + json.dumps(reply) + "\n")
        sys.stdout.flush()


class Worker:
    """A fresh Python process measuring one (provider, mode); started at once, asked for results in turn."""

    def __init__(self):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        # Blocks of 1 MiB and more are mapped and unmapped by glibc at every allocation and free, so that each
        # call's peak RSS growth counts them even when an earlier call freed the same sizes.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
        self.proc = subprocess.Popen([sys.executable, "-c", "from bench._harness import _worker; _worker()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, cwd=ROOT,
                                     env=env)
        self.buffer = b""

    def ask(self, timeout: float, **msg) -> dict:
        """Send one request and wait for its reply; a dead or stuck worker gives an ``error`` reply."""
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._died()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                if line.startswith(_TAG.encode()):
                    return json.loads(line[len(_TAG):])
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                return {"error": f"timed out after {timeout:.0f} s"}
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    return self._died()
                self.buffer += chunk

    def _died(self) -> dict:
        rc = self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-300:].replace("\n", " ").strip()
        why = " (killed: out of memory?)" if rc in (-9, 137) else ""
        return {"error": f"worker exited with code {rc}{why}" + (f": {tail}" if tail else "")}

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def _log(case: dict, provider: str, mode: str, reply: dict) -> None:
    if "error" in reply:
        what = f"error {reply['error'][:150]}"
    elif "first_ms" in reply:
        what = (f"warm-up {reply['first_ms']:.1f} ms, then {reply['call_ms']:.1f} ms with a peak of "
                f"{reply['peak_mib']:.1f} MiB")
    else:
        what = "ready" + (f", peak {reply['peak_mib']:.1f} MiB" if reply.get("peak_mib") is not None else "")
    print(f"  {case.get('case', '')} | {provider} | {mode}: {what}", flush=True)


def _compare_cpu(module, case, providers, mode, *, rounds, reps, max_seconds, timeout) -> dict[str, dict]:
    workers = {p: Worker() for p in providers}  # all start importing at once; nothing is timed yet
    results = {p: {"samples": []} for p in providers}
    try:
        for p, w in workers.items():  # set-up and warm-up one at a time: memory does not mix
            reply = w.ask(timeout, op="setup", module=module, case=case, provider=p, mode=mode, device="cpu")
            results[p].update(reply)
            if "call_ms" in reply:  # the measured call after the warm-up is a sample too
                results[p]["samples"].append(reply["call_ms"])
            progress.step(f"{case.get('case', '')} {p} {mode}")
            _log(case, p, mode, reply)
        live = [p for p in providers if "error" not in results[p]]
        for r in range(rounds):
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for p in order:
                if sum(results[p]["samples"]) / 1e3 >= max_seconds:
                    progress.step()
                    continue  # a slow provider: its budget is spent (it keeps at least the set-up's sample)
                first_s = max(results[p].get("call_ms", 0.0), 1e-3) / 1e3
                n = max(1, min(reps, int(max_seconds / rounds / first_s)))
                reply = workers[p].ask(timeout, op="time", reps=n, max_seconds=max_seconds / rounds)
                if "error" in reply:
                    results[p]["error"] = reply["error"]
                    live.remove(p)
                else:
                    results[p]["samples"] += reply["samples"]
                progress.step(f"{case.get('case', '')} {p} {mode}")
    finally:
        for w in workers.values():
            w.close()
    return results


def _gpu_samples(step, device, reps: int) -> list[float]:
    try:
        from triton.testing import do_bench
    except ImportError:
        return sample_ms(step, device=device, reps=reps)
    return list(do_bench(step, warmup=10, rep=max(20, 10 * reps), return_mode="all"))


def _compare_here(module, case, providers, mode, device, *, rounds, reps) -> dict[str, dict]:
    """In this process (the GPU path; on the CPU only under ``--dry-run``, to rehearse it)."""
    cuda = torch.device(device).type == "cuda"
    make = importlib.import_module(module).make

    def release():
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    steps, results = {}, {p: {"samples": []} for p in providers}
    for p in providers:
        try:
            torch.manual_seed(0)
            steps[p] = make(case, p, mode, device)
            steps[p]()  # warm-up: compilation and autotuning, outside the memory measurement
            results[p]["peak_mib"] = cuda_peak_mib(steps[p], device) if cuda else None
        except Exception as e:  # noqa: BLE001 - a provider's failure (OOM included) is its result
            results[p]["error"] = describe_error(e)
            steps.pop(p, None)
            release()
        progress.step(f"{case.get('case', '')} {p} {mode}")
        _log(case, p, mode, results[p] if "error" in results[p] else {"peak_mib": results[p]["peak_mib"]})
    for r in range(rounds):
        live = [p for p in providers if p in steps]
        for p in live[r % max(len(live), 1):] + live[:r % max(len(live), 1)]:
            try:
                results[p]["samples"] += _gpu_samples(steps[p], device, reps) if cuda else sample_ms(steps[p],
                                                                                                   reps=reps)
            except Exception as e:  # noqa: BLE001
                results[p]["error"] = describe_error(e)
                del steps[p]
                release()
            progress.step(f"{case.get('case', '')} {p} {mode}")
    steps.clear()
    release()
    return results


def compare(module: str, case: dict, providers: list[str], modes: list[str], device, *, rounds: int = 3,
            reps: int = 3, max_seconds: float = 30.0, timeout: float = 1800.0) -> list[dict]:
    """Measure every provider in every mode on one case, providers interleaved; one row per (provider, mode).

    ``module`` names the module whose ``make(case, provider, mode, device)`` returns the step to time; ``case``
    is a JSON-able dict of the inputs (with a ``case`` label). ``reps`` samples per round and provider, cut so
    that one provider spends about ``max_seconds`` in all (at least one sample per round)."""
    cuda = torch.device(device).type == "cuda"
    rows = []
    for mode in modes:
        progress.add(len(providers) * (rounds + 1))
        if DRY_RUN:
            rounds, reps = 1, 1
        if cuda or DRY_RUN:
            res = _compare_here(module, case, providers, mode, device, rounds=rounds, reps=reps)
        else:
            res = _compare_cpu(module, case, providers, mode, rounds=rounds, reps=reps, max_seconds=max_seconds,
                               timeout=timeout)
        for p in providers:
            r = res[p]
            row = dict(case)
            row.update(provider=p, mode=mode)
            if r["samples"] and "error" not in r:
                row.update(summarize(r["samples"]))
            row["peak_mib"] = r.get("peak_mib")
            if "error" in r:
                row["error"] = r["error"]
            rows.append(row)
    return rows


def add_ratios(rows: list[dict], *, floor: dict[str, str] | None = None, baseline: str | None = None,
               key=lambda r: (r.get("case"), r.get("mode"))) -> list[dict]:
    """``vs_floor``: each row's time over its floor provider's (``floor`` maps a mode to that provider, whose
    name lands in ``floor``), and ``vs_<baseline>``: over the ``baseline`` provider's, within the same ``key``."""
    ms = {(key(r), r["provider"]): r["ms"] for r in rows if r.get("ms")}
    for r in rows:
        if not r.get("ms"):
            continue
        f = (floor or {}).get(r.get("mode"))
        if f and (key(r), f) in ms and r["provider"] != f:
            r.update(floor=f, floor_ms=ms[key(r), f], vs_floor=r["ms"] / ms[key(r), f])
        if baseline and (key(r), baseline) in ms:
            r[f"vs_{baseline}"] = r["ms"] / ms[key(r), baseline]
    return rows


# ------------------------------------------------------------------------------------------------- writers

def fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def _cell(row: dict, column: str) -> str:
    if column == "spread":
        return f"{fmt(row['ms_min'])}-{fmt(row['ms_max'])} (n={row['samples']})" if "ms_min" in row else ""
    return fmt(row.get(column)).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    columns = [c for c in columns if any(_cell(r, c) for r in rows)]
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(r, c) for c in columns) + " |\n" for r in rows)


def header_line(env: dict) -> str:
    keys = ["date", "device", "threads", "load_avg_1min", "load_avg_1min_end", "driver", "python", "torch", "triton",
            "cuda", "fastalign", "commit", *PEERS]
    return "; ".join(f"{k} {env[k]}" for k in keys if env.get(k) is not None)


def plot_lines(path, rows: list[dict], *, x: str, y: str, series: str, title: str, logy: bool = True) -> bool:
    """One PNG line plot of ``y`` against ``x``, one line per value of ``series``; False when nothing to draw."""
    pts_by = {}
    for r in rows:
        if r.get(y) is not None and r.get(x) is not None:
            pts_by.setdefault(str(r[series]), []).append((r[x], r[y]))
    if not pts_by:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name, pts in pts_by.items():
        pts.sort()
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xlabel=x, ylabel=y, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def partial(out: Path, name: str, rows: list[dict]) -> None:
    """Write the rows so far as ``<name>.json`` (``"partial": true``), so that a run cut short (a timeout on a GPU
    window) still leaves what finished; the end of the benchmark overwrites it with the whole record."""
    (Path(out) / f"{name}.json").write_text(json.dumps({"benchmark": name, "partial": True, "rows": rows},
                                                       indent=1, default=str) + "\n")


def write_benchmark(out: Path, name: str, module, rows: list[dict], env: dict, ceil: dict, seconds: float) -> None:
    """``<name>.json`` (the record), ``<name>.md`` (its table) and ``<name>.png`` (the module's PLOT)."""
    title = getattr(module, "TITLE", name)
    note = ""
    if hasattr(module, "notes"):
        try:
            note = module.notes(rows)
        except Exception as e:  # noqa: BLE001 - the figures matter more than their caption
            note = f"(notes failed: {describe_error(e)})"
    record = {"benchmark": name, "title": title, "environment": env, "ceilings": ceil, "seconds": round(seconds, 1),
              "command": getattr(module, "_command", None), "notes": note,
              "columns": getattr(module, "COLUMNS", DEFAULT_COLUMNS), "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    md = [f"# {title}\n", f"{header_line(env)}\n", markdown_table(rows, getattr(module, "COLUMNS", DEFAULT_COLUMNS))]
    if note:
        md.append("\n" + note.strip() + "\n")
    (out / f"{name}.md").write_text("\n".join(md))
    plot = getattr(module, "PLOT", None)
    if plot:
        with contextlib.suppress(ImportError):
            plot_lines(out / f"{name}.png", [r for r in rows if r.get(plot["y"])], x=plot["x"], y=plot["y"],
                       series=plot["series"], title=f"{title} ({env['device']})", logy=plot.get("logy", True))


# ------------------------------------------------------------------------------ whole commands (bench.demo*)

_CLI_WITH_PEAK = ("import json, resource, sys\n"
                  "from fastalign.cli import main\n"
                  "rc = main(sys.argv[2:])\n"
                  "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'peak_rss_mib': "
                  "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
                  "sys.exit(rc)\n")


def fastalign_command(command: str, cwd, **over) -> dict:
    """Run ``fastalign <command> key=value...`` in a fresh process in ``cwd`` (without a progress bar), as a user
    would: its summary, wall time and peak RSS. A failed run raises with the end of its stderr."""
    shown = [f"{k}={v}" for k, v in over.items()]
    peak_file = Path(cwd) / f".peak-{command}-{os.getpid()}.json"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CLI_WITH_PEAK, str(peak_file), command, "progress_bar=false",
                          *shown], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"fastalign {command} {' '.join(shown)} failed:\n{out.stderr[-4000:]}")
    run_dir = Path(cwd) / over.get("output_dir", f"runs/{command}")
    return {"command": " ".join(["fastalign", command, *shown]), "wall_seconds": round(wall, 2),
            "peak_rss_mib": round(json.loads(peak_file.read_text())["peak_rss_mib"], 1),
            "summary": json.loads((run_dir / "summary.json").read_text()), "output_dir": str(run_dir)}


# ---------------------------------------------------------------------------------------------- the command

def default_out(device: str) -> Path:
    return RESULTS / f"{torch.device(device).type}-{datetime.date.today().isoformat()}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastalign bench", description="Benchmarks of fastalign's kernels against "
                                "every installed peer, in one run on one device (from a repository checkout).")
    p.add_argument("benchmarks", nargs="*", metavar="benchmark", help=f"any of {', '.join(BENCHMARKS)} "
                   "(default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: at most 5 minutes on 2 CPU cores")
    p.add_argument("--out", type=Path, help="output folder (default: bench/results/<device>-<date>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, one sample each, measured in this process: "
                   "rehearses every step (bench/gpu.sh --dry-run); its figures mean nothing")
    return p


def load(name: str):
    """The module of benchmark ``name`` (``bench.bench_<name>``), or None when it does not exist."""
    try:
        return importlib.import_module(f"bench.bench_{name}")
    except ModuleNotFoundError as e:
        if e.name == f"bench.bench_{name}":
            return None
        raise


def main(argv=None) -> int:
    global progress, DRY_RUN
    args = parser().parse_args(argv)
    DRY_RUN = args.dry_run
    unknown = [b for b in args.benchmarks if b not in BENCHMARKS]
    if unknown:
        parser().error(f"unknown benchmark(s) {unknown}: expected any of {list(BENCHMARKS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser().error("--device cuda: this torch sees no CUDA device")
    names = args.benchmarks or list(BENCHMARKS)
    out = (args.out or default_out(args.device)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=not args.no_progress)
    t_run = time.perf_counter()
    env = environment(args.device)
    ceil = ceilings(args.device, args.quick or DRY_RUN)
    print(f"fastalign bench: {header_line(env)}", flush=True)
    print(f"ceilings: matmul {ceil['matmul']['shape']} {ceil['matmul']['ms']:.2f} ms = "
          f"{ceil['matmul']['TFLOP/s']:.3g} TFLOP/s; copy {ceil['copy']['GB/s']:.3g} GB/s", flush=True)
    done = {}
    command = " ".join(["fastalign bench", *names, "--device", args.device] + (["--quick"] if args.quick else [])
                       + (["--dry-run"] if DRY_RUN else []))
    for name in names:
        module = load(name)
        if module is None:
            print(f"== {name}: bench/bench_{name}.py does not exist here; skipped", flush=True)
            done[name] = "missing"
            continue
        module._command = command
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            rows = module.run(args.device, args.quick, out)
        except Exception as e:  # noqa: BLE001 - one benchmark's crash must not lose the others
            traceback.print_exc()
            rows = [{"provider": name, "error": describe_error(e)}]
        # load_avg_1min stays the run's start (before its own processes); the end's counts them too
        write_benchmark(out, name, module, rows, env | {"load_avg_1min_end": round(os.getloadavg()[0], 2)}
                        if args.device == "cpu" else env, ceil, time.perf_counter() - t0)
        done[name] = round(time.perf_counter() - t0, 1)
        print(markdown_table(rows, getattr(module, "COLUMNS", DEFAULT_COLUMNS)), flush=True)
    progress.close()
    run_file = out / "run.json"  # several invocations into one folder (bench/gpu.sh) add up
    before = json.loads(run_file.read_text()) if run_file.is_file() else {}
    if set(before.get("benchmarks", {})) & set(done):  # a rerun of some of them: this invocation supersedes it
        before = {"benchmarks": {k: v for k, v in before["benchmarks"].items() if k not in done}}
    run_file.write_text(json.dumps({"command": " && ".join(filter(None, [before.get("command"), command])),
                                    "environment": env, "ceilings": ceil, "dry_run": DRY_RUN,
                                    "benchmarks": {**before.get("benchmarks", {}), **done},
                                    "seconds": round(before.get("seconds", 0) + time.perf_counter() - t_run, 1)},
                                   indent=1) + "\n")
    print(f"wrote {out} in {time.perf_counter() - t_run:.0f} s", flush=True)
    return 0
