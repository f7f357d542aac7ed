"""The CPU target of linear_logprobs (DESIGN.md, Targets): the ``cpp`` impl against the naive materializing code.

Target: N=4096, D=256, V=131072, float32 — peak RSS growth at most 15% of the N x V float32 logits, and
forward+backward time at most 1.5x the naive code (``ops/logprobs/naive.py``: logits, log_softmax, gather,
autograd). Every (provider, mode) runs in a fresh Python process: its RSS growth is its peak RSS minus its RSS
after building the inputs, and its time the median of a few repetitions (wall clock).

    python bench/bench_logprobs_cpu.py                 # the target shape (several minutes on 2 cores)
    python bench/bench_logprobs_cpu.py --n 512 --v 16384 --reps 3   # a quick look

Writes ``bench/results/logprobs_cpu_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._harness import environment, subprocess_peak_rss_mib, write_results  # noqa: E402

CODE = """
import torch
from bench._harness import current_rss_mib, median_time_ms
from fastalign.ops.logprobs import naive
from fastalign.ops.logprobs.api import LogprobsParams
N, D, V, provider, mode, reps = {N}, {D}, {V}, {provider!r}, {mode!r}, {reps}
torch.manual_seed(0)
h = torch.randn(N, D)
w = torch.randn(V, D).div_(D ** 0.5)  # in place: a temporary copy would raise the peak before the baseline
y = torch.randint(0, V, (N,))
g = torch.randn(N)
params = LogprobsParams()
if provider == "cpp":
    from fastalign.ops.logprobs import cpu
    def run():
        if mode == "forward":
            return cpu.linear_logprobs_fwd(h, w, y, None, params)
        lse, zt, spz = cpu.linear_logprobs_fwd(h, w, y, None, params)
        return cpu.linear_logprobs_bwd(h, w, y, None, lse, spz, g, None, params)
else:
    def run():
        if mode == "forward":
            with torch.no_grad():
                return naive.linear_logprobs(h, w, y)
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        naive.linear_logprobs(hh, ww, y).backward(g)
        return hh.grad, ww.grad
base = current_rss_mib()
ms = median_time_ms(run, warmup=1, reps=reps, max_seconds=120)
print(json.dumps({{"ms": ms, "base_rss_mib": base}}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--v", type=int, default=131072)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="forward+backward,forward")
    args = ap.parse_args(argv)
    logits_mib = args.n * args.v * 4 / 2**20
    rows = []
    for mode in args.modes.split(","):
        for provider in ("naive", "cpp"):
            res = subprocess_peak_rss_mib(CODE.format(N=args.n, D=args.d, V=args.v, provider=provider, mode=mode,
                                                      reps=args.reps), timeout=3600)
            growth = res["peak_rss_mib"] - res["base_rss_mib"]
            row = {"provider": provider, "mode": mode, "N": args.n, "D": args.d, "V": args.v, "dtype": "float32",
                   "ms": res["ms"], "rss_growth_mib": growth, "growth_vs_logits": growth / logits_mib,
                   "load_avg_1min": os.getloadavg()[0]}
            rows.append(row)
            print(row, flush=True)
        naive_ms = next(r["ms"] for r in rows if r["provider"] == "naive" and r["mode"] == mode)
        for r in rows:
            if r["mode"] == mode:
                r["time_vs_naive"] = r["ms"] / naive_ms
    env = environment("cpu")
    notes = (f"Targets (cpp, forward+backward): rss_growth <= 0.15 x the N x V float32 logits ({logits_mib:.0f} MiB), "
             "time <= 1.5 x naive. Wall-clock medians; each provider and mode in a fresh process. The machine was "
             "shared with other jobs while this ran (see load_avg_1min): treat times as noisy.")
    paths = write_results("logprobs_cpu", rows, env,
                          ["provider", "mode", "N", "D", "V", "ms", "time_vs_naive", "rss_growth_mib",
                           "growth_vs_logits", "load_avg_1min"], notes=notes)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
