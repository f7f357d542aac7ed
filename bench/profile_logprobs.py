"""Where the ``cpp`` linear_logprobs spends its time against its matmul floors: timing sections, in one process.

    python -m bench.profile_logprobs [--N 512 --D 256 --V 16384] [--out DIR]

Sections (medians of interleaved rounds, each at 2 torch threads and at 1):

- ``cpp fwd`` / ``cpp bwd``: the two launchers of ``fastalign.ops.logprobs.cpu`` (the backward alone, from the
  forward's saved statistics);
- ``1 matmul``: ``h @ W.T`` (the no-grad floor); ``3 matmuls``: ``h @ W.T``, ``G @ W``, ``G.T @ h`` with a ready
  ``[N, V]`` G (what the backward must do at least);
- ``tiled fwd gemms`` / ``tiled bwd gemms``: the same FLOPs cut the way the kernel cuts them (row blocks of 64,
  vocabulary tiles of 512: per tile ``[64, D] x [D, 512]``, and in the backward also ``[64, 512] x [512, D]`` into
  dh and the rank-64 update ``[512, 64] x [64, D]`` into dW), in plain torch with no softmax at all: the price of
  the tile shapes alone, which batch invariance fixes (a row's gemm must not depend on N).

Writes ``logprobs_profile.json`` (and ``.md``) into ``--out`` (default: today's ``bench/results/cpu-<date>/``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bench import _harness

BN, BV = 64, 512


def sections(N: int, D: int, V: int) -> dict:
    from fastalign.ops.logprobs import cpu
    from fastalign.ops.logprobs.api import LogprobsParams

    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    y = torch.randint(0, V, (N,), generator=g)
    G = torch.randn(N, V, generator=g)
    grad = torch.ones(N)
    params = LogprobsParams()
    lse, _, spz = cpu.linear_logprobs_fwd(h, w, y, None, params)
    dh, dw = torch.zeros(N, D), torch.zeros(V, D)
    tile = torch.empty(BN, BV)

    def tiled(backward: bool):
        for n0 in range(0, N, BN):
            hb = h[n0:n0 + BN]
            for v0 in range(0, V, BV):
                wt = w[v0:v0 + BV]
                torch.mm(hb, wt.T, out=tile[:hb.shape[0], :wt.shape[0]])
                if backward:
                    z = tile[:hb.shape[0], :wt.shape[0]]
                    dh[n0:n0 + BN].addmm_(z, wt)
                    dw[v0:v0 + BV].addmm_(z.T, hb)

    return {"cpp fwd": lambda: cpu.linear_logprobs_fwd(h, w, y, None, params),
            "cpp bwd": lambda: cpu.linear_logprobs_bwd(h, w, y, None, lse, spz, grad, None, params),
            "1 matmul": lambda: h @ w.T,
            "3 matmuls": lambda: (h @ w.T, G @ w, G.T @ h),
            "tiled fwd gemms": lambda: tiled(False),
            "tiled bwd gemms": lambda: tiled(True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=512)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--V", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=str)
    args = p.parse_args(argv)
    fns = sections(args.N, args.D, args.V)
    rows = []
    for threads in (torch.get_num_threads(), 1):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        samples = {k: [] for k in fns}
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for k, fn in fns.items():
                samples[k] += _harness.sample_ms(fn, reps=1)
        torch.set_num_threads(before)
        for k, s in samples.items():
            rows.append({"case": f"N={args.N} D={args.D} V={args.V} fp32", "threads": threads, "section": k,
                         **_harness.summarize(s)})
    for r in rows:
        ref = {"cpp fwd": "1 matmul", "cpp bwd": "3 matmuls", "tiled fwd gemms": "1 matmul",
               "tiled bwd gemms": "3 matmuls"}.get(r["section"])
        base = next((b["ms"] for b in rows if b["section"] == ref and b["threads"] == r["threads"]), None)
        if base:
            r["vs_floor"] = r["ms"] / base
    env = _harness.environment("cpu")
    out = _harness.Path(args.out) if args.out else _harness.default_out("cpu")
    out.mkdir(parents=True, exist_ok=True)
    columns = ["case", "threads", "section", "ms", "spread", "vs_floor"]
    record = {"benchmark": "logprobs_profile", "title": __doc__.splitlines()[0], "environment": env,
              "command": "python -m bench.profile_logprobs " + " ".join(argv if argv is not None else sys.argv[1:]),
              "columns": columns, "rows": rows}
    (out / "logprobs_profile.json").write_text(json.dumps(record, indent=1) + "\n")
    table = _harness.markdown_table(rows, columns)
    (out / "logprobs_profile.md").write_text(f"# {record['title']}\n\n{_harness.header_line(env)}\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
