"""``fastalign sft``: supervised fine-tuning, loss on the completion tokens, one readable loop."""

from __future__ import annotations

from pathlib import Path

import torch

from fastalign.assets import EMBEDDED
from fastalign.hf import SequenceLogps
from fastalign.train.common import Run, exact_match
from fastalign.train.config import SFTConfig, warm_start_config
from fastalign.train.data import Batcher, BatchStream, encode_sft_row, setup_data, to_device
from fastalign.train.model import load_policy, load_tokenizer


def count_targets(batch: dict) -> int:
    """Number of scored (next-token) positions of a batch."""
    return int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def sft_eval_loss(policy, examples, run: Run, batch_size: int, batcher: Batcher) -> float:
    """Mean NLL per completion token over ``examples``."""
    total = tokens = 0.0
    for i in range(0, len(examples), batch_size):
        batch = batcher.sft(examples[i:i + batch_size])
        with run.autocast():
            logps, n = policy(**to_device(batch, run.device))
        total, tokens = total - float(logps.sum()), tokens + float(n.sum())
    return total / max(tokens, 1.0)


def train_sft(cfg: SFTConfig) -> dict:
    """Run SFT as configured; return the summary (also written to ``<output_dir>/summary.json``).

    Replaces TRL's ``SFTTrainer(model, args=SFTConfig(...), train_dataset=...).train()``; the loss is the token
    mean of ``-log p(completion token)`` over the accumulation cycle, computed without logits.

    Example:
        >>> summary = train_sft(make_config(SFTConfig, {"max_steps": 100, "output_dir": "runs/sft"}, "sft"))
        >>> summary["exact_match_after"], summary["final_model"]
    """
    run = Run(cfg, "sft")
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    encode = encode_sft_row if cfg.completion_only_loss else _full_sequence_loss
    train, held_out, prompts, skipped = setup_data(cfg, "sft", encode, run.say, tok)
    resume_path, state = run.resume_point()
    lm = load_policy(cfg.model, cfg, resume_path, run.attn)
    run.check(lm)
    policy = run.wrap(SequenceLogps(lm))
    batcher = run.batcher(tok)
    opt, sched = run.optimizer(policy.parameters())
    stream = BatchStream(len(train), cfg.seed, rank=run.rank, world=run.world)
    start, before = 0, None
    if state is not None:
        run.restore(state, opt, sched)
        start, stream.consumed, before = state["step"], state["consumed"], state.get("exact_match_before")
    elif prompts:
        before = exact_match(run.generator(lm), tok, prompts, cfg.max_new_tokens)
        run.say(f"sft: exact match of greedy generations before training: {before:.3f}")

    run.progress(start)
    for step in range(start, cfg.max_steps):
        micro = [batcher.sft([train[i] for i in stream.next(cfg.per_device_train_batch_size)])
                 for _ in range(cfg.gradient_accumulation_steps)]
        # the token-mean over the whole accumulation cycle and all ranks: each micro-batch adds its token sum
        (n_tokens,) = run.sum_all(sum(count_targets(mb) for mb in micro))

        def loss_of(i, micro=micro, n_tokens=n_tokens):
            with run.autocast():
                logps, _ = policy(**to_device(micro[i], run.device))
            return -logps.sum() * run.world / n_tokens, {}

        metrics = run.accumulate(step, len(micro), loss_of, reduce="sum")
        metrics.update(run.step(policy, opt, sched))
        done = step + 1
        if run.every(cfg.logging_steps, done):
            run.log(done, {**metrics, "num_tokens": n_tokens, "epoch": stream.epoch}, show=("loss",))
        if held_out and run.every(cfg.eval_steps, done):
            run.log(done, {"eval_loss": sft_eval_loss(policy, held_out, run, 256, batcher)},
                    show=("eval_loss",))
        if run.every(cfg.save_steps, done):
            run.save(done, lm, tok, opt, sched, stream.consumed, {"exact_match_before": before})
        run.advance(done)

    summary = {"steps": cfg.max_steps, "final_model": str(run.save_final(lm, tok))}
    if held_out:
        summary["eval_loss"] = run.history[-1].get("eval_loss") if run.history else None
    if prompts:
        after = exact_match(run.generator(lm), tok, prompts, cfg.max_new_tokens)
        summary.update(exact_match_before=before, exact_match_after=after)
    if skipped.rows:
        summary["skipped_rows"] = len(skipped.rows)
    return run.finish(summary, [["loss", "eval_loss"], ["grad_norm"], ["learning_rate"]])


def warm_start(cfg, run: Run) -> str:
    """The model a ``cfg.model=embedded`` run starts from: its random init fine-tuned on ``sft_data`` for
    ``sft_warmup_steps`` (:func:`fastalign.train.config.warm_start_config`: the SFT defaults for data, schedule and
    output, the run's own options for the rest), kept in ``<output_dir>/sft_warmup`` and reused when complete.
    A real model (or ``sft_warmup_steps=0``) starts as it is."""
    if cfg.model != EMBEDDED or cfg.sft_warmup_steps <= 0:
        return cfg.model
    out = Path(cfg.output_dir) / "sft_warmup"
    if (out / "summary.json").exists() and (out / "final" / "model.safetensors").exists():
        run.say(f"{run.command}: reusing the SFT warm start in {out}")
        return str(out / "final")
    sft_cfg = warm_start_config(cfg, model=EMBEDDED, data=cfg.sft_data, max_steps=cfg.sft_warmup_steps,
                                output_dir=str(out), resume="latest" if cfg.resume else "", save_steps=0,
                                eval_steps=0)
    run.say(f"{run.command}: model=embedded is a random init: SFT warm start for {cfg.sft_warmup_steps} steps "
            f"into {out}")
    return train_sft(sft_cfg)["final_model"]


def _full_sequence_loss(enc, row, where):
    """``completion_only_loss=False``: labels on every token, the prompt's too."""
    ids, _ = encode_sft_row(enc, row, where)
    return ids, list(ids)
