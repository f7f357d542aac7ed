"""gae against the Python loops of popular trainers, with the masks users pass, and against copy bandwidth.

Providers:

- ``copy``: ``dst.copy_(src)`` of as many bytes as GAE must move (rewards, values and a bool mask in; advantages
  and returns out: 17 bytes a token): the floor;
- ``trl-loop``: TRL's style, padding zero-filled, then a reverse loop over time doing a ``[B]``-wide step each;
- ``verl-loop``: verl's style, the same loop blending state and next value with the float mask at every step;
- ``torch-vectorized``: the deltas vectorized and the discounted reverse sum as one ``[T, T]`` matmul (O(T^2));
- ``fastalign-<impl> mask=<dtype>``: ``fastalign.gae`` with a ``bool``, ``float32`` and ``int64`` mask (a Hugging
  Face ``attention_mask`` is int64) for every implementation available on the device (triton only on a GPU).

Right-padded batches, lengths uniform in ``[T/2, T]``, float32, gamma 1, lambda 0.95. The loops get the float
mask. ``vs_floor``: time over the copy's; ``x_trl``: the TRL-style loop's time over this one's.
"""

from __future__ import annotations

import sys

import torch

from bench import _harness

TITLE = "gae: generalized advantage estimation on padded [B, T] batches"
COLUMNS = ["case", "provider", "ms", "spread", "x_trl", "vs_floor", "GB/s", "error"]
PLOT = {"x": "T", "y": "ms", "series": "provider"}
GAMMA, LAM = 1.0, 0.95
MASKS = ("bool", "float32", "int64")
BYTES_PER_TOKEN = 4 + 4 + 1 + 4 + 4


def cases(device: str, quick: bool) -> list[dict]:
    if _harness.DRY_RUN:
        return [dict(case="B=4 T=64", B=4, T=64)]
    if torch.device(device).type == "cuda":
        shapes = [(512, 4096)] + ([] if quick else [(8192, 128), (64, 32768)])
    else:
        shapes = [(256, 2048)] + ([] if quick else [(256, 256), (256, 1024), (64, 8192)])
    return [dict(case=f"B={B} T={T}", B=B, T=T) for B, T in shapes]


def trl_loop(rewards, values, mask):
    """TRL's PPO style: padding zero-filled, then ``A_t = delta_t + gamma lam A_{t+1}`` backwards over time."""
    pad = mask == 0
    rewards, values = rewards.masked_fill(pad, 0.0), values.masked_fill(pad, 0.0)
    T = rewards.shape[1]
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in range(T - 1, -1, -1):
        following = values[:, t + 1] if t + 1 < T else 0.0
        running = rewards[:, t] + GAMMA * following - values[:, t] + GAMMA * LAM * running
        out.append(running)
    adv = torch.stack(out[::-1], 1)
    return adv, adv + values


def verl_loop(rewards, values, mask):
    """verl's style: state and next value carried across masked positions by blending with the float mask."""
    m = mask.to(rewards.dtype)
    B, T = rewards.shape
    following = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    running = torch.zeros_like(following)
    adv = torch.empty_like(rewards)
    for t in range(T - 1, -1, -1):
        new = rewards[:, t] + GAMMA * following - values[:, t] + GAMMA * LAM * running
        following = m[:, t] * values[:, t] + (1 - m[:, t]) * following
        running = m[:, t] * new + (1 - m[:, t]) * running
        adv[:, t] = running
    return adv, adv + values


def torch_vectorized(rewards, values, mask):
    """Deltas at once, then ``A = delta @ Wt`` with ``Wt[s, t] = (gamma lam)^(s - t)`` for ``s >= t``."""
    m = mask.to(rewards.dtype)
    rewards, values = rewards * m, values * m
    T = rewards.shape[1]
    delta = rewards + GAMMA * torch.nn.functional.pad(values[:, 1:], (0, 1)) - values
    i = torch.arange(T, device=rewards.device, dtype=rewards.dtype)
    gap = i[:, None] - i[None, :]  # [s, t] = s - t
    weights = torch.where(gap >= 0, (GAMMA * LAM) ** gap.clamp(min=0), torch.zeros((), device=rewards.device))
    adv = delta @ weights
    return adv, adv + values


