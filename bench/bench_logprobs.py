"""Benchmark of linear_logprobs against the code users would otherwise run, side by side in one run.

Providers (each only where it runs): ``naive`` (materialize ``h @ W.T``, ``log_softmax``, ``gather``),
``naive+entropy`` (the same plus the entropy), ``compile`` (``torch.compile`` of ``naive``), ``fastalign-<impl>``
for every implementation of ``fastalign.ops.logprobs.api.IMPLS`` available on the device, and when installed:
Cut Cross-Entropy (``cce``, ``cce_exact``; ``reduction="none"``), Liger's fused linear cross entropy
(``reduction="none"``), TRL's ``selective_log_softmax`` over row chunks of the logits (how TRL's trainers compute
per-token log-probabilities). Modes: ``no-grad``, ``fwd`` (with autograd recording), ``bwd`` (the backward
alone), ``fwd+bwd``.

Figures: median time; peak memory beyond the inputs (``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the
peak RSS growth during one call, in a fresh subprocess per measurement, after a warm-up call); the roofline
ratio: time over the time of the matmul FLOPs the mode needs at the rate of one ``h @ W.T`` (2·N·D·V FLOPs)
measured in the same run: 1 matmul for no-grad and fwd, 3 for bwd, 4 (8·N·D·V) for fwd+bwd.

    python bench/bench_logprobs.py --device cuda            # the Targets-table shapes and the sweeps, bf16
    python bench/bench_logprobs.py --device cpu             # N=4096, D=256, V=131072, float32
    python bench/bench_logprobs.py --device cpu --quick     # small shapes, a minute or two

Results: ``bench/results/bench_logprobs_<device>.{json,md}`` and ``..._sweep_<device>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import _harness  # noqa: E402

MODES = ("no-grad", "fwd", "bwd", "fwd+bwd")
FLOOR_MATMULS = {"no-grad": 1, "fwd": 1, "bwd": 3, "fwd+bwd": 4}
COLUMNS = ["shape", "provider", "mode", "ms", "peak_mib", "roofline", "vs_naive"]


def _naive(h, w, t, softcap=None, entropy=False):
    logits = (h @ w.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, t[:, None]).squeeze(-1)
    if entropy:
        return lp, -(logp.exp() * logp).sum(-1)
    return lp


def providers(device: str) -> dict:
    """name -> fn(h, w, t, softcap) returning the logprobs, or (logprobs, entropy). Only those that run here."""
    from fastalign import availability, linear_logprobs
    from fastalign.ops.logprobs import api

    out = {
        "naive": lambda h, w, t, c: _naive(h, w, t, c),
        "naive+entropy": lambda h, w, t, c: _naive(h, w, t, c, entropy=True),
    }
    compiled = torch.compile(_naive)
    out["compile"] = lambda h, w, t, c: compiled(h, w, t, c)
    for impl in api.IMPLS:
        if availability(impl, device)[0]:
            out[f"fastalign-{impl}"] = (lambda i: lambda h, w, t, c: linear_logprobs(h, w, t, softcap=c, impl=i))(impl)
            if impl != "torch":
                out[f"fastalign-{impl}+entropy"] = (lambda i: lambda h, w, t, c: linear_logprobs(
                    h, w, t, softcap=c, return_entropy=True, impl=i))(impl)
    try:
        from cut_cross_entropy import linear_cross_entropy

        for cce_impl in ("cce", "cce_exact"):
            out[cce_impl] = (lambda i: lambda h, w, t, c: -linear_cross_entropy(
                h, w, t, softcap=c, reduction="none", impl=i))(cce_impl)
    except Exception:
        pass
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w, t, c):
            loss = liger_fused_linear_cross_entropy(h, w, t, reduction="none", softcap=c)
            return -(loss[0] if isinstance(loss, tuple) else loss)

        out["liger"] = liger
    except Exception:
        pass
    try:
        from trl.trainer.utils import selective_log_softmax

        def trl(h, w, t, c, rows=1024):
            parts = []
            for i in range(0, h.shape[0], rows):
                logits = (h[i:i + rows] @ w.T).float()
                if c is not None:
                    logits = c * torch.tanh(logits / c)
                parts.append(selective_log_softmax(logits, t[i:i + rows]))
            return torch.cat(parts)

        out["trl-chunked"] = trl
    except Exception:
        pass
    return out


def _combined(out):
    """The [N] tensor to backpropagate from: the logprobs, plus the entropy for the providers that return it
    (so their backward runs through both)."""
    return out[0] + out[1] if isinstance(out, tuple) else out


def _inputs(N, D, V, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    return h.requires_grad_(grad), w.requires_grad_(grad), t


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(provider: str, mode: str, N, D, V, dtype, device, softcap=None, reps=5, warmup=None) -> dict:
    """Median ms of one (provider, mode) on one shape, in this process (and the CUDA peak on a GPU)."""
    fn = providers(device)[provider]
    h, w, t = _inputs(N, D, V, dtype, device, grad=mode != "no-grad")
    grad = torch.ones(N, device=device)
    if mode == "no-grad":
        def run():
            with torch.no_grad():
                fn(h, w, t, softcap)
    elif mode == "fwd":
        def run():
            fn(h, w, t, softcap)
    elif mode == "fwd+bwd":
        def run():
            _combined(fn(h, w, t, softcap)).backward(grad)
            h.grad = w.grad = None
    else:
        run = None
    if run is not None:
        if warmup is None:
            warmup = 1 if device == "cpu" else 3
        ms = _harness.median_time_ms(run, device=device, warmup=warmup, reps=reps)
    else:  # the backward alone: a fresh forward before each timed backward
        samples = []
        for i in range(reps + (0 if warmup == 0 else 1)):
            out = _combined(fn(h, w, t, softcap))
            _sync(device)
            t0 = time.perf_counter()
            out.backward(grad)
            _sync(device)
            if i or warmup == 0:  # the first is the warm-up
                samples.append((time.perf_counter() - t0) * 1e3)
            h.grad = w.grad = None
        ms = sorted(samples)[len(samples) // 2]
        run = lambda: _combined(fn(h, w, t, softcap)).backward(grad)
    result = {"ms": ms}
    if torch.device(device).type == "cuda":
        result["peak_mib"] = _harness.cuda_peak_mib(run, device)
    return result


def matmul_ms(N, D, V, dtype, device, reps=5) -> float:
    h, w, _ = _inputs(N, D, V, dtype, device, grad=False)
    return _harness.median_time_ms(lambda: h @ w.T, device=device, warmup=1 if device == "cpu" else 3, reps=reps)


def _peak_rss_since_reset_mib(fn) -> tuple[float, float]:
    """``(rss before, peak RSS during fn())`` in MiB, the peak counted from a reset of the kernel's high-water
    mark (``/proc/self/clear_refs``), so that imports, compilation and warm-up done earlier do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _harness.current_rss_mib()
    fn()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return before, hwm / 1024


