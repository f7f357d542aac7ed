"""``fastalign rm``: a Bradley-Terry reward model (decoder + scalar value head), one readable loop."""

from __future__ import annotations

import torch

from fastalign.losses.reward import reward_model_loss
from fastalign.train.common import Run
from fastalign.train.config import RMConfig
from fastalign.train.data import Batcher, BatchStream, encode_pref_row, to_device
from fastalign.train.model import (
    RewardModel,
    enable_checkpointing,
    load_model,
    load_tokenizer,
    load_value_head,
    save_value_head,
)
from fastalign.train.sft import setup_data


def pair_rewards(rm, batch: dict, run: Run):
    """``(chosen_rewards, rejected_rewards)`` ``[B]`` of a ``[2B, T]`` preference batch."""
    with run.autocast():
        scores = rm(**to_device({k: v for k, v in batch.items() if k != "labels"}, run.device))
    B = scores.shape[0] // 2
    return scores[:B], scores[B:]


@torch.no_grad()
def evaluate(rm, held_out, cfg: RMConfig, run: Run, batcher: Batcher) -> dict:
    rc, rr = [], []
    for i in range(0, len(held_out), 64):
        c, r = pair_rewards(rm, batcher.pref(held_out[i:i + 64]), run)
        rc.append(c)
        rr.append(r)
    loss, metrics = reward_model_loss(torch.cat(rc), torch.cat(rr),
                                      center_rewards_coefficient=cfg.center_rewards_coefficient or None)
    return {"eval_loss": float(loss), **{f"eval_{k}": float(v) for k, v in metrics.items()}}


def train_rm(cfg: RMConfig) -> dict:
    """Train a reward model as configured; return the summary (also in ``<output_dir>/summary.json``).

    The model is saved with ``save_pretrained`` plus ``value_head.safetensors`` beside it; load it back with
    ``RewardModel(load_model(path), load_value_head(path, hidden_size))``. Replaces TRL's ``RewardTrainer``.

    Example:
        >>> summary = train_rm(make_config(RMConfig, {"model": "runs/sft/final", "output_dir": "runs/rm"}, "rm"))
        >>> summary["eval_accuracy after"]
    """
    run = Run(cfg, "rm")
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    train, held_out, _, skipped = setup_data(cfg, "pref", encode_pref_row, run, tok)
    resume_path, state = run.resume_point()
    source = str(resume_path) if resume_path else cfg.model
    lm = load_model(source, seed=cfg.seed, dtype=cfg.torch_dtype, attn_implementation=run.attn)
    run.check_packing(lm)
    batcher = run.batcher(tok)
    if cfg.gradient_checkpointing:
        enable_checkpointing(lm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = None if source == "embedded" else load_value_head(source, lm.config.hidden_size)
        module = RewardModel(lm, head)
    rm = run.wrap(module)
    opt, sched = run.optimizer(rm.parameters())
    stream = BatchStream(len(train), cfg.seed, rank=run.rank, world=run.world)
    start = 0
    if state is not None:
        run.restore(state, opt, sched)
        start, stream.consumed = state["step"], state["consumed"]
    before = evaluate(rm, held_out, cfg, run, batcher) if held_out and state is None else {}
    if before:
        run.log(0, before)

    run.progress(start)
    for step in range(start, cfg.max_steps):
        accum = cfg.gradient_accumulation_steps
        sums: dict[str, float] = {}
        for _ in range(accum):
            batch = batcher.pref([train[i] for i in stream.next(cfg.per_device_train_batch_size)])
            loss, metrics = reward_model_loss(*pair_rewards(rm, batch, run),
                                              center_rewards_coefficient=cfg.center_rewards_coefficient or None)
            run.check_finite(loss, step)
            (loss / accum).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        grad_norm = run.step(rm, opt, sched)
        done = step + 1
        metrics = run.mean_metrics(sums)
        if run.every(cfg.logging_steps, done):
            run.log(done, {**metrics, "grad_norm": grad_norm, "learning_rate": sched.get_last_lr()[0],
                           "epoch": stream.epoch}, show=("loss", "accuracy"))
        if held_out and run.every(cfg.eval_steps, done):
            run.log(done, evaluate(rm, held_out, cfg, run, batcher), show=("eval_accuracy",))
        if run.every(cfg.save_steps, done):
            run.save(done, lm, tok, opt, sched, stream.consumed,
                     extra_models={"value_head": lambda d: save_value_head(module.value_head, d)})
        run.advance(done)

    final = run.save_final(lm, tok, lambda d: save_value_head(module.value_head, d))
    summary = {"steps": cfg.max_steps, "final_model": str(final)}
    if held_out:
        after = evaluate(rm, held_out, cfg, run, batcher)
        summary.update({"eval_accuracy before": before.get("eval_accuracy"),
                        "eval_accuracy after": after["eval_accuracy"], "eval_loss after": after["eval_loss"]})
    if skipped.rows:
        summary["skipped_rows"] = len(skipped.rows)
    return run.finish(summary, [["loss", "eval_loss"], ["accuracy", "eval_accuracy"], ["margin"]])
