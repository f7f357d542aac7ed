"""Shared benchmark harness: timing (CUDA events on GPU, wall clock on CPU), peak memory (CUDA allocator on GPU,
peak RSS of a fresh subprocess on CPU), the environment record, and the JSON + Markdown + PNG writers.

Every bench script builds a list of row dicts (provider, mode, shape fields, ``ms``, ``peak_mib``...) and calls
:func:`write_results`, which stores them with :func:`environment` under ``bench/results/``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment(device) -> dict:
    """Device name and software versions to store beside every figure."""
    device = torch.device(device)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "device_type": device.type}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
        env["threads"] = torch.get_num_threads()
    import fastalign

    env["fastalign"] = fastalign.__version__
    return env


def median_time_ms(fn, *, device="cpu", warmup: int = 2, reps: int = 5, max_seconds: float = 20.0) -> float:
    """Median time of ``fn()`` in milliseconds: CUDA events on a GPU, ``perf_counter`` on the CPU.

    Stops repeating early (with at least 3 samples) once ``max_seconds`` have been spent.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples, spent = [], 0.0
    for _ in range(reps):
        if device.type == "cuda":
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
        samples.append(ms)
        spent += ms / 1e3
        if spent > max_seconds and len(samples) >= 3:
            break
    return statistics.median(samples)


def cuda_peak_mib(fn, device="cuda") -> float:
    """Peak CUDA memory allocated during ``fn()`` beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def subprocess_peak_rss_mib(code: str, *, timeout: float = 600) -> dict:
    """Run ``code`` in a fresh Python process and return the JSON dict it prints on its last line, plus
    ``peak_rss_mib`` (ru_maxrss of that process). The code measures whatever it likes and prints one JSON
    line; the baseline RSS after imports and setup is the code's to report (``base_rss_mib``), using
    :func:`current_rss_mib`."""
    wrapper = ("import json, resource, sys\n" + code +
               "\nprint('__PEAK__', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout,
                         cwd=os.path.dirname(RESULTS) + "/..")
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{out.stderr[-4000:]}")
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-2])
    result["peak_rss_mib"] = float(lines[-1].split()[1])
    return result


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


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


def write_results(name: str, rows: list[dict], env: dict, columns: list[str], *, notes: str = "",
                  out_dir: str | None = None) -> tuple[str, str]:
    """Write ``<name>_<device_type>.json`` and ``.md`` under ``out_dir`` (default ``bench/results``)."""
    out_dir = out_dir or os.environ.get("FASTALIGN_BENCH_OUT", RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{name}_{env['device_type']}")
    with open(stem + ".json", "w") as f:
        json.dump({"benchmark": name, "environment": env, "rows": rows, "notes": notes}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# {name} on {env['device']}\n\n")
        f.write(", ".join(f"{k} {v}" for k, v in env.items() if k not in ("device",)) + "\n\n")
        if notes:
            f.write(notes.strip() + "\n\n")
        f.write(markdown_table(rows, columns))
    return stem + ".json", stem + ".md"


def plot_lines(path: str, rows: list[dict], *, x: str, y: str, series: str, title: str, logy: bool = True) -> None:
    """One PNG line plot of ``y`` against ``x``, one line per value of ``series``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r[series] for r in rows):
        pts = sorted((r[x], r[y]) for r in rows if r[series] == name and r.get(y) is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=str(name))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
