"""FusedLinearDPOLoss against its peers: forward + backward of the DPO (sigmoid) loss from final hidden states,
policy and on-the-fly reference (the reference's LM head evaluated without grad), stacked [chosen; rejected].

Providers (whichever are installed):
- ``5 matmuls``: the floor, the matmuls no fused loss can avoid (see :func:`floor_step`);
- ``naive``: ``hidden @ W.T`` logits materialized, ``log_softmax`` in float32, gather, masked sums;
- ``trl-style``: the same logits through TRL's own ``selective_log_softmax`` (TRL's ``DPOTrainer`` path);
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (chunked over pairs, a ``[T, V]`` logits block per pair);
- ``fastalign``: :func:`fastalign.fused_linear_dpo_loss` (``linear_logprobs`` with ``impl="auto"``; the row says
  which impl ran).

Figures (measured by the harness, bench/_harness.py): median time of forward + backward and peak memory beyond the
inputs. CPU: 2 pairs, T=256, D=256, V=32000 fp32, and a T sweep; GPU: 8 pairs, T=1024, D=4096, V=128256 bf16,
and a T sweep; ``--quick``: the first shape only.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench import _harness

TITLE = "FusedLinearDPOLoss: the DPO loss from hidden states, policy and reference"
COLUMNS = ["case", "provider", "ms", "spread", "vs_naive", "peak_mib", "mem_vs_naive", "vs_floor", "error"]
PLOT = {"x": "T", "y": "peak_mib", "series": "provider"}
BETA = 0.1
GPU_SHAPE = dict(pairs=8, T=1024, D=4096, V=128256, dtype="bfloat16")
CPU_SHAPE = dict(pairs=2, T=256, D=256, V=32000, dtype="float32")
GPU_SWEEP_T = (256, 512, 1024, 2048, 4096)
CPU_SWEEP_T = (64, 128, 256, 512)


def make_inputs(pairs, T, D, V, dtype, device, seed=0):
    """Policy hidden states [2B, T, D] and LM head (with grad), a reference's (without), labels with a prompt."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, dtype)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
    hidden = rand(2 * pairs, T, D).requires_grad_()
    weight = rand(V, D, scale=D ** -0.5).requires_grad_()
    ref_hidden, ref_weight = rand(2 * pairs, T, D), rand(V, D, scale=D ** -0.5)
    labels = torch.randint(0, V, (2 * pairs, T), generator=g).to(device)
    labels[:, : T // 4] = -100  # prompt tokens
    return dict(hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight, labels=labels)


def _materialized_dpo(x, token_logps):
    """Materialized logits for the policy and the reference, per-token logps by ``token_logps(logits, labels)``,
    masked sums, then the sigmoid DPO loss and its backward."""

    def sequence_logps(hidden, weight, labels):
        mask = labels != -100
        return (token_logps((hidden @ weight.T).float(), labels.clamp(min=0)) * mask).sum(-1)

    logps = sequence_logps(x["hidden"], x["weight"], x["labels"])
    with torch.no_grad():
        ref = sequence_logps(x["ref_hidden"], x["ref_weight"], x["labels"])
    B = logps.shape[0] // 2
    loss = -F.logsigmoid(BETA * ((logps[:B] - ref[:B]) - (logps[B:] - ref[B:]))).mean()
    loss.backward()
    return loss


def naive_step(x):
    """The plain code: ``log_softmax`` then ``gather``."""
    return _materialized_dpo(x, lambda logits, y: logits.log_softmax(-1).gather(-1, y[..., None])[..., 0])


def fastalign_step(x):
    import fastalign

    loss, _ = fastalign.fused_linear_dpo_loss(x["hidden"], x["weight"], x["labels"], ref_hidden=x["ref_hidden"],
                                              ref_weight=x["ref_weight"], beta=BETA, loss_type="sigmoid")
    loss.backward()
    return loss


_LIGER = {}


def liger_step(x):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    if "fn" not in _LIGER:
        _LIGER["fn"] = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True)
    out = _LIGER["fn"](x["weight"], x["hidden"], x["labels"], ref_input=x["ref_hidden"], ref_weight=x["ref_weight"])
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss


STEPS = {"naive": naive_step, "liger": liger_step, "fastalign": fastalign_step}


def trl_style_step(x):
    """TRL's path: the same materialized logits, per-token logps by TRL's own ``selective_log_softmax``."""
    from trl.trainer.utils import selective_log_softmax

    return _materialized_dpo(x, selective_log_softmax)


