"""``fastalign rm``: a Bradley-Terry reward model (decoder + scalar value head), one readable loop."""

from __future__ import annotations

import torch

from fastalign.hf import RewardModel, ValueHead
from fastalign.losses.reward import reward_model_loss
from fastalign.train.common import Run
from fastalign.train.config import RMConfig
from fastalign.train.data import Batcher, BatchStream, encode_pref_row, setup_data, to_device
from fastalign.train.model import enable_checkpointing, load_model, load_tokenizer


def pair_rewards(rm, batch: dict, run: Run):
    """``(chosen_rewards, rejected_rewards)`` ``[B]`` of a ``[2B, T]`` preference batch."""
    with run.autocast():
        scores = rm(**to_device(batch, run.device))
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
    ``RewardModel(load_model(path), ValueHead.load(path, hidden_size))`` (:mod:`fastalign.hf`).
    Replaces TRL's ``RewardTrainer``.

    Example:
        >>> summary = train_rm(make_config(RMConfig, {"model": "runs/sft/final", "output_dir": "runs/rm"}, "rm"))
        >>> summary["eval_accuracy after"]
    """
    run = Run(cfg, "rm")
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    train, held_out, _, skipped = setup_data(cfg, "pref", encode_pref_row, run.say, tok)
    resume_path, state = run.resume_point()
    source = str(resume_path) if resume_path else cfg.model
    lm = load_model(source, seed=cfg.seed, dtype=cfg.torch_dtype, attn_implementation=run.attn)
    run.check(lm)
    batcher = run.batcher(tok)
    if cfg.gradient_checkpointing:
        enable_checkpointing(lm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = None if source == "embedded" else ValueHead.load(source, lm.config.hidden_size)
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
        def loss_of(_):
            batch = batcher.pref([train[i] for i in stream.next(cfg.per_device_train_batch_size)])
            return reward_model_loss(*pair_rewards(rm, batch, run),
                                     center_rewards_coefficient=cfg.center_rewards_coefficient or None)

        metrics = run.accumulate(step, cfg.gradient_accumulation_steps, loss_of)
        metrics.update(run.step(rm, opt, sched))
        done = step + 1
        if run.every(cfg.logging_steps, done):
            run.log(done, {**metrics, "epoch": stream.epoch}, show=("loss", "accuracy"))
        if held_out and run.every(cfg.eval_steps, done):
            run.log(done, evaluate(rm, held_out, cfg, run, batcher), show=("eval_accuracy",))
        if run.every(cfg.save_steps, done):
            run.save(done, lm, tok, opt, sched, stream.consumed,
                     extra_models={"value_head": module.value_head.save})
        run.advance(done)

    final = run.save_final(lm, tok, module.value_head.save)
    summary = {"steps": cfg.max_steps, "final_model": str(final)}
    if held_out:
        after = evaluate(rm, held_out, cfg, run, batcher)
        summary.update({"eval_accuracy before": before.get("eval_accuracy"),
                        "eval_accuracy after": after["eval_accuracy"], "eval_loss after": after["eval_loss"]})
    if skipped.rows:
        summary["skipped_rows"] = len(skipped.rows)
    return run.finish(summary, [["loss", "eval_loss"], ["accuracy", "eval_accuracy"], ["margin"]])
