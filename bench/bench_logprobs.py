"""linear_logprobs against every peer a user would pick instead, and against the device's matmul floor.

Providers (each where it runs and is installed):

- floors: ``matmul`` (one ``h @ W.T``, 2·N·D·V FLOPs: the floor of no-grad) and ``4 matmuls`` (``h @ W.T`` twice,
  ``G @ W`` and ``G.T @ h`` with a ready ``[N, V]`` G: the floor of forward+backward, whose backward recomputes
  the logits);
- ``naive`` (``log_softmax(h @ W.T).gather``, float32 logits), ``naive+entropy``, ``compile`` (``torch.compile``
  of naive);
- ``fastalign-<impl>`` and ``fastalign-<impl>+entropy`` for every implementation available on the device;
- ``torch-lce`` / ``torch-lce-chunked``: PyTorch's ``F.linear_cross_entropy(..., reduction="none")`` (the negated
  logprobs) on its reference path and on its chunked path (``options=torch.nn.LinearCrossEntropyOptions()``);
- ``liger``: Liger-Kernel's ``liger_fused_linear_cross_entropy(reduction="none")``;
- ``cce``, ``cce_exact`` (``filter_eps=None``), ``cce-torch_compile``: Cut Cross-Entropy's implementations;
- ``trl-chunked``: TRL's ``selective_log_softmax`` over 1024-row chunks of the logits (how TRL's trainers compute
  per-token log-probabilities without holding every row's float32 logits).

Modes: ``no-grad`` and ``fwd+bwd`` (the backward runs through the logprobs, and the entropy for ``+entropy``).
``vs_floor`` is the time over the floor measured in the same run, at the same shape and dtype.
"""

from __future__ import annotations

import sys

import torch

from bench import _harness

TITLE = "linear_logprobs: per-token log-probabilities from hidden states and the LM head"
COLUMNS = ["case", "provider", "mode", "ms", "spread", "peak_mib", "vs_floor", "vs_naive", "error"]
MODES = ("no-grad", "fwd+bwd")
FLOORS = {"no-grad": "matmul", "fwd+bwd": "4 matmuls"}
TARGETS = {"no-grad": 1.1, "fwd+bwd": 1.15}
GPU_ONLY = {"liger": "Liger-Kernel's kernels are Triton (GPU only)",
            "cce": "Cut Cross-Entropy's cce kernels are Triton (GPU only)",
            "cce_exact": "Cut Cross-Entropy's cce kernels are Triton (GPU only)"}


def cases(device: str, quick: bool) -> list[dict]:
    if _harness.DRY_RUN:
        return [dict(case="N=64 D=32 V=1000 fp32 softcap=30", N=64, D=32, V=1000, dtype="float32", softcap=30.0)]
    if torch.device(device).type == "cuda":
        if quick:
            return [dict(case="N=2048 D=2048 V=32768 bf16", N=2048, D=2048, V=32768, dtype="bfloat16", softcap=None)]
        return [dict(case="N=8192 D=4096 V=128256 bf16", N=8192, D=4096, V=128256, dtype="bfloat16", softcap=None),
                dict(case="N=8192 D=2304 V=256000 bf16 softcap=30", N=8192, D=2304, V=256000, dtype="bfloat16",
                     softcap=30.0)]
    if quick:
        return [dict(case="N=512 D=256 V=16384 fp32", N=512, D=256, V=16384, dtype="float32", softcap=None)]
    return [dict(case="N=4096 D=256 V=131072 fp32", N=4096, D=256, V=131072, dtype="float32", softcap=None)]


# ------------------------------------------------------------------------------------------------ providers

def _naive(h, w, t, softcap=None, entropy=False):
    logits = (h @ w.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, t[:, None]).squeeze(-1)
    if entropy:
        return lp, -(logp.exp() * logp).sum(-1)
    return lp


def _fastalign(impl, entropy):
    from fastalign import linear_logprobs

    return lambda h, w, t, c: linear_logprobs(h, w, t, softcap=c, return_entropy=entropy, impl=impl)


def _torch_lce(chunked):
    import torch.nn.functional as F

    def run(h, w, t, c):
        if c is not None:
            raise NotImplementedError("F.linear_cross_entropy has no softcap option")
        options = torch.nn.LinearCrossEntropyOptions() if chunked else None
        return -F.linear_cross_entropy(h, w, t, reduction="none", ignore_index=-100, options=options)

    return run


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def run(h, w, t, c):
        loss = liger_fused_linear_cross_entropy(h, w, t, reduction="none", softcap=c)
        return -(loss[0] if isinstance(loss, tuple) else loss)

    return run


def _cce(impl, filter_eps="high"):
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, t, c: -linear_cross_entropy(h, w, t, softcap=c, reduction="none", impl=impl,
                                                    filter_eps=filter_eps)


def _trl_chunked(rows=1024):
    from trl.trainer.utils import selective_log_softmax

    def run(h, w, t, c):
        parts = []
        for i in range(0, h.shape[0], rows):
            logits = (h[i:i + rows] @ w.T).float()
            if c is not None:
                logits = c * torch.tanh(logits / c)
            parts.append(selective_log_softmax(logits, t[i:i + rows]))
        return torch.cat(parts)

    return run


def _installed(module: str) -> bool:
    return _harness._version(module) is not None


