"""The fused token-level PPO loss (``fastalign.losses.ppo.fused_linear_ppo_loss``) against the naive one.

``naive``: ``logits = hidden @ weight.T``, ``log_softmax``, gather, then ``ppo_policy_loss`` (what TRL-style code
does). ``fastalign``: ``fused_linear_ppo_loss`` (``linear_logprobs`` underneath, no logits). Both forward +
backward on ``N`` packed tokens, at several fractions of tokens whose ratio is clipped where the clip binds: their
gradient is exactly zero, and the ``cpp`` impl leaves those rows out of its backward, so its time falls with the
clip fraction. Measured by the harness (bench/_harness.py): CPU N=2048, D=256, V=32000 fp32 (``--quick``:
N=1024, V=16384); GPU N=8192, D=4096, V=128256 bf16.
"""

from __future__ import annotations

import sys

import torch

from bench import _harness
from fastalign.losses.ppo import fused_linear_ppo_loss, ppo_policy_loss
from fastalign.ops.logprobs import linear_logprobs
from fastalign.ops.logprobs.naive import linear_logprobs as naive_logprobs

TITLE = "The fused PPO policy loss from hidden states against the naive one"
COLUMNS = ["case", "provider", "ms", "spread", "vs_naive", "vs_no_clip", "peak_mib", "error"]


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


def make(case: dict, provider: str, mode: str, device: str):
    """One forward + backward of ``provider``'s loss on fresh inputs (the harness's contract)."""
    dtype = getattr(torch, case["dtype"])
    h, w, y, adv, old = make_inputs(case["N"], case["D"], case["V"], dtype, device, case["clip_fraction"])
    cu = torch.tensor([0, case["N"]], dtype=torch.int32, device=device)
    return make_step(provider, [h.requires_grad_(), w.requires_grad_()], y, old, adv, cu)


def cases(device: str, quick: bool) -> list[dict]:
    if _harness.DRY_RUN:
        return [dict(case="N=32 D=16 V=64 float32 clip=0.3", N=32, D=16, V=64, dtype="float32", clip_fraction=0.3)]
    cuda = torch.device(device).type == "cuda"
    N, D, V, dtype = (8192, 4096, 128256, "bfloat16") if cuda else (2048, 256, 32000, "float32")
    if quick and not cuda:
        N, V = 1024, 16384
    return [dict(case=f"N={N} D={D} V={V} {dtype} clip={f}", N=N, D=D, V=V, dtype=dtype, clip_fraction=f)
            for f in (0.0, 0.3, 0.6)]


def run(device: str, quick: bool, out) -> list[dict]:
    rows = []
    for case in cases(device, quick):
        rows += _harness.compare(__name__, case, ["naive", "fastalign"], ["fwd+bwd"], device,
                                 rounds=2 if quick else 3, reps=2 if quick else 3, max_seconds=4 if quick else 20)
        _harness.partial(out, "ppo", rows)
    _harness.add_ratios(rows, baseline="naive")
    base = next((r["ms"] for r in rows if r["provider"] == "fastalign" and r.get("ms") and r["clip_fraction"] == 0),
                None)
    for r in rows:
        if base and r.get("ms") and r["provider"] == "fastalign":
            r["vs_no_clip"] = r["ms"] / base
    return rows


def notes(rows: list[dict]) -> str:
    from fastalign import resolve_impl
    from fastalign.ops.logprobs.api import IMPLS

    device = torch.device("cuda" if any(r.get("dtype") == "bfloat16" for r in rows) else "cpu")
    return ("PPO clipped policy loss (token-mean), forward + backward on N packed tokens; clip: the fraction of "
            "tokens whose ratio is clipped where the clip binds (zero gradient). fastalign's linear_logprobs impl "
            f"here: {resolve_impl('auto', device, op='linear_logprobs', impls=IMPLS)}. vs_no_clip: fastalign's "
            "time over its own with nothing clipped.")


if __name__ == "__main__":
    raise SystemExit(_harness.main(["ppo", *sys.argv[1:]]))
