"""The fused token-level PPO loss (``fastalign.losses.ppo.fused_linear_ppo_loss``) against the naive one.

``naive``: ``logits = hidden @ weight.T``, ``log_softmax``, gather, then ``ppo_policy_loss`` (what TRL-style code
does). ``fastalign``: ``fused_linear_ppo_loss`` (``linear_logprobs`` underneath, no logits). Both forward +
backward on ``N`` packed tokens, at several fractions of tokens whose ratio is clipped where the clip binds: their
gradient is exactly zero, and the ``cpp`` impl leaves those rows out of its backward, so its time falls with the
clip fraction. Time is the median (CUDA events on GPU, wall clock on CPU). Figures, not assertions.

    python -m bench.bench_ppo                 # CPU defaults
    python -m bench.bench_ppo --device cuda --N 8192 --D 4096 --V 128256 --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

from bench import _harness
from fastalign.losses.ppo import fused_linear_ppo_loss, ppo_policy_loss
from fastalign.ops.logprobs import linear_logprobs
from fastalign.ops.logprobs.naive import linear_logprobs as naive_logprobs


def make_inputs(N: int, D: int, V: int, dtype, device, clip_fraction: float, seed: int = 0):
    """Hidden states, weight, targets, advantages and old logprobs such that ``clip_fraction`` of the tokens have
    ``ratio = exp(0.5 * sign(A))``: outside [0.8, 1.2] on the side where PPO's clip binds."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(device, dtype)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    adv = torch.randn(N, generator=g).to(device)
    with torch.no_grad():
        old = linear_logprobs(h, w, y).float()
    k = int(clip_fraction * N)
    old[:k] -= 0.5 * torch.sign(adv[:k])
    return h, w, y, adv, old


def naive_loss(h, w, y, old, adv, cu):
    lp = naive_logprobs(h, w, y)
    return ppo_policy_loss(lp, old, adv, cu_seqlens=cu)


def make_step(provider: str, leaves, y, old, adv, cu):
    """One forward + backward of ``provider``'s loss; returns its metrics."""

    def step():
        for t in leaves:
            t.grad = None
        if provider == "naive":
            loss, metrics = naive_loss(*leaves, y, old, adv, cu)
        else:
            loss, metrics = fused_linear_ppo_loss(*leaves, y, old, adv, cu_seqlens=cu)
        loss.backward()
        return metrics

    return step


def run(args) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cu = torch.tensor([0, args.N], dtype=torch.int32, device=device)
    rows = []
    for frac in args.clip_fractions:
        h, w, y, adv, old = make_inputs(args.N, args.D, args.V, dtype, device, frac)
        for provider in ("naive", "fastalign"):
            step = make_step(provider, [h.clone().requires_grad_(), w.clone().requires_grad_()], y, old, adv, cu)
            row = {"provider": provider, "N": args.N, "D": args.D, "V": args.V, "dtype": args.dtype}
            try:
                row["clipfrac"] = float(step()["policy/clipfrac_avg"])
                row["ms"] = _harness.median_time_ms(step, device=device, warmup=1, reps=args.reps)
            except Exception as e:  # noqa: BLE001 - a provider that cannot run (out of memory) is reported
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
    base = next((x["ms"] for x in rows if x["provider"] == "fastalign" and "ms" in x and x["clipfrac"] == 0.0), None)
    for r in rows:
        if base and "ms" in r and r["provider"] == "fastalign":
            r["time_vs_no_clip"] = r["ms"] / base
        naive = next((x.get("ms") for x in rows if x["provider"] == "naive" and x.get("clipfrac") == r.get("clipfrac")),
                     None)
        if naive and "ms" in r:
            r["time_vs_naive"] = r["ms"] / naive
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clip-fractions", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    rows = run(args)
    from fastalign import resolve_impl
    from fastalign.ops.logprobs.api import IMPLS

    impl = resolve_impl("auto", torch.device(args.device), op="linear_logprobs", impls=IMPLS)
    notes = (f"PPO clipped policy loss (token-mean), forward + backward, N packed tokens. fastalign's "
             f"linear_logprobs impl: {impl}. clipfrac: the measured fraction of clipped tokens. Time: median ms.")
    columns = ["provider", "N", "D", "V", "dtype", "clipfrac", "ms", "time_vs_no_clip", "time_vs_naive", "error"]
    _, md_path = _harness.write_results("ppo", rows, _harness.environment(args.device), columns, notes=notes)
    print(open(md_path).read())


if __name__ == "__main__":
    main()
