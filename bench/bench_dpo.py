"""FusedLinearDPOLoss against its peers: forward + backward of the DPO (sigmoid) loss from final hidden states,
policy and on-the-fly reference (the reference's LM head evaluated without grad), stacked [chosen; rejected].

Providers (whichever are installed):
- ``naive``: TRL-style, ``hidden @ W.T`` logits materialized, ``log_softmax`` in float32, gather, masked sums;
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (chunked over pairs, a ``[T, V]`` logits block per pair);
- ``fastalign``: :func:`fastalign.fused_linear_dpo_loss` (``linear_logprobs`` with ``impl="auto"``; the row says
  which impl ran).

Figures: median time of forward + backward, and peak memory beyond the inputs: ``torch.cuda.max_memory_allocated``
on a GPU, the peak RSS growth of a fresh subprocess per provider and shape on the CPU. Not assertions.

    python -m bench.bench_dpo                       # CPU: 2 pairs, T=256, D=256, V=32000 fp32, and a T sweep
    python -m bench.bench_dpo --device cuda         # GPU: 8 pairs, T=1024, D=4096, V=128256 bf16, and a T sweep
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from bench import _harness

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


def naive_step(x):
    """The TRL-style code: materialized logits for the policy and the reference, then the sigmoid DPO loss."""

    def sequence_logps(hidden, weight, labels):
        logp = (hidden @ weight.T).float().log_softmax(-1)
        mask = labels != -100
        return (logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)

    logps = sequence_logps(x["hidden"], x["weight"], x["labels"])
    with torch.no_grad():
        ref = sequence_logps(x["ref_hidden"], x["ref_weight"], x["labels"])
    B = logps.shape[0] // 2
    loss = -F.logsigmoid(BETA * ((logps[:B] - ref[:B]) - (logps[B:] - ref[B:]))).mean()
    loss.backward()
    return loss


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


def providers() -> list[str]:
    names = ["naive", "fastalign"]
    try:
        import liger_kernel.chunked_loss  # noqa: F401

        names.insert(1, "liger")
    except Exception:
        pass
    return names


def _zero_grads(x):
    for t in x.values():
        if isinstance(t, torch.Tensor):
            t.grad = None


def measure_here(provider, shape, device, reps):
    """Time and (on CUDA) peak memory of one provider in this process."""
    x = make_inputs(**shape, device=device)
    step = STEPS[provider]
    row = {}
    if torch.device(device).type == "cuda":
        _zero_grads(x)
        step(x)  # warm-up (compilation, autotuning) outside the peak measurement
        _zero_grads(x)
        row["peak_mib"] = _harness.cuda_peak_mib(lambda: step(x), device)
    row["ms"] = _harness.median_time_ms(lambda: (_zero_grads(x), step(x)), device=device, warmup=1, reps=reps)
    return row


def measure_subprocess(provider, shape, reps):
    """CPU: peak RSS growth of a fresh process over one forward + backward (after the inputs are built and the
    provider's lazy initialization is done on a tiny shape), then the median time there."""
    warm = "import liger_kernel.chunked_loss\n" if provider == "liger" else "import fastalign\n"
    code = (f"import torch\nfrom bench import bench_dpo as b, _harness as h\n{warm}"
            f"b.STEPS[{provider!r}](b.make_inputs(1, 4, 8, 16, {shape['dtype']!r}, 'cpu'))  # lazy init\n"
            f"x = b.make_inputs(**{shape!r}, device='cpu')\n"
            f"base = h.current_rss_mib()\n"
            f"b.STEPS[{provider!r}](x)\n"
            f"ms = h.median_time_ms(lambda: (b._zero_grads(x), b.STEPS[{provider!r}](x)), warmup=0, reps={reps})\n"
            f"print(json.dumps({{'base_rss_mib': base, 'ms': ms}}))\n")
    out = _harness.subprocess_peak_rss_mib(code)
    return {"ms": out["ms"], "peak_mib": out["peak_rss_mib"] - out["base_rss_mib"]}


def run(device, shapes, reps):
    from fastalign import resolve_impl

    impl = resolve_impl("auto", device, op="linear_logprobs",
                        impls=__import__("fastalign.ops.logprobs.api", fromlist=["IMPLS"]).IMPLS)
    rows = []
    for shape in shapes:
        tokens = 2 * shape["pairs"] * shape["T"]
        logits_mib = tokens * shape["V"] * 4 / 2**20
        for provider in providers():
            row = dict(provider=provider + (f" ({impl})" if provider == "fastalign" else ""), **shape,
                       logits_fp32_mib=round(logits_mib, 1))
            try:
                if torch.device(device).type == "cuda":
                    row.update(measure_here(provider, shape, device, reps))
                    torch.cuda.empty_cache()
                else:
                    row.update(measure_subprocess(provider, shape, reps))
            except (torch.OutOfMemoryError, RuntimeError) as e:
                row["error"] = "OOM" if "out of memory" in str(e).lower() else type(e).__name__
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    for shape_rows in _by_shape(rows):
        base = next((r for r in shape_rows if r["provider"] == "naive" and "ms" in r), None)
        for r in shape_rows:
            if base is not None and "ms" in r:
                r["time_vs_naive"] = round(r["ms"] / base["ms"], 3)
                if r.get("peak_mib") is not None and base.get("peak_mib"):
                    r["mem_vs_naive"] = round(r["peak_mib"] / base["peak_mib"], 3)
    return rows, impl


def _by_shape(rows):
    keys = dict.fromkeys((r["pairs"], r["T"], r["D"], r["V"], r["dtype"]) for r in rows)
    return [[r for r in rows if (r["pairs"], r["T"], r["D"], r["V"], r["dtype"]) == k] for k in keys]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--pairs", type=int)
    p.add_argument("--T", type=int)
    p.add_argument("--D", type=int)
    p.add_argument("--V", type=int)
    p.add_argument("--dtype")
    p.add_argument("--sweep-T", type=int, nargs="*", help="sequence lengths of the sweep (none: skip it)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    shape = dict(GPU_SHAPE if cuda else CPU_SHAPE)
    for k in ("pairs", "T", "D", "V", "dtype"):
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    sweep = (GPU_SWEEP_T if cuda else CPU_SWEEP_T) if args.sweep_T is None else args.sweep_T
    shapes = [shape] + [dict(shape, T=t) for t in sweep if t != shape["T"]]
    rows, impl = run(args.device, shapes, args.reps)
    env = _harness.environment(args.device)
    how = ("CUDA events, torch.cuda.max_memory_allocated beyond the inputs" if cuda else
           "wall clock; peak RSS growth of a fresh subprocess over the first forward+backward")
    notes = (f"DPO sigmoid loss, forward + backward, policy + on-the-fly reference. fastalign's linear_logprobs "
             f"impl: {impl}. Time: median ms ({how}). logits_fp32_mib: the size of one fp32 [2B*T, V] logits "
             f"tensor, for scale.")
    columns = ["provider", "pairs", "T", "D", "V", "dtype", "ms", "time_vs_naive", "peak_mib", "mem_vs_naive",
               "logits_fp32_mib", "error"]
    json_path, md_path = _harness.write_results("dpo", rows, env, columns, notes=notes)
    sweep_rows = [r for r in rows if r.get("peak_mib") is not None]
    if len({r["T"] for r in sweep_rows}) > 1:
        png = os.path.splitext(json_path)[0] + "_peak_mem.png"
        _harness.plot_lines(png, sweep_rows, x="T", y="peak_mib", series="provider",
                            title=f"DPO fwd+bwd peak memory, {shape['pairs']} pairs, D={shape['D']}, "
                                  f"V={shape['V']}, {shape['dtype']}")
    print(open(md_path).read())


if __name__ == "__main__":
    main()
