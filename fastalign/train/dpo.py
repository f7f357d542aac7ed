"""``fastalign dpo``: the DPO family (every ``dpo_loss`` type) on preference pairs, one readable loop.

The reference is a frozen copy of the starting model, or its log-probabilities precomputed once
(``precompute_ref_log_probs``, cached on disk keyed by model and data), or a moving copy updated as
``ref = alpha * policy + (1 - alpha) * ref`` every ``ref_model_sync_steps`` (``sync_ref_model``: TR-DPO, and with
small steps the EMA reference of Xu et al. 2024). Reference-free types (simpo, cpo, orpo, sft) use none.
With ``model=embedded`` the run first fine-tunes the random init with ``sft_warmup_steps`` of SFT.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from fastalign.losses.dpo import REFERENCE_FREE, BCORunningMean, dpo_loss
from fastalign.train.common import Run, exact_match
from fastalign.train.config import DPOConfig, SFTConfig, make_config
from fastalign.train.data import Batcher, BatchStream, encode_pref_row, to_device
from fastalign.train.model import (
    EMBEDDED,
    SequenceLogps,
    load_model,
    load_policy,
    load_tokenizer,
    model_fingerprint,
)
from fastalign.train.sft import setup_data, train_sft


def loss_options(cfg: DPOConfig) -> dict:
    return {"beta": cfg.beta, "loss_type": cfg.loss_type, "loss_weights": cfg.loss_weights or None,
            "label_smoothing": cfg.label_smoothing, "simpo_gamma": cfg.simpo_gamma, "cpo_alpha": cfg.cpo_alpha}


def pair_logps(module, batch: dict, run: Run):
    """``(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)`` of a ``[2B, T]`` preference batch."""
    with run.autocast():
        logps, n = module(**to_device(batch, run.device))
    B = logps.shape[0] // 2
    return logps[:B], logps[B:], n[:B], n[B:]


def dpo_batch_loss(policy, batch: dict, ref_logps, cfg: DPOConfig, run: Run, bco_state=None):
    """The DPO-family loss and metrics of one preference batch; ``ref_logps`` is ``(chosen, rejected)`` or None."""
    pc, pr, nc, nr = pair_logps(policy, batch, run)
    rc, rr = (None, None) if ref_logps is None else (ref_logps[0].to(pc), ref_logps[1].to(pr))
    return dpo_loss(pc, pr, rc, rr, chosen_lengths=nc, rejected_lengths=nr, bco_state=bco_state,
                    **loss_options(cfg))


@torch.no_grad()
def score_pairs(module, examples, run: Run, batch_size: int, batcher: Batcher) -> torch.Tensor:
    """``[n, 2]`` float32 (chosen, rejected) sequence log-probabilities of ``examples`` under ``module``."""
    out = []
    for i in range(0, len(examples), batch_size):
        pc, pr, _, _ = pair_logps(module, batcher.pref(examples[i:i + batch_size]), run)
        out.append(torch.stack([pc, pr], 1).float().cpu())
    return torch.cat(out)


def cached_ref_logps(ref_lm, examples, run: Run, batcher: Batcher, cache_dir: Path) -> torch.Tensor:
    """Reference log-probabilities of every pair, computed once and cached under a key of model and data."""
    h = hashlib.sha256(model_fingerprint(ref_lm).encode())
    for e in examples:
        h.update(repr(e).encode())
    path = cache_dir / f"ref_logps-{h.hexdigest()[:20]}.pt"
    if path.exists():
        return torch.load(path)
    scores = score_pairs(SequenceLogps(ref_lm).to(run.device), examples, run, 64, batcher)
    if run.main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(scores, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return scores


@torch.no_grad()
def evaluate(policy, ref, held_out, held_out_ref, cfg: DPOConfig, run: Run, batcher: Batcher) -> dict:
    """Loss and metrics over the whole held-out set, prefixed ``eval_`` (TRL's names)."""
    pol = score_pairs(policy, held_out, run, 64, batcher)
    lengths = torch.tensor([[sum(t != -100 for t in e[1][1:]), sum(t != -100 for t in e[3][1:])] for e in held_out])
    if held_out_ref is None and ref is not None:
        held_out_ref = score_pairs(ref, held_out, run, 64, batcher)
    rc, rr = (None, None) if held_out_ref is None else (held_out_ref[:, 0], held_out_ref[:, 1])
    loss, metrics = dpo_loss(pol[:, 0], pol[:, 1], rc, rr, chosen_lengths=lengths[:, 0],
                             rejected_lengths=lengths[:, 1], **loss_options(cfg))
    return {"eval_loss": float(loss), **{f"eval_{k}": float(v) for k, v in metrics.items()}}


@torch.no_grad()
def mix_into(ref_lm, lm, alpha: float) -> None:
    """``ref = alpha * policy + (1 - alpha) * ref``, parameter by parameter (a sharded FSDP2 parameter is
    gathered first: every rank calls this)."""
    for r, p in zip(ref_lm.parameters(), lm.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        r.lerp_(full.to(r.dtype), alpha)


def sft_warm_start(cfg: DPOConfig, run: Run) -> str:
    """Fine-tune the embedded random init on ``sft_data`` first (kept in ``<output_dir>/sft_warmup``)."""
    out = Path(cfg.output_dir) / "sft_warmup"
    if (out / "summary.json").exists() and (out / "final" / "model.safetensors").exists():
        run.say(f"dpo: reusing the SFT warm start in {out}")
        return str(out / "final")
    keep = ("max_length", "truncation_mode", "seed", "device", "bf16", "report_to_tensorboard", "plots",
            "progress_bar", "skip_bad_rows", "max_new_tokens", "cpu_threads", "distributed", "packing",
            "attn_implementation")
    sft_cfg = make_config(SFTConfig, {k: getattr(cfg, k) for k in keep}, "sft")
    sft_cfg = replace(sft_cfg, model=EMBEDDED, data=cfg.sft_data, max_steps=cfg.sft_warmup_steps,
                      output_dir=str(out), resume="latest" if cfg.resume else "",
                      eval_data="" if cfg.sft_data != "embedded" else sft_cfg.eval_data,
                      gen_eval_data=cfg.gen_eval_data, save_steps=0, eval_steps=0)
    run.say(f"dpo: model=embedded is a random init: SFT warm start for {cfg.sft_warmup_steps} steps into {out}")
    return train_sft(sft_cfg)["final_model"]


def train_dpo(cfg: DPOConfig) -> dict:
    """Run DPO as configured; return the summary (also written to ``<output_dir>/summary.json``).

    Replaces TRL's ``DPOTrainer(model, ref_model, args=DPOConfig(...), train_dataset=...).train()``; policy and
    reference log-probabilities come from hidden states through ``linear_logprobs``, never from logits.

    Example:
        >>> summary = train_dpo(make_config(DPOConfig, {"model": "runs/sft/final", "beta": 0.1}, "dpo"))
        >>> summary["eval_rewards/accuracies after"]
    """
    run = Run(cfg, "dpo")
    start_model = cfg.model
    if cfg.model == EMBEDDED and cfg.sft_warmup_steps > 0:
        start_model = sft_warm_start(cfg, run)
    tok = load_tokenizer(cfg.tokenizer or start_model)
    train, held_out, prompts, skipped = setup_data(cfg, "pref", encode_pref_row, run, tok)
    resume_path, state = run.resume_point()
    lm = load_policy(start_model, cfg, resume_path, run.attn)
    run.check_packing(lm)
    policy = run.wrap(SequenceLogps(lm))
    batcher = run.batcher(tok)

    # the reference: none (reference-free types), precomputed log-probabilities, or a (moving) copy
    ref_lm = ref = train_ref = held_out_ref = None
    if not all(t in REFERENCE_FREE for t in cfg.loss_type):
        moving = cfg.sync_ref_model and resume_path is not None
        ref_lm = load_model(str(resume_path / "ref") if moving else start_model, seed=cfg.seed,
                            dtype=cfg.torch_dtype, attn_implementation=run.attn).eval()
        ref_lm.requires_grad_(False)
        if cfg.precompute_ref_log_probs:
            cache = Path(cfg.output_dir) / "cache"
            train_ref = cached_ref_logps(ref_lm, train, run, batcher, cache)
            held_out_ref = cached_ref_logps(ref_lm, held_out, run, batcher, cache) if held_out else None
            ref_lm = None
        else:
            ref = SequenceLogps(ref_lm).to(run.device)

    opt, sched = run.optimizer(policy.parameters())
    stream = BatchStream(len(train), cfg.seed, rank=run.rank, world=run.world)
    bco = BCORunningMean() if "bco_pair" in cfg.loss_type else None
    start, before = 0, {}
    if state is not None:
        run.restore(state, opt, sched)
        start, stream.consumed, before = state["step"], state["consumed"], state["before"]
        if bco is not None and state.get("bco") is not None:
            bco.load_state_dict(state["bco"])
    else:
        if prompts:
            before["exact_match"] = exact_match(run.generator(lm), tok, prompts, cfg.max_new_tokens)
        if held_out:
            before.update(evaluate(policy, ref, held_out, held_out_ref, cfg, run, batcher))
        run.say(f"dpo: before training: {_brief(before)}")
        run.log(0, {k: v for k, v in before.items() if k.startswith("eval_")})

    run.progress(start)
    for step in range(start, cfg.max_steps):
        accum = cfg.gradient_accumulation_steps
        sums: dict[str, float] = {}
        for _ in range(accum):
            idx = stream.next(cfg.per_device_train_batch_size)
            batch = batcher.pref([train[i] for i in idx])
            if train_ref is not None:
                ref_logps = (train_ref[idx, 0], train_ref[idx, 1])
            elif ref is not None:
                with torch.no_grad():
                    ref_logps = pair_logps(ref, batch, run)[:2]
            else:
                ref_logps = None
            loss, metrics = dpo_batch_loss(policy, batch, ref_logps, cfg, run, bco)
            run.check_finite(loss, step)
            (loss / accum).backward()  # every micro-batch has as many pairs: the cycle's mean over pairs
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        grad_norm = run.step(policy, opt, sched)
        done = step + 1
        if ref_lm is not None and cfg.sync_ref_model and done % cfg.ref_model_sync_steps == 0:
            mix_into(ref_lm, lm, cfg.ref_model_mixup_alpha)
        metrics = run.mean_metrics(sums)
        if run.every(cfg.logging_steps, done):
            run.log(done, {**metrics, "grad_norm": grad_norm, "learning_rate": sched.get_last_lr()[0],
                           "epoch": stream.epoch}, show=("loss", "rewards/accuracies", "rewards/margins"))
        if held_out and run.every(cfg.eval_steps, done):
            run.log(done, evaluate(policy, ref, held_out, held_out_ref, cfg, run, batcher),
                    show=("eval_rewards/accuracies",))
        if run.every(cfg.save_steps, done):
            moving = {"ref": ref_lm} if ref_lm is not None and cfg.sync_ref_model else None
            run.save(done, lm, tok, opt, sched, stream.consumed,
                     {"before": before, "bco": None if bco is None else bco.state_dict()}, moving)
        run.advance(done)

    summary = {"steps": cfg.max_steps, "start_model": start_model, "final_model": str(run.save_final(lm, tok))}
    after = dict(run.history[-1]) if held_out and run.history else {}
    after.pop("step", None)
    if prompts:
        after["exact_match"] = exact_match(run.generator(lm), tok, prompts, cfg.max_new_tokens)
    for k in ("exact_match", "eval_rewards/accuracies", "eval_rewards/margins", "eval_loss"):
        if k in before:
            summary[f"{k} before"] = before[k]
        if k in after:
            summary[f"{k} after"] = after[k]
    if skipped.rows:
        summary["skipped_rows"] = len(skipped.rows)
    return run.finish(summary, [["loss", "eval_loss"], ["rewards/chosen", "rewards/rejected", "rewards/margins"],
                                ["rewards/accuracies", "eval_rewards/accuracies"]])


def _brief(metrics: dict) -> str:
    keys = ("exact_match", "eval_loss", "eval_rewards/accuracies")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


