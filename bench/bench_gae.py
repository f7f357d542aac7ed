"""GAE microbenchmark: the Python loops of popular trainers against every fastalign implementation.

Providers (whichever run on the device): ``trl_loop`` (TRL's reversed loop over time; padding carries zero
rewards and values), ``verl_loop`` (verl's loop, blending the state with the mask at every step),
``torch_vectorized`` (deltas vectorized, the discounted reverse sum as one matmul with the ``[T, T]`` matrix of
``(gamma lam)^(s - t)``: O(T^2) work), and ``fastalign_<impl>`` for torch (the reference loop), cpp, triton
(GPU only: the interpreter is not a performance path) and cuda.

On CUDA the copy bandwidth (``dst.copy_(src)`` of the same bytes as GAE moves) is measured in the same run, and
each fastalign row reports its effective bandwidth and fraction of it. Figures, not assertions: on a shared
machine CPU timings are noisy (medians of several runs are reported).

    python bench/bench_gae.py                  # CPU: B=256, T=2048 and a sweep over T
    python bench/bench_gae.py --device cuda    # GPU: B=512, T=4096, copy bandwidth, Triton vs CUDA short/long
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastalign  # noqa: E402
from bench._harness import RESULTS, environment, median_time_ms, plot_lines, write_results  # noqa: E402
from fastalign._backend import availability  # noqa: E402
from fastalign.ops.gae.naive import trl_style_gae, verl_style_gae  # noqa: E402

GAMMA, LAM = 1.0, 0.95


def trl_loop(rewards, values, mask):
    return trl_style_gae(rewards, values, GAMMA, LAM)


def verl_loop(rewards, values, mask):
    return verl_style_gae(rewards, values, mask, GAMMA, LAM)


def torch_vectorized(rewards, values, mask):
    T = rewards.shape[1]
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    delta = rewards + GAMMA * next_values - values
    idx = torch.arange(T, device=rewards.device)
    expo = (idx[None, :] - idx[:, None]).to(rewards.dtype)          # [t, s] = s - t
    weights = torch.where(expo >= 0, (GAMMA * LAM) ** expo.clamp(min=0), 0.0)
    adv = delta @ weights.T
    return adv, adv + values


def fastalign_provider(impl, threads=None):
    def run(rewards, values, mask):
        if threads is None:
            return fastalign.gae(rewards, values, mask=mask, gamma=GAMMA, lam=LAM, impl=impl)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fastalign.gae(rewards, values, mask=mask, gamma=GAMMA, lam=LAM, impl=impl)
        finally:
            torch.set_num_threads(before)
    return run


def inputs(B, T, device):
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    rewards = torch.randn(B, T, device=device) * mask
    values = torch.randn(B, T, device=device) * mask
    return rewards, values, mask


def providers(device, include_loops=True):
    out = {}
    if include_loops:
        out.update(trl_loop=trl_loop, verl_loop=lambda r, v, m: verl_loop(r, v, m.float()))
    out["torch_vectorized"] = torch_vectorized
    for impl in ("torch", "cpp", "triton", "cuda"):
        if impl == "triton" and device == "cpu":
            continue
        if availability(impl, device)[0]:
            out[f"fastalign_{impl}"] = fastalign_provider(impl)
            if impl == "cpp" and torch.get_num_threads() > 1:
                # On a loaded machine OpenMP's barrier waits for descheduled threads: show one thread too.
                out["fastalign_cpp_1thread"] = fastalign_provider(impl, threads=1)
    return out


def gae_bytes(B, T):
    return B * T * (4 + 4 + 1 + 4 + 4)  # rewards, values, mask in; advantages, returns out (fp32, bool mask)


def copy_bandwidth_gbs(nbytes, device):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_time_ms(lambda: dst.copy_(src), device=device, warmup=3, reps=20)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def bench_shape(B, T, device, rows, include_loops=True, skip=()):
    r, v, m = inputs(B, T, device)
    ref_adv = fastalign.gae(r, v, mask=m, gamma=GAMMA, lam=LAM, impl="torch")[0]
    base = None
    for name, fn in providers(device, include_loops).items():
        if name in skip:
            continue
        if name == "torch_vectorized" and T > 8192:
            continue  # the [T, T] weight matrix grows quadratically
        adv = fn(r, v, m)[0]
        err = float((torch.where(m, adv, 0.0) - ref_adv).abs().max())
        ms = median_time_ms(lambda fn=fn: fn(r, v, m), device=device, warmup=1, reps=5, max_seconds=20)
        row = {"provider": name, "B": B, "T": T, "ms": ms, "max_abs_err": err,
               "GB/s": gae_bytes(B, T) / (ms * 1e-3) / 1e9}
        if name == "trl_loop":
            base = ms
        rows.append(row)
        print(f"  {name:18s} B={B:5d} T={T:6d} {ms:10.3f} ms  err {err:.1e}", flush=True)
    for row in rows:
        if row["B"] == B and row["T"] == T and base is not None:
            row["speedup_vs_trl"] = base / row["ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="only the headline shape")
    ap.add_argument("--out", default=None, help=f"output folder (default {RESULTS})")
    args = ap.parse_args()
    device = args.device
    torch.manual_seed(0)
    env = environment(device)
    rows: list[dict] = []
    notes = []
    if device == "cpu":
        print(f"CPU, {torch.get_num_threads()} threads")
        bench_shape(256, 2048, device, rows)
        if not args.quick:
            for T in (256, 1024, 8192):
                bench_shape(256 if T <= 2048 else 64, T, device, rows)
        # A probe of the machine, not of fastalign: torch's own parallel elementwise add on the same shape.
        a, b = torch.randn(256, 2048), torch.randn(256, 2048)
        probe = {}
        for th in (torch.get_num_threads(), 1):
            before = torch.get_num_threads()
            torch.set_num_threads(th)
            probe[th] = median_time_ms(lambda: a + b, reps=20)
            torch.set_num_threads(before)
        notes.append("Fork-join probe (torch's own `a + b` on [256, 2048]): " +
                     ", ".join(f"{th} thread(s) {ms:.3f} ms" for th, ms in probe.items()) +
                     ". When the multi-thread figure is far above the single-thread one, the machine is "
                     "oversubscribed and every OpenMP parallel region waits for descheduled threads.")
        head = {r["provider"]: r for r in rows if r["B"] == 256 and r["T"] == 2048}
        for name in ("fastalign_cpp", "fastalign_cpp_1thread"):
            if name in head:
                notes.append(f"Headline B=256, T=2048: {name} is {head[name]['speedup_vs_trl']:.1f}x the TRL-style "
                             "loop (target >= 30x).")
    else:
        gbs = copy_bandwidth_gbs(gae_bytes(512, 4096), device)
        env["copy_GB/s"] = gbs
        print(f"copy bandwidth {gbs:.0f} GB/s")
        bench_shape(512, 4096, device, rows)
        if not args.quick:
            for B, T in ((8192, 128), (64, 32768)):
                bench_shape(B, T, device, rows, include_loops=False)
        for row in rows:
            if row["provider"].startswith("fastalign"):
                row["frac_copy_bw"] = row["GB/s"] / gbs
        notes.append(f"Copy bandwidth measured in the same run: {gbs:.0f} GB/s. Targets at B=512, T=4096: "
                     ">= 50% of it and >= 1000x the TRL-style loop.")
    notes.append("Timings are medians; the machine may be shared with other jobs (load average "
                 f"{os.getloadavg()[0]:.1f} at the end of the run on {os.cpu_count()} cores).")
    columns = ["provider", "B", "T", "ms", "speedup_vs_trl", "GB/s", "frac_copy_bw", "max_abs_err"]
    json_path, md_path = write_results("gae", rows, env, columns, notes="\n".join(notes), out_dir=args.out)
    png = md_path[:-3] + ".png"
    sweep = [r for r in rows if r["B"] == (256 if device == "cpu" else r["B"])]
    plot_lines(png, sweep, x="T", y="ms", series="provider", title=f"GAE on {env['device']}")
    print("\n".join(notes))
    print(f"wrote {json_path}, {md_path}, {png}")


if __name__ == "__main__":
    main()