def providers(device: str) -> list[str]:
    from fastalign import availability

    names = ["trl-loop", "verl-loop", "torch-vectorized"]
    for impl in ("torch", "cpp", "triton", "cuda"):
        if impl == "triton" and torch.device(device).type == "cpu":
            continue  # the interpreter is a test path, not a performance one
        if availability(impl, device)[0]:
            names += [f"fastalign-{impl} mask={m}" for m in (MASKS if impl != "torch" else ("bool",))]
    return names


def make(case: dict, provider: str, mode: str, device: str):
    """One measured call (the harness's contract)."""
    import fastalign

    B, T = case["B"], case["T"]
    g = torch.Generator().manual_seed(0)
    if provider == "copy":
        src = torch.ones(B * T * BYTES_PER_TOKEN // 8, device=device, dtype=torch.float32)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    valid = torch.arange(T)[None, :] < lengths[:, None]
    rewards = (torch.randn(B, T, generator=g) * valid).to(device)
    values = (torch.randn(B, T, generator=g) * valid).to(device)
    if provider.startswith("fastalign-"):
        impl, _, mask_dtype = provider[len("fastalign-"):].partition(" mask=")
        mask = valid.to(getattr(torch, mask_dtype)).to(device)
        return lambda: fastalign.gae(rewards, values, mask=mask, gamma=GAMMA, lam=LAM, impl=impl)
    mask = valid.float().to(device)
    fn = {"trl-loop": trl_loop, "verl-loop": verl_loop, "torch-vectorized": torch_vectorized}[provider]
    return lambda: fn(rewards, values, mask)


def run(device: str, quick: bool, out) -> list[dict]:
    rows = []
    for case in cases(device, quick):
        names = providers(device)
        if case["T"] > 8192:
            names.remove("torch-vectorized")  # its [T, T] matrix grows with the square of T
        rows += _harness.compare(__name__, case, ["copy", *names], ["fwd"], device, rounds=3,
                                 reps=20, max_seconds=2 if quick else 6)
        _harness.partial(out, "gae", rows)
    _harness.add_ratios(rows, floor={"fwd": "copy"}, key=lambda r: r["case"])
    trl = {r["case"]: r["ms"] for r in rows if r["provider"] == "trl-loop" and r.get("ms")}
    for r in rows:
        if r.get("ms") and r["provider"] != "copy":
            if r["case"] in trl:
                r["x_trl"] = trl[r["case"]] / r["ms"]
            r["GB/s"] = r["B"] * r["T"] * BYTES_PER_TOKEN / (r["ms"] * 1e-3) / 1e9
    return rows


def notes(rows: list[dict]) -> str:
    lines = ["x_trl: speed-up over the TRL-style loop in the same run. vs_floor: time over the copy of the same "
             "bytes (1/vs_floor is the fraction of copy bandwidth reached). Targets: CPU cpp >= 30x the TRL "
             "loop with every mask dtype, float32 and int64 within 1.5x of bool; GPU >= 50% of copy bandwidth "
             "and >= 1000x the TRL loop."]
    for case in dict.fromkeys(r["case"] for r in rows):
        for impl in ("cpp", "triton", "cuda"):
            got = {r["provider"].split("mask=")[1]: r for r in rows if r["case"] == case and r.get("ms")
                   and r["provider"].startswith(f"fastalign-{impl} mask=")}
            if "bool" in got:
                parts = [f"{m} {got[m]['ms']:.3g} ms ({got[m].get('x_trl', float('nan')):.0f}x TRL, "
                         f"{got[m]['ms'] / got['bool']['ms']:.2f}x bool)" for m in MASKS if m in got]
                lines.append(f"{case}, {impl}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(_harness.main(["gae", *sys.argv[1:]]))
