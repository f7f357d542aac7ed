"""``fastalign ppo``: PPO with a critic, done as the seed study (Xu et al., ICML 2024) says it works.

One update (one ``step``)::

    prompts -> sample completions (generate, no grad)          rollout.sample
            -> scores (reward function or reward model)         rollout.Rewarder; clip, EOS penalty, normalization
            -> policy / reference log-probs, critic values      fused op on the training path, no logits
            -> KL-shaped rewards -> GAE -> whitened advantages  fastalign.rl.ppo_advantages (fastalign.gae)
            -> ppo_epochs x num_mini_batches optimizer steps    clipped policy loss + clipped value loss
            -> EMA reference after each step (ref_ema_decay), adaptive KL coefficient (target_kl)

The study's three factors are one option each: ``whiten_advantages`` (on by default), ``rollout_batch_size`` (a
large batch: gradient accumulation over ``per_device_train_batch_size`` micro-batches keeps memory small) and
``ref_ema_decay``.

On-policy guarantee: the rollout's log-probabilities and values are computed on exactly the micro-batches of the
update's first minibatch pass (the epoch-0 order is drawn before scoring), with the same weights, so the first
minibatch's ratio is exactly 1 and its clip fraction exactly 0; ``policy/ratio_max_abs_dev_first_minibatch``
logs ``max |ratio - 1|`` over its tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastalign.hf import TokenLogps, TokenValues, ValueHead
from fastalign.losses.ppo import ppo_policy_loss, ppo_value_loss
from fastalign.rl.ppo import AdaptiveKLController, FixedKLController, RunningMoments, ema_update_, ppo_advantages
from fastalign.rl.whiten import whiten
from fastalign.train.common import Run, exact_match
from fastalign.train.config import PPOConfig
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


def shape_scores(scores: torch.Tensor, ended: list[bool], cfg: PPOConfig, process_group=None) -> torch.Tensor:
    """Scores as the advantages see them: minus ``missing_eos_penalty`` where a completion has no EOS, clipped to
    ``[-reward_clip, reward_clip]``, and whitened over the batch (all ranks) with ``normalize_reward``."""
    scores = scores.float().clone()
    if cfg.missing_eos_penalty:
        scores -= cfg.missing_eos_penalty * (~torch.tensor(ended, dtype=torch.bool)).float()
    if cfg.reward_clip:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.normalize_reward and scores.numel() > 1:
        scores = whiten(scores, process_group=process_group)
    return scores


class PPOModels:
    """The four models of a run: the policy (trained), the reference (frozen, or an EMA of the policy), the critic
    (a value head on its own copy of a model, trained with its own optimizer) and the reward (:class:`Rewarder`)."""

    def __init__(self, cfg: PPOConfig, run: Run, start_model: str, tok, resume_path, batcher):
        self.lm = load_policy(start_model, cfg, resume_path, run.attn)
        run.check(self.lm)
        self.policy = run.wrap(TokenLogps(self.lm, return_entropy=True))
        ema = cfg.ref_ema_decay > 0
        ref_source = str(resume_path / "ref") if ema and resume_path is not None else start_model
        self.ref_lm = load_model(ref_source, seed=cfg.seed, dtype=cfg.torch_dtype, attn_implementation=run.attn)
        self.ref_lm.eval().requires_grad_(False)
        self.ref = TokenLogps(self.ref_lm).to(run.device)
        if resume_path is not None:
            critic_source = str(resume_path / "critic")
        else:
            critic_source = cfg.critic_model or cfg.reward_model or start_model
        self.critic_lm = load_model(critic_source, seed=cfg.seed, dtype=cfg.torch_dtype, attn_implementation=run.attn)
        with torch.random.fork_rng(devices=[]):  # a new value head's init, the same for the same seed
            torch.manual_seed(cfg.seed)
            head = ValueHead.load(critic_source, self.critic_lm.config.hidden_size)
            self.critic_module = TokenValues(self.critic_lm, head)
        self.critic = run.wrap(self.critic_module, primary=False)  # DDP, or sharded by FSDP2 like the policy
        self.reward = Rewarder(cfg, tok, run, batcher)
        self.run = run

    def critic_states(self, copt=None):
        """``(save, optimizer_state)`` of the critic: a function writing it into ``directory/critic`` (model and
        value head) and its optimizer's state. A collective under FSDP2 (every rank calls it; rank 0 saves)."""
        weights, optim = self.run.full_states(self.critic_module, copt, root=self.critic)

        def save(directory) -> None:
            out = directory / "critic"
            if weights is None:
                self.critic_lm.save_pretrained(str(out), safe_serialization=True)
                self.critic_module.value_head.save(out)
                return
            lm = {k[len("lm."):]: v for k, v in weights.items() if k.startswith("lm.")}
            self.critic_lm.save_pretrained(str(out), safe_serialization=True, state_dict=lm)
            head = ValueHead(self.critic_lm.config.hidden_size)
            head.load_state_dict({k[len("value_head."):]: v for k, v in weights.items()
                                  if k.startswith("value_head.")})
            head.save(out)

        return save, optim

    def checkpoint_models(self, cfg: PPOConfig, save_critic) -> dict:
        models = {"critic": save_critic}
        if cfg.ref_ema_decay > 0:
            models["ref"] = self.ref_lm
        return models


