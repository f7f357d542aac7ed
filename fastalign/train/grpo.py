"""``fastalign grpo``: critic-free group RL (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline) on ``fastalign ppo``'s
rollout machinery.

One update (one ``step``)::

    prompts x num_generations -> sample completions (generate, no grad)   rollout.sample, one seed per completion
            -> scores (reward function or reward model)                   rollout.Rewarder
            -> group advantages (each prompt's G completions)              fastalign.rl grpo / dr_grpo / rloo /
                                                                           reinforce_pp
            -> old / reference log-probs on the training path              fused op (hf.TokenLogps), no logits
            -> num_iterations x num_mini_batches optimizer steps           clipped policy loss (epsilon,
                                                                           epsilon_high) + beta * k3 KL, aggregated
                                                                           as loss_type says

There is no critic and no KL in the reward: the KL to the reference (``beta``, k3) is a loss term, and with
``beta = 0`` no reference model is loaded (TRL's default).

On-policy guarantee, as in ``fastalign ppo``: the old log-probabilities are computed on exactly the micro-batches of
the update's first pass (rollout order), so the first minibatch's ratio is exactly 1;
``policy/ratio_max_abs_dev_first_minibatch`` logs ``max |ratio - 1|`` over its tokens. With one pass of one
minibatch (``num_iterations = num_mini_batches = 1``, the default) the whole update is that minibatch: its old
log-probabilities are then the training forward's own, detached (TRL does the same), and no scoring pass runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastalign.hf import TokenLogps
from fastalign.losses.ppo import ppo_policy_loss
from fastalign.rl.advantages import dr_grpo, grpo, reinforce_pp, rloo
from fastalign.train.common import Run, exact_match
from fastalign.train.config import GRPOConfig
from fastalign.train.data import BatchStream, to_device
from fastalign.train.model import load_model, load_policy
from fastalign.train.rollout import (
    Rewarder,
    Rollouts,
    TokenStore,
    micro_weights,
    packed_offsets,
    pass_layout,
    prompt_seeds,
    rank_mean,
    rollout_start,
    sample,
    score_on_layout,
    update_summary,
)

# How each loss_type reduces the per-token losses of a minibatch (with micro_weights over all its micro-batches and
# ranks; bnpo instead averages each micro-batch's own token mean, and dr_grpo divides by max_new_tokens too).
AGGREGATION = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum",
               "dapo": "token-mean"}


def group_advantages(scores: torch.Tensor, lengths: list[int], advantage: str, group_size: int,
                     scale_rewards: bool = True, process_group=None) -> torch.Tensor:
    """Per-token advantages ``[N]`` (the completions' tokens laid end to end) of ``S`` completions scored ``scores``
    ``[S]``, in contiguous groups of ``group_size`` (the completions of one prompt):

    - ``grpo``: ``(s - group mean) / (group std + 1e-6)``, or ``s - group mean`` without ``scale_rewards``;
    - ``dr_grpo``: ``s - group mean``;
    - ``rloo``: ``s - mean of the group's other scores``;
    - ``reinforce_pp``: REINFORCE++-baseline: ``s - group mean`` on every token, whitened over all tokens of the
      batch (all ranks of ``process_group``).

    A completion's advantage is the same on each of its tokens."""
    if advantage == "reinforce_pp":
        T = max(lengths)
        mask = torch.arange(T) < torch.tensor(lengths)[:, None]
        token_rewards = torch.zeros(len(lengths), T)
        token_rewards[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = scores.float()
        return reinforce_pp(token_rewards, mask, group_size=group_size, process_group=process_group)[mask]
    if advantage == "grpo":
        per_seq = grpo(scores, group_size=group_size, scale_by_std=scale_rewards)
    elif advantage == "dr_grpo":
        per_seq = dr_grpo(scores, group_size=group_size)
    elif advantage == "rloo":
        per_seq = rloo(scores, group_size=group_size)
    else:
        raise ValueError(f"advantage must be grpo, dr_grpo, rloo or reinforce_pp; got {advantage!r}")
    return per_seq.repeat_interleave(torch.tensor(lengths))


def group_stats(scores: torch.Tensor, group_size: int) -> dict[str, float]:
    """``reward`` (mean), ``reward_std`` (the mean over groups of each group's std, unbiased) and
    ``frac_reward_zero_std`` (the fraction of groups whose scores are all equal: their advantages are 0)."""
    std = scores.double().view(-1, group_size).std(dim=1)
    return {"reward": float(scores.double().mean()), "reward_std": float(std.mean()),
            "frac_reward_zero_std": float(torch.isclose(std, torch.zeros_like(std)).double().mean())}


def loss_weights(minibatch: list[list[int]], lengths: list[int], loss_type: str, run: Run) -> list[float]:
    """The weight of each micro-batch's loss in its minibatch's (:func:`micro_weights` for the global
    aggregations; bnpo: ``1 / micro-batches``, TRL's mean of each micro-batch's own token mean)."""
    if loss_type == "bnpo":
        return [1.0 / len(minibatch)] * len(minibatch)
    return micro_weights(minibatch, lengths, AGGREGATION[loss_type], run)


def score_rollouts(policy, ref, ro: Rollouts, layout, batcher, run: Run, old: bool):
    """``(old log-probs, reference log-probs)`` of the rollout's tokens, each a :class:`TokenStore` or None (not
    wanted: ``old`` False, no reference), computed on the micro-batches of ``layout`` (the update's first pass)."""
    scorers = ([policy] if old else []) + ([ref] if ref is not None else [])
    if not scorers:
        return None, None

    def score(batch):
        outs = [m(**batch) for m in scorers]
        return (outs[0][2], *(o[0] for o in outs))

    stores = iter(score_on_layout(ro, layout, batcher, run, score))
    return (next(stores) if old else None), (next(stores) if ref is not None else None)


@dataclass
class GroupBatch:
    """What the update reads of a rollout batch: its examples and, per sequence, the advantages, the old
    log-probabilities (None: each forward's own) and the reference's (None: ``beta = 0``)."""

    examples: list
    advantages: TokenStore
    old_logps: TokenStore | None
    ref_logps: TokenStore | None


def micro_loss(policy, cfg: GRPOConfig, run: Run, batcher, gb: GroupBatch, idx: list[int], weight: float,
               metric_weight: float, ratio_dev: list | None):
    """``(loss * weight, metrics * metric_weight)`` of the micro-batch ``idx``: the clipped policy loss plus
    ``beta`` times the k3 KL to the reference, aggregated as ``loss_type`` says. Appends ``max |ratio - 1|`` to
    ``ratio_dev`` when given."""
    batch = to_device(batcher.sft([gb.examples[j] for j in idx]), run.device)
    adv = gb.advantages.packed(idx).to(run.device)
    old, ref = (None if s is None else s.packed(idx).to(run.device) for s in (gb.old_logps, gb.ref_logps))
    with run.autocast():
        logps, entropy, cu = policy(**batch)
    old = logps.detach() if old is None else old
    loss, pm = ppo_policy_loss(logps, old, adv, cu_seqlens=cu, clip_low=cfg.epsilon,
                               clip_high=cfg.epsilon_high or None, agg=AGGREGATION[cfg.loss_type], entropy=entropy,
                               ref_logprobs=ref, kl_coef=cfg.beta, kl_kind="k3")
    if cfg.loss_type == "dr_grpo":  # seq-mean-token-sum / max_new_tokens = token sum / (sequences x max_new_tokens)
        loss = loss / cfg.max_new_tokens
    if ratio_dev is not None:
        ratio_dev.append(float((torch.exp(logps.detach() - old) - 1).abs().max()))
    metrics = {"clip_ratio/region_mean": pm["policy/clipfrac_avg"], "entropy": pm["policy/entropy_avg"]}
    if ref is not None:
        metrics["kl"] = pm["objective/kl"]
    return loss * weight, {k: v * metric_weight for k, v in metrics.items()}


def train_grpo(cfg: GRPOConfig) -> dict:
    """Run GRPO (or Dr. GRPO, RLOO, REINFORCE++-baseline: ``advantage``) as configured; return the summary (also
    written to ``<output_dir>/summary.json``).

    Replaces TRL's ``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=...).train()``; every
    log-probability comes from hidden states through the fused op, never from logits.

    Example:
        >>> summary = train_grpo(make_config(GRPOConfig, {"model": "runs/sft/final", "reward_fn": "my.py:score",
        ...                                               "advantage": "rloo"}, "grpo"))
        >>> summary["exact_match after"]
    """
    run = Run(cfg, "grpo")
    start_model, tok, prompts, eval_prompts, batcher, resume_path, state = rollout_start(cfg, run)
    lm = load_policy(start_model, cfg, resume_path, run.attn)
    run.check(lm)
    policy = run.wrap(TokenLogps(lm, return_entropy=True))
    ref = None
    if cfg.beta > 0:  # frozen at the start model
        ref_lm = load_model(start_model, seed=cfg.seed, dtype=cfg.torch_dtype, attn_implementation=run.attn)
        ref = TokenLogps(ref_lm.eval().requires_grad_(False)).to(run.device)
    reward = Rewarder(cfg, tok, run, batcher)
    group = dist.group.WORLD if run.world > 1 else None
    G = cfg.num_generations
    steps_per_update = cfg.num_iterations * cfg.num_mini_batches
    one_pass = steps_per_update == 1  # the update is its first minibatch: old log-probs = the forward's own
    opt, sched = run.optimizer(policy.parameters(), total_steps=cfg.max_steps * steps_per_update)
    stream = BatchStream(len(prompts), cfg.seed, rank=run.rank, world=run.world)
    start, before = 0, {}
    if state is not None:
        run.restore(state, opt, sched)
        start, stream.consumed, before = state["step"], state["consumed"], state["before"]
    elif eval_prompts:
        before["exact_match"] = exact_match(run.generator(lm), tok, eval_prompts, cfg.max_new_tokens)
        run.say(f"grpo: exact match of greedy generations before training: {before['exact_match']:.3f}")

    run.progress(start)
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        seeds = prompt_seeds(cfg.seed, stream.consumed, run, cfg.rollout_batch_size, G)
        chosen = [prompts[i] for i in stream.next(cfg.rollout_batch_size) for _ in range(G)]  # groups contiguous
        ro = sample(run.generator(lm), tok, chosen, seeds, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        t1 = time.perf_counter()
        scores = reward(ro)
        S, lengths = len(ro.completions), [len(c) for c in ro.completions]
        layout = pass_layout(S, 0, cfg.seed, step, cfg.num_mini_batches, cfg.per_device_train_batch_size)
        old_lp, ref_lp = score_rollouts(policy, ref, ro, layout, batcher, run, old=not one_pass)
        adv = TokenStore(S)
        adv.put(list(range(S)), group_advantages(scores, lengths, cfg.advantage, G, cfg.scale_rewards, group),
                packed_offsets(lengths, "cpu"))
        t2 = time.perf_counter()

        gb = GroupBatch(ro.examples, adv, old_lp, ref_lp)
        first_dev: list[float] = []
        sums: dict[str, float] = {}
        for iteration in range(cfg.num_iterations):
            if iteration:
                layout = pass_layout(S, iteration, cfg.seed, step, cfg.num_mini_batches,
                                     cfg.per_device_train_batch_size)
            for m, minibatch in enumerate(layout):
                weights = loss_weights(minibatch, lengths, cfg.loss_type, run)
                token_weights = micro_weights(minibatch, lengths, "token-mean", run)  # of the token-mean metrics

                def loss_of(i, idx=minibatch, w=weights, tw=token_weights, gb=gb,
                            dev=first_dev if iteration == 0 and m == 0 else None):
                    return micro_loss(policy, cfg, run, batcher, gb, idx[i], w[i], tw[i], dev)

                metrics = run.accumulate(step, len(minibatch), loss_of, reduce="sum")
                metrics.update(run.step(policy, opt, sched))
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / steps_per_update
        t3 = time.perf_counter()

        (dev,) = run.sum_all(max(first_dev))  # any rank's deviation shows (exact 0 sums to 0)
        (tokens,) = run.sum_all(ro.num_tokens)
        done = step + 1
        update = rank_mean(run, {
            **sums, **group_stats(scores, G), "policy/ratio_max_abs_dev_first_minibatch": dev,
            "completions/mean_length": sum(lengths) / S, "completions/clipped_ratio": 1 - sum(ro.ended) / S,
            "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/training": t3 - t2,
            "tokens_per_second": tokens / (t3 - t0), "epoch": stream.epoch})
        if run.every(cfg.logging_steps, done):
            run.log(done, update, show=("reward", "frac_reward_zero_std", "clip_ratio/region_mean"))
        if eval_prompts and run.every(cfg.eval_steps, done):
            run.log(done, {"eval_exact_match": exact_match(run.generator(lm), tok, eval_prompts, cfg.max_new_tokens)},
                    show=("eval_exact_match",))
        if run.every(cfg.save_steps, done):
            run.save(done, lm, tok, opt, sched, stream.consumed, {"before": before})
        run.advance(done)

    final = run.save_final(lm, tok)
    summary = {"steps": cfg.max_steps, "start_model": start_model, "final_model": str(final)}
    if eval_prompts:
        summary["exact_match before"] = before.get("exact_match")
        summary["exact_match after"] = exact_match(run.generator(lm), tok, eval_prompts, cfg.max_new_tokens)
    rows = [r for r in run.history if "reward" in r]
    summary.update(update_summary(run, rows, ("reward", "frac_reward_zero_std", "kl", "tokens_per_second")))
    return run.finish(summary, [["reward", "reward_std"], ["frac_reward_zero_std", "completions/clipped_ratio"],
                                ["kl"], ["clip_ratio/region_mean"], ["entropy"], ["eval_exact_match"]])