def _cpu_child(provider, mode, N, D, V, dtype_name, softcap, reps) -> dict:
    """Runs in the subprocess: peak RSS growth of one call of the mode (after a warm-up), then the timing."""
    dtype = getattr(torch, dtype_name)
    fn = providers("cpu")[provider]
    h, w, t = _inputs(N, D, V, dtype, "cpu", grad=mode != "no-grad")

    def once():
        if mode == "no-grad":
            with torch.no_grad():
                fn(h, w, t, softcap)
        elif mode == "fwd":
            fn(h, w, t, softcap)
        else:  # bwd and fwd+bwd have the same peak: the forward's saved tensors plus the backward's buffers
            _combined(fn(h, w, t, softcap)).backward(torch.ones(N))
            h.grad = w.grad = None

    if provider == "compile":
        once()  # compilation, outside the memory measurement
    before, peak = _peak_rss_since_reset_mib(once)  # also the warm-up of the timing below
    r = measure(provider, mode, N, D, V, dtype, "cpu", softcap, reps, warmup=0)
    r.update(base_rss_mib=before, peak_mib=max(0.0, peak - before))
    return r


def measure_cpu_subprocess(provider, mode, N, D, V, dtype, softcap, reps) -> dict:
    """The measurement in a fresh process (so one provider's allocations never inflate another's)."""
    code = ("from bench import bench_logprobs as b\n"
            f"print(json.dumps(b._cpu_child({provider!r}, {mode!r}, {N}, {D}, {V}, "
            f"{str(dtype).split('.')[-1]!r}, {softcap!r}, {reps})))\n")
    return _harness.subprocess_peak_rss_mib(code, timeout=3600)