def score_rollouts(models: PPOModels, ro: Rollouts, layout, batcher, run: Run):
    """Old log-probabilities, entropies, reference log-probabilities and values of the rollout's tokens, computed
    on the micro-batches of ``layout`` (the update's first pass) and stored per sequence."""

    def score(batch):
        logps, entropy, cu = models.policy(**batch)
        return cu, logps.float(), entropy.float(), models.ref(**batch)[0].float(), models.critic(**batch)[0].float()

    return score_on_layout(ro, layout, batcher, run, score)


@dataclass
class RolloutBatch:
    """What the update reads of a rollout batch: its examples and, per sequence, the old log-probabilities, the
    advantages, the returns and the old values."""

    examples: list
    old_logps: TokenStore
    advantages: TokenStore
    returns: TokenStore
    old_values: TokenStore


def micro_loss(models: PPOModels, cfg: PPOConfig, run: Run, batcher, rb: RolloutBatch, idx: list[int],
               weight: float, critic_only: bool, ratio_dev: list | None):
    """``(loss, metrics)`` of the micro-batch ``idx``, both times ``weight`` (:func:`micro_weights`): the clipped
    policy loss (none while the critic warms up) plus ``vf_coef`` times the clipped value loss; appends
    ``max |ratio - 1|`` to ``ratio_dev`` when given."""
    batch = to_device(batcher.sft([rb.examples[j] for j in idx]), run.device)
    old, adv, ret, v_old = (s.packed(idx).to(run.device) for s in (rb.old_logps, rb.advantages, rb.returns,
                                                                   rb.old_values))
    with run.autocast(), torch.set_grad_enabled(not critic_only):
        logps, entropy, cu = models.policy(**batch)
    with run.autocast():
        values, _ = models.critic(**batch)
    pl, pm = ppo_policy_loss(logps, old, adv, cu_seqlens=cu, clip_low=cfg.cliprange,
                             clip_high=cfg.cliprange_high or None, dual_clip=cfg.dual_clip or None,
                             agg=cfg.loss_aggregation, entropy=entropy, entropy_coef=cfg.entropy_coef)
    vl, vm = ppo_value_loss(values, v_old, ret, cu_seqlens=cu, clip=cfg.cliprange_value or None,
                            agg=cfg.loss_aggregation)
    if ratio_dev is not None:
        ratio_dev.append(float((torch.exp(logps.detach() - old) - 1).abs().max()))
    loss = cfg.vf_coef * vl + (0 if critic_only else pl)
    return loss * weight, {k: v * weight for k, v in {**pm, **vm}.items()}