def providers(device: str) -> tuple[list[str], dict[str, str]]:
    """(the providers that run here, {provider: why not} for the peers that do not)."""
    from fastalign import availability
    from fastalign.ops.logprobs.api import IMPLS

    names, missing = ["naive", "naive+entropy", "compile"], {}
    for impl in IMPLS:
        ok, why = availability(impl, device)
        if ok and not (impl == "triton" and torch.device(device).type == "cpu"):
            names += [f"fastalign-{impl}"] + ([f"fastalign-{impl}+entropy"] if impl != "torch" else [])
        elif impl != "triton":
            missing[f"fastalign-{impl}"] = f"unavailable: {why}"
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        names += ["torch-lce", "torch-lce-chunked"]
    else:
        missing["torch-lce"] = f"torch {torch.__version__} has no F.linear_cross_entropy"
    peers = {"liger": ("liger_kernel", ["liger"]), "cce": ("cut_cross_entropy", ["cce", "cce_exact",
                                                                                   "cce-torch_compile"]),
             "trl": ("trl", ["trl-chunked"])}
    for module, group in peers.values():
        for name in group:
            if not _installed(module):
                missing[name] = f"not installed ({module})"
            elif torch.device(device).type == "cpu" and name in GPU_ONLY:
                missing[name] = f"unavailable on cpu: {GPU_ONLY[name]}"
            else:
                names.append(name)
    return names, missing


def _fn(provider: str):
    if provider in ("naive", "naive+entropy"):
        return lambda h, w, t, c: _naive(h, w, t, c, entropy=provider.endswith("entropy"))
    if provider == "compile":
        compiled = torch.compile(_naive)
        return lambda h, w, t, c: compiled(h, w, t, c)
    if provider.startswith("fastalign-"):
        impl, _, ent = provider[len("fastalign-"):].partition("+")
        return _fastalign(impl, bool(ent))
    make_fn = {"torch-lce": lambda: _torch_lce(False), "torch-lce-chunked": lambda: _torch_lce(True),
               "liger": _liger, "cce": lambda: _cce("cce"), "cce_exact": lambda: _cce("cce", None),
               "cce-torch_compile": lambda: _cce("torch_compile"), "trl-chunked": _trl_chunked}[provider]
    return make_fn()  # imports the peer now, outside the measured calls


def _combined(out):
    """What the backward starts from: the logprobs, plus the entropy for providers that return it."""
    return out[0] + out[1] if isinstance(out, tuple) else out


def make(case: dict, provider: str, mode: str, device: str):
    """One measured call of ``provider`` in ``mode`` on fresh inputs of ``case`` (the harness's contract)."""
    N, D, V, c = case["N"], case["D"], case["V"], case["softcap"]
    dtype = getattr(torch, case["dtype"])
    g = torch.Generator().manual_seed(0)
    grad = mode != "no-grad"
    h = torch.randn(N, D, generator=g).to(device, dtype)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device, dtype)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    if provider == "matmul":
        def step():
            with torch.no_grad():
                h @ w.T
        return step
    if provider == "4 matmuls":
        G = torch.randn(N, V, generator=g).to(device, dtype)

        def step():
            with torch.no_grad():
                h @ w.T, h @ w.T, G @ w, G.T @ h
        return step
    fn = _fn(provider)
    h.requires_grad_(grad)
    w.requires_grad_(grad)
    if not grad:
        def step():
            with torch.no_grad():
                fn(h, w, t, c)
        return step
    ones = torch.ones(N, device=device)

    def step():
        _combined(fn(h, w, t, c)).backward(ones)
        h.grad = w.grad = None
    return step


def run(device: str, quick: bool, out) -> list[dict]:
    names, missing = providers(device)
    if quick:
        missing.update({n: "skipped in --quick: compiles for about 40 s on the CPU" for n in names
                        if n == "cce-torch_compile" and torch.device(device).type == "cpu"})
        names = [n for n in names if n not in missing]
    rows = []
    for case in cases(device, quick):
        for mode in MODES:
            rows += _harness.compare(__name__, case, [FLOORS[mode], *names], [mode], device,
                                     rounds=2 if quick else 3, reps=2 if quick else 3,
                                     max_seconds=8 if quick else 60)
            rows += [dict(case, provider=n, mode=mode, error=why) for n, why in missing.items()]
        _harness.add_ratios(rows, floor=FLOORS, baseline="naive")
        _harness.partial(out, "logprobs", rows)
    return rows


def notes(rows: list[dict]) -> str:
    lines = ["vs_floor: time over the floor measured in the same run (no-grad: one matmul h @ W.T; fwd+bwd: "
             "four matmuls of the same shape). Targets for fastalign: no-grad <= 1.1x, fwd+bwd <= 1.15x. "
             "peak_mib: peak memory beyond the inputs (CPU: peak RSS growth of the provider's own fresh process "
             "over a call after a warm-up one; GPU: the CUDA allocator)."]
    for r in rows:
        if (r["provider"].startswith("fastalign-") and "+" not in r["provider"] and r["provider"] != "fastalign-torch"
                and r.get("vs_floor")):  # the torch impl is the reference, not a fast path
            target = TARGETS[r["mode"]]
            verdict = "met" if r["vs_floor"] <= target else "missed"
            lines.append(f"{r['case']}, {r['mode']}: {r['provider']} {r['vs_floor']:.2f}x its floor "
                         f"(target <= {target}x: {verdict}).")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(_harness.main(["logprobs", *sys.argv[1:]]))