def floor_step(x, G):
    """The matmuls the fused loss cannot avoid: the policy's logits, their recomputation in the backward, the
    reference's logits, and the two gradient products (5 x 2 x tokens x D x V FLOPs)."""
    h, w = x["hidden"].flatten(0, 1), x["weight"]
    with torch.no_grad():
        h @ w.T, h @ w.T, x["ref_hidden"].flatten(0, 1) @ x["ref_weight"].T, G @ w, G.T @ h


STEPS = {"naive": naive_step, "trl-style": trl_style_step, "liger": liger_step, "fastalign": fastalign_step}


def providers() -> tuple[list[str], dict[str, str]]:
    names, missing = ["5 matmuls", "naive", "fastalign"], {}
    for name, module in (("trl-style", "trl"), ("liger", "liger_kernel")):
        if _harness._version(module) is None:
            missing[name] = f"not installed ({module})"
        else:
            names.append(name)
    return names, missing


def _zero_grads(x):
    for t in x.values():
        if isinstance(t, torch.Tensor):
            t.grad = None


def make(case: dict, provider: str, mode: str, device: str):
    """One forward + backward of ``provider``'s DPO loss on fresh inputs (the harness's contract)."""
    shape = {k: case[k] for k in ("pairs", "T", "D", "V", "dtype")}
    x = make_inputs(**shape, device=device)
    if provider == "5 matmuls":
        G = torch.randn(2 * case["pairs"] * case["T"], case["V"]).to(device, getattr(torch, case["dtype"]))
        return lambda: floor_step(x, G)
    step = STEPS[provider]
    return lambda: (_zero_grads(x), step(x))


def cases(device: str, quick: bool) -> list[dict]:
    if _harness.DRY_RUN:
        return [dict(case="1 pairs T=16 D=16 V=64 float32", pairs=1, T=16, D=16, V=64, dtype="float32")]
    cuda = torch.device(device).type == "cuda"
    shape = dict(GPU_SHAPE if cuda else CPU_SHAPE)
    sweep = () if quick else (GPU_SWEEP_T if cuda else CPU_SWEEP_T)
    shapes = [shape] + [dict(shape, T=t) for t in sweep if t != shape["T"]]
    return [dict(case=f"{s['pairs']} pairs T={s['T']} D={s['D']} V={s['V']} {s['dtype']}", **s) for s in shapes]


def run(device: str, quick: bool, out) -> list[dict]:
    names, missing = providers()
    rows = []
    for case in cases(device, quick):
        rows += _harness.compare(__name__, case, names, ["fwd+bwd"], device, rounds=2 if quick else 3,
                                 reps=2 if quick else 3, max_seconds=6 if quick else 30)
        rows += [dict(case, provider=n, mode="fwd+bwd", error=why) for n, why in missing.items()]
        _harness.partial(out, "dpo", rows)
    _harness.add_ratios(rows, floor={"fwd+bwd": "5 matmuls"}, baseline="naive")
    for r in rows:
        base = next((b for b in rows if b["case"] == r["case"] and b["provider"] == "naive"), {})
        if r.get("peak_mib") is not None and base.get("peak_mib") and r["provider"] != "5 matmuls":
            r["mem_vs_naive"] = r["peak_mib"] / base["peak_mib"]
        r["logits_fp32_mib"] = 2 * r["pairs"] * r["T"] * r["V"] * 4 / 2**20
    return rows


def notes(rows: list[dict]) -> str:
    from fastalign import resolve_impl
    from fastalign.ops.logprobs.api import IMPLS

    device = "cuda" if any("bfloat16" in r["case"] for r in rows) else "cpu"
    lines = [f"DPO sigmoid loss, forward + backward, policy + on-the-fly reference (no grad), stacked [chosen; "
             f"rejected], a quarter of each sequence prompt; fastalign's linear_logprobs impl here: "
             f"{resolve_impl('auto', torch.device(device), op='linear_logprobs', impls=IMPLS)}. vs_floor: time "
             "over 5 matmuls of the [2 pairs T, D] x [D, V] shape in the same run. logits_fp32_mib: one float32 "
             "logits tensor, for scale. GPU targets: fastalign's peak memory <= 0.25x and time <= 0.6x Liger's."]
    for case in dict.fromkeys(r["case"] for r in rows):
        got = {r["provider"]: r for r in rows if r["case"] == case and r.get("ms")}
        if "fastalign" in got and "liger" in got:
            f, li = got["fastalign"], got["liger"]
            mem = (f" and {f['peak_mib'] / li['peak_mib']:.2f}x its peak memory" if f.get("peak_mib") is not None
                   and li.get("peak_mib") else "")
            lines.append(f"{case}: fastalign takes {f['ms'] / li['ms']:.2f}x Liger's time{mem}.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(_harness.main(["dpo", *sys.argv[1:]]))