def train_ppo(cfg: PPOConfig) -> dict:
    """Run PPO as configured; return the summary (also written to ``<output_dir>/summary.json``).

    Replaces TRL's (removed) ``PPOTrainer(args, processing_class, model, ref_model, reward_model, value_model,
    train_dataset).train()``; every log-probability and value comes from hidden states, never from logits.

    Example:
        >>> summary = train_ppo(make_config(PPOConfig, {"model": "runs/sft/final", "reward_fn": "my.py:score"}, "ppo"))
        >>> summary["exact_match after"]
    """
    run = Run(cfg, "ppo")
    start_model, tok, prompts, eval_prompts, batcher, resume_path, state = rollout_start(cfg, run)
    models = PPOModels(cfg, run, start_model, tok, resume_path, batcher)
    group = dist.group.WORLD if run.world > 1 else None
    steps_per_update = cfg.ppo_epochs * cfg.num_mini_batches
    total = cfg.max_steps * steps_per_update
    opt, sched = run.optimizer(models.policy.parameters(), total_steps=total)
    copt, csched = run.optimizer(models.critic.parameters(), lr=cfg.critic_learning_rate, total_steps=total)
    value_moments = RunningMoments()  # of the returns: the critic's targets with normalize_values
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl
              else FixedKLController(cfg.kl_coef))
    stream = BatchStream(len(prompts), cfg.seed, rank=run.rank, world=run.world)
    start, before = 0, {}
    if state is not None:
        run.restore(state, opt, sched)
        run.load_optimizer(copt, state["critic_optimizer"], root=models.critic)
        csched.load_state_dict(state["critic_scheduler"])
        kl_ctl.load_state_dict(state["kl_controller"])
        value_moments.load_state_dict(state["value_moments"])
        start, stream.consumed, before = state["step"], state["consumed"], state["before"]
    elif eval_prompts:
        before["exact_match"] = exact_match(run.generator(models.lm), tok, eval_prompts, cfg.max_new_tokens)
        run.say(f"ppo: exact match of greedy generations before training: {before['exact_match']:.3f}")

    run.progress(start)
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        seeds = prompt_seeds(cfg.seed, stream.consumed, run, cfg.rollout_batch_size)
        ro = sample(run.generator(models.lm), tok, [prompts[i] for i in stream.next(cfg.rollout_batch_size)], seeds,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        t1 = time.perf_counter()
        raw = models.reward(ro)
        scores = shape_scores(raw, ro.ended, cfg, group)
        S = len(ro.completions)
        layout = pass_layout(S, 0, cfg.seed, step, cfg.num_mini_batches, cfg.per_device_train_batch_size)
        old_lp, old_ent, ref_lp, old_val = score_rollouts(models, ro, layout, batcher, run)
        lengths = [len(c) for c in ro.completions]
        logps_all = old_lp.packed()
        cu_all = packed_offsets(lengths, logps_all.device)
        values_all = old_val.packed()  # the critic's outputs: normalized values with normalize_values
        if cfg.normalize_values:
            values_all = value_moments.denormalize(values_all)
        adv_all, ret_all, _, stats = ppo_advantages(
            scores.to(logps_all.device), logps_all, ref_lp.packed(), values_all, cu_all, kl_coef=kl_ctl.value,
            kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam, whiten_advantages=cfg.whiten_advantages,
            process_group=group)
        if cfg.normalize_values:  # the critic regresses the returns normalized by their running moments
            value_moments.update(ret_all, group)
            ret_all = value_moments.normalize(ret_all)
        adv, ret = TokenStore(S), TokenStore(S)
        adv.put(list(range(S)), adv_all, cu_all)
        ret.put(list(range(S)), ret_all, cu_all)
        t2 = time.perf_counter()

        critic_only = step < cfg.critic_warmup_steps
        rb = RolloutBatch(ro.examples, old_lp, adv, ret, old_val)
        first_dev: list[float] = []
        sums: dict[str, float] = {}
        for epoch in range(cfg.ppo_epochs):
            if epoch:
                layout = pass_layout(S, epoch, cfg.seed, step, cfg.num_mini_batches, cfg.per_device_train_batch_size)
            for m, minibatch in enumerate(layout):
                first = epoch == 0 and m == 0

                weights = micro_weights(minibatch, lengths, cfg.loss_aggregation, run)

                def loss_of(i, idx=minibatch, w=weights, rb=rb, critic_only=critic_only,
                            dev=first_dev if first else None):
                    return micro_loss(models, cfg, run, batcher, rb, idx[i], w[i], critic_only, dev)

                metrics = run.accumulate(step, len(minibatch), loss_of, reduce="sum")
                if not critic_only:
                    metrics.update(run.step(models.policy, opt, sched))
                    if cfg.ref_ema_decay > 0:
                        ema_update_(models.ref_lm, models.lm, cfg.ref_ema_decay)
                critic_step = run.step(models.critic, copt, csched)
                metrics["critic/grad_norm"] = critic_step["grad_norm"]
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / steps_per_update
        t3 = time.perf_counter()

        mean_kl = stats["objective/kl"]
        kl_ctl.update(mean_kl, S * run.world)
        (dev,) = run.sum_all(max(first_dev))  # any rank's deviation shows (exact 0 sums to 0)
        ent_seq = float(sum(float(x.sum()) for x in old_ent.rows) / S)
        (tokens,) = run.sum_all(ro.num_tokens)
        done = step + 1
        update = {
            **{k: v for k, v in sums.items() if k != "loss"}, "loss": sums.get("loss", 0.0), **stats,
            "objective/scores": float(raw.float().mean()), "objective/entropy": ent_seq,
            "policy/ratio_max_abs_dev_first_minibatch": dev, "kl_coef": kl_ctl.value,
            "completions/mean_length": sum(lengths) / S, "completions/eos_frac": sum(ro.ended) / S,
            "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/training": t3 - t2,
            "tokens_per_second": tokens / (t3 - t0), "epoch": stream.epoch}
        if critic_only:
            update.pop("learning_rate", None)
        update = rank_mean(run, update)
        if run.every(cfg.logging_steps, done):
            run.log(done, update, show=("objective/scores", "objective/kl", "policy/clipfrac_avg"))
        if eval_prompts and run.every(cfg.eval_steps, done):
            run.log(done, {"eval_exact_match": exact_match(run.generator(models.lm), tok, eval_prompts,
                                                           cfg.max_new_tokens)},
                    show=("eval_exact_match",))
        if run.every(cfg.save_steps, done):
            save_critic, critic_optim = models.critic_states(copt)
            run.save(done, models.lm, tok, opt, sched, stream.consumed,
                     {"before": before, "critic_optimizer": critic_optim, "critic_scheduler": csched.state_dict(),
                      "kl_controller": kl_ctl.state_dict(), "value_moments": value_moments.state_dict()},
                     models.checkpoint_models(cfg, save_critic))
        run.advance(done)

    final = run.save_final(models.lm, tok, models.critic_states()[0])
    summary = {"steps": cfg.max_steps, "start_model": start_model, "final_model": str(final)}
    if eval_prompts:
        summary["exact_match before"] = before.get("exact_match")
        summary["exact_match after"] = exact_match(run.generator(models.lm), tok, eval_prompts, cfg.max_new_tokens)
    rows = [r for r in run.history if "objective/scores" in r]
    summary.update(update_summary(run, rows, ("objective/scores", "objective/kl", "tokens_per_second")))
    return run.finish(summary, [["objective/scores", "objective/rlhf_reward"], ["objective/kl", "kl_coef"],
                                ["loss/policy_avg", "loss/value_avg"], ["policy/clipfrac_avg", "val/clipfrac_avg"],
                                ["eval_exact_match"]])
