"""``fastalign dpo``: the DPO family (every ``dpo_loss`` type) on preference pairs, one readable loop.

The reference is a frozen copy of the starting model, or its log-probabilities precomputed once
(``precompute_ref_log_probs``, cached on disk keyed by model and data), or a moving copy updated as
``ref = alpha * policy + (1 - alpha) * ref`` every ``ref_model_sync_steps`` (``sync_ref_model``: TR-DPO, and with
small steps the EMA reference of Xu et al. 2024). Reference-free types (simpo, cpo, orpo, sft) use none.
With ``model=embedded`` the run first fine-tunes the random init with ``sft_warmup_steps`` of SFT.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fastalign.hf import SequenceLogps
from fastalign.losses.dpo import REFERENCE_FREE, BCORunningMean, dpo_loss
from fastalign.rl.ppo import ema_update_
from fastalign.train.common import Run, exact_match
from fastalign.train.config import DPOConfig
from fastalign.train.data import Batcher, BatchStream, encode_pref_row, setup_data, to_device
from fastalign.train.model import load_model, load_policy, load_tokenizer, model_fingerprint
from fastalign.train.sft import warm_start


def loss_options(cfg: DPOConfig) -> dict:
    return {"beta": cfg.beta, "loss_type": cfg.loss_type, "loss_weights": cfg.loss_weights or None,
            "label_smoothing": cfg.label_smoothing, "simpo_gamma": cfg.simpo_gamma, "cpo_alpha": cfg.cpo_alpha,
            "bco_shift": cfg.bco_shift}


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
        return torch.load(path, map_location="cpu", weights_only=True)
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


class Reference:
    """The DPO reference: none (reference-free loss types), log-probabilities precomputed once
    (``precompute_ref_log_probs``), or a frozen or moving copy of the starting model (``sync_ref_model``)."""

    def __init__(self, cfg: DPOConfig, run: Run, start_model: str, resume_path, train, held_out, batcher: Batcher):
        self.cfg, self.lm, self.module, self.train, self.held_out = cfg, None, None, None, None
        if all(t in REFERENCE_FREE for t in cfg.loss_type):
            return
        moving = cfg.sync_ref_model and resume_path is not None
        lm = load_model(str(resume_path / "ref") if moving else start_model, seed=cfg.seed, dtype=cfg.torch_dtype,
                        attn_implementation=run.attn).eval()
        lm.requires_grad_(False)
        if cfg.precompute_ref_log_probs:
            cache = Path(cfg.output_dir) / "cache"
            self.train = cached_ref_logps(lm, train, run, batcher, cache)
            self.held_out = cached_ref_logps(lm, held_out, run, batcher, cache) if held_out else None
        else:
            self.lm, self.module = lm, SequenceLogps(lm).to(run.device)

    @torch.no_grad()
    def logps(self, idx, batch, run: Run):
        """``(chosen, rejected)`` reference log-probabilities of the pairs ``idx`` (in ``batch``), or None."""
        if self.train is not None:
            return self.train[idx, 0], self.train[idx, 1]
        if self.module is not None:
            return pair_logps(self.module, batch, run)[:2]
        return None

    def after_step(self, lm, done: int) -> None:
        """``sync_ref_model``: every ``ref_model_sync_steps``, ``ref = alpha * policy + (1 - alpha) * ref``."""
        if self.lm is not None and self.cfg.sync_ref_model and done % self.cfg.ref_model_sync_steps == 0:
            ema_update_(self.lm, lm, 1.0 - self.cfg.ref_model_mixup_alpha)

    def checkpoint_models(self):
        """What a checkpoint must hold for this reference to resume: the moving copy, if any."""
        return {"ref": self.lm} if self.lm is not None and self.cfg.sync_ref_model else None


def train_dpo(cfg: DPOConfig) -> dict:
    """Run DPO as configured; return the summary (also written to ``<output_dir>/summary.json``).

    Replaces TRL's ``DPOTrainer(model, ref_model, args=DPOConfig(...), train_dataset=...).train()``; policy and
    reference log-probabilities come from hidden states through ``linear_logprobs``, never from logits.

    Example:
        >>> summary = train_dpo(make_config(DPOConfig, {"model": "runs/sft/final", "beta": 0.1}, "dpo"))
        >>> summary["eval_rewards/accuracies after"]
    """
    run = Run(cfg, "dpo")
    start_model = warm_start(cfg, run)
    tok = load_tokenizer(cfg.tokenizer or start_model)
    train, held_out, prompts, skipped = setup_data(cfg, "pref", encode_pref_row, run.say, tok)
    resume_path, state = run.resume_point()
    lm = load_policy(start_model, cfg, resume_path, run.attn)
    run.check(lm)
    policy = run.wrap(SequenceLogps(lm))
    batcher = run.batcher(tok)
    ref = Reference(cfg, run, start_model, resume_path, train, held_out, batcher)
    opt, sched = run.optimizer(policy.parameters())
    stream = BatchStream(len(train), cfg.seed, rank=run.rank, world=run.world)
    bco = BCORunningMean() if "bco_pair" in cfg.loss_type and cfg.bco_shift else None

    def evaluate_now():
        return evaluate(policy, ref.module, held_out, ref.held_out, cfg, run, batcher)

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
            before.update(evaluate_now())
        if before:
            run.say(f"dpo: before training: {_brief(before)}")
        run.log(0, {k: v for k, v in before.items() if k.startswith("eval_")})

    def loss_of(_):
        idx = stream.next(cfg.per_device_train_batch_size)
        batch = batcher.pref([train[i] for i in idx])
        return dpo_batch_loss(policy, batch, ref.logps(idx, batch, run), cfg, run, bco)

    run.progress(start)
    for step in range(start, cfg.max_steps):
        metrics = run.accumulate(step, cfg.gradient_accumulation_steps, loss_of)  # the cycle's mean over pairs
        metrics.update(run.step(policy, opt, sched))
        done = step + 1
        ref.after_step(lm, done)
        if run.every(cfg.logging_steps, done):
            run.log(done, {**metrics, "epoch": stream.epoch}, show=("loss", "rewards/accuracies", "rewards/margins"))
        if held_out and run.every(cfg.eval_steps, done):
            run.log(done, evaluate_now(), show=("eval_rewards/accuracies",))
        if run.every(cfg.save_steps, done):
            run.save(done, lm, tok, opt, sched, stream.consumed,
                     {"before": before, "bco": None if bco is None else bco.state_dict()}, ref.checkpoint_models())
        run.advance(done)

    summary = {"steps": cfg.max_steps, "start_model": start_model, "final_model": str(run.save_final(lm, tok))}
    after = {k: v for k, v in run.history[-1].items() if k != "step"} if held_out and run.history else {}
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
