"""``fastalign sft``: supervised fine-tuning, loss on the completion tokens, one readable loop."""

from __future__ import annotations

import torch

from fastalign.train.common import Run, exact_match
from fastalign.train.config import SFTConfig
from fastalign.train.data import (
    Batcher,
    BatchStream,
    Encoder,
    Skipped,
    encode_sft_row,
    load_examples,
    load_prompts,
    resolve_data,
    to_device,
)
from fastalign.train.model import SequenceLogps, load_policy, load_tokenizer


def count_targets(batch: dict) -> int:
    """Number of scored (next-token) positions of a batch."""
    return int((batch["labels"][:, 1:] != -100).sum())


def setup_data(cfg, kind: str, encode_row, run: Run, tok):
    """Training examples, held-out examples, exact-match prompts and the skip record of a run."""
    enc = Encoder(tok, cfg.max_length, cfg.truncation_mode)
    skipped = Skipped()
    train = load_examples(resolve_data(cfg.data, kind), encode_row, enc, cfg.skip_bad_rows, skipped)
    eval_path = cfg.eval_data or (resolve_data("embedded", kind, eval_set=True) if cfg.data == "embedded" else "")
    held_out = load_examples(eval_path, encode_row, enc, cfg.skip_bad_rows, skipped) if eval_path else []
    gen_path = cfg.gen_eval_data or (resolve_data("embedded", "sft", eval_set=True) if cfg.data == "embedded" else "")
    prompts = load_prompts(gen_path, enc) if gen_path else []
    if skipped.rows:
        run.say(skipped.report())
    return train, held_out, prompts, skipped


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
    train, held_out, prompts, skipped = setup_data(cfg, "sft", encode, run, tok)
    resume_path, state = run.resume_point()
    lm = load_policy(cfg.model, cfg, resume_path, run.attn)
    run.check_packing(lm)
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
        loss_sum = 0.0
        for mb in micro:
            with run.autocast():
                logps, _ = policy(**to_device(mb, run.device))
            loss = -logps.sum() * run.world / n_tokens
            run.check_finite(loss, step)
            loss.backward()
            loss_sum += float(loss.detach()) / run.world
        grad_norm = run.step(policy, opt, sched)
        (loss_all,) = run.sum_all(loss_sum)
        done = step + 1
        if run.every(cfg.logging_steps, done):
            run.log(done, {"loss": loss_all, "grad_norm": grad_norm, "learning_rate": sched.get_last_lr()[0],
                           "num_tokens": n_tokens, "epoch": stream.epoch}, show=("loss",))
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


def _full_sequence_loss(enc, row, where):
    """``completion_only_loss=False``: labels on every token, the prompt's too."""
    ids, _ = encode_sft_row(enc, row, where)
    return ids, list(ids)