def run_shape(label, N, D, V, dtype, device, softcap, modes, names, reps) -> list[dict]:
    base = matmul_ms(N, D, V, dtype, device, reps)
    rows = [{"shape": label, "provider": "matmul h@W.T", "mode": "no-grad", "ms": base, "N": N, "D": D, "V": V}]
    print(f"[{label}] one matmul h @ W.T: {base:.2f} ms", flush=True)
    for name in names:
        for mode in modes:
            try:
                if torch.device(device).type == "cpu":
                    r = measure_cpu_subprocess(name, mode, N, D, V, dtype, softcap, reps)
                else:
                    r = measure(name, mode, N, D, V, dtype, device, softcap, reps)
            except Exception as e:  # one failing provider (e.g. out of memory) must not end the comparison
                print(f"  {name:28s} {mode:8s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                rows.append({"shape": label, "provider": name, "mode": mode, "error": f"{type(e).__name__}"})
                continue
            row = {"shape": label, "provider": name, "mode": mode, "ms": r["ms"], "peak_mib": r.get("peak_mib"),
                   "roofline": r["ms"] / (FLOOR_MATMULS[mode] * base), "N": N, "D": D, "V": V}
            rows.append(row)
            print(f"  {name:28s} {mode:8s} {row['ms']:10.2f} ms  peak {row['peak_mib'] or 0:9.1f} MiB  "
                  f"roofline {row['roofline']:.2f}", flush=True)
    for row in rows:
        ref = next((r for r in rows if r["provider"] == "naive" and r["mode"] == row["mode"] and "ms" in r), None)
        if ref is not None and "ms" in row:
            row["vs_naive"] = row["ms"] / ref["ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--providers", default="", help="comma-separated subset (default: all available)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the V and N sweeps")
    parser.add_argument("--reps", type=int, default=0)
    args = parser.parse_args(argv)
    device = args.device
    gpu = torch.device(device).type == "cuda"
    names = [p for p in providers(device) if not args.providers or p in args.providers.split(",")]
    modes = args.modes.split(",")
    reps = args.reps or (3 if args.quick or not gpu else 10)
    if gpu:
        dtype = torch.bfloat16
        shapes = [("N=8192 D=4096 V=128256", 8192, 4096, 128256, None),
                  ("N=8192 D=2304 V=256000 softcap=30", 8192, 2304, 256000, 30.0)]
        if args.quick:
            shapes = [("N=2048 D=2048 V=32768", 2048, 2048, 32768, None)]
        sweep = [] if args.no_sweep or args.quick else (
            [(f"V={v}", 8192, 4096, v, None) for v in (32768, 65536, 128256, 256000)] +
            [(f"N={n}", n, 4096, 128256, None) for n in (1024, 2048, 4096, 16384)])
    else:
        dtype = torch.float32
        shapes = [("N=4096 D=256 V=131072", 4096, 256, 131072, None)]
        if args.quick:
            shapes = [("N=512 D=256 V=16384", 512, 256, 16384, None)]
        sweep = [] if args.no_sweep or args.quick else [(f"V={v}", 1024, 256, v, None) for v in (8192, 32768)]
    env = _harness.environment(device)
    print(json.dumps(env), flush=True)
    rows = []
    for label, N, D, V, softcap in shapes:
        rows += run_shape(label, N, D, V, dtype, device, softcap, modes, names, reps)
    sweep_rows = []
    for label, N, D, V, softcap in sweep:
        sweep_rows += run_shape(label, N, D, V, dtype, device, softcap, ["fwd+bwd"], names, reps)
    notes = (f"dtype {str(dtype).split('.')[-1]}; modes {', '.join(modes)}; providers {', '.join(names)}. "
             "roofline = time / (matmuls the mode needs x the measured time of one h @ W.T): 1 for no-grad/fwd, "
             "3 for bwd, 4 for fwd+bwd. peak_mib = peak memory beyond the inputs (CUDA allocator on GPU; "
             "peak RSS growth during one call after a warm-up, in a fresh subprocess, on CPU). "
             "vs_naive = time / naive's time in the same mode.")
    name = "bench_logprobs" + ("_quick" if args.quick else "")
    json_path, md_path = _harness.write_results(name, rows + sweep_rows, env, COLUMNS, notes=notes)
    print(f"wrote {json_path} and {md_path}")
    if sweep_rows:
        png = os.path.join(os.path.dirname(json_path), f"{name}_sweep_{env['device_type']}.png")
        for axis in ("V", "N"):
            part = [r for r in sweep_rows if r["shape"].startswith(axis + "=") and "ms" in r]
            if part:
                _harness.plot_lines(png.replace("_sweep_", f"_sweep_{axis}_"), part, x=axis, y="ms",
                                    series="provider", title=f"linear_logprobs fwd+bwd vs {axis} ({device})")
    return rows


if __name__ == "__main__":
    main()
