"""``fastalign iterdpo``: iterative (online) DPO, the seed study's DPO-Iter, on ``fastalign ppo``'s rollout machinery
and ``fastalign dpo``'s loss.

One round (``max_steps / rounds`` DPO steps)::

    prompts x num_generations -> sample completions (generate, no grad)   rollout.sample, one seed per completion
            -> scores (reward function or reward model)                   rollout.Rewarder
            -> pairs: each prompt's best over its worst                    preference_pairs (pairs=all: every
               (a tied prompt: its dataset completion, when it scores     pair apart by more than pair_margin)
               higher, over its worst sample)
            -> reference log-probabilities of the pairs, once              the round's starting policy
                                                                           (ref_update=round) or the first one
            -> max_steps / rounds steps of the DPO loop                    fastalign.train.dpo's loss (any
                                                                           loss_type), a fresh AdamW + schedule

Across ranks (torchrun) each rank samples and scores its share of the round's prompts; the pairs (with their
reference log-probabilities) are then gathered in the global prompt order, and the DPO steps split each global
batch over the ranks as ``fastalign dpo`` does, so the pairs a step sees do not depend on the number of ranks.

Checkpoints: at the end of every round, and every ``save_steps`` inside one; a checkpoint inside a round holds the
round's pairs and reference log-probabilities, so a resumed round trains on the same pairs.
"""

from __future__ import annotations

import time

import torch

from fastalign.hf import SequenceLogps
from fastalign.losses.dpo import REFERENCE_FREE, BCORunningMean
from fastalign.train import checkpoint
from fastalign.train.common import Run, exact_match
from fastalign.train.config import ConfigError, IterDPOConfig
from fastalign.train.data import BatchStream
from fastalign.train.dpo import dpo_batch_loss, score_pairs
from fastalign.train.model import load_model, load_policy
from fastalign.train.rollout import Prompt, Rewarder, Rollouts, gather_prompts, prompt_seeds, rollout_start, sample


def preference_pairs(scores: torch.Tensor, group_size: int, pairs: str = "best_worst",
                     margin: float = 0.0) -> tuple[list[tuple[int, int]], list[int]]:
    """``(pairs, tied)`` of ``S`` completions scored ``scores`` ``[S]``, in contiguous groups of ``group_size`` (the
    completions of one prompt): ``pairs`` as ``(chosen, rejected)`` indices into ``scores`` with
    ``score(chosen) - score(rejected) > margin``, and ``tied`` the groups (prompt indices) that gave none.

    - ``best_worst``: per group its first best completion over its first worst one;
    - ``all``: per group every such pair ``(i, j)``, in the order of ``i`` then ``j``."""
    if scores.ndim != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be [S] with S a multiple of group_size={group_size}; got {tuple(scores.shape)}")
    s = scores.double().view(-1, group_size)
    out, tied = [], []
    for g, row in enumerate(s):
        base = g * group_size
        if pairs == "best_worst":
            w, lo = int(row.argmax()), int(row.argmin())
            found = [(base + w, base + lo)] if row[w] - row[lo] > margin else []
        elif pairs == "all":
            found = [(base + i, base + j) for i in range(group_size) for j in range(group_size)
                     if row[i] - row[j] > margin]
        else:
            raise ValueError(f"pairs must be best_worst or all; got {pairs!r}")
        out += found
        if not found:
            tied.append(g)
    return out, tied


def data_answer_pairs(ro: Rollouts, scores: torch.Tensor, tied: list[int], group_size: int, reward: Rewarder,
                      tokenizer, max_length: int, margin: float) -> list[tuple[int, tuple]]:
    """For the ``tied`` prompts whose row has a completion (``Prompt.answer``, tokenized as its text then EOS, as
    ``fastalign sft`` trains a text row) that fits ``max_length`` and scores above the group's best by more than
    ``margin``: ``(prompt index, example)`` with the example the answer (chosen) over the group's first worst sample
    (rejected)."""
    candidates = []
    for g in tied:
        p: Prompt = ro.prompts[g * group_size]
        if p.answer is None:
            continue
        ids = tokenizer(p.answer, add_special_tokens=False)["input_ids"]
        ids = ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        if len(p.ids) + len(ids) <= max_length:
            candidates.append((g, p, ids))
    if not candidates:
        return []
    answers = Rollouts([p for _, p, _ in candidates], [ids for _, _, ids in candidates],
                       [p.answer for _, p, _ in candidates], [True] * len(candidates))
    answer_scores = reward(answers).tolist()
    examples, out = ro.examples, []
    for (g, _, _), example, score in zip(candidates, answers.examples, answer_scores):
        group = scores[g * group_size:(g + 1) * group_size].double()
        if score - float(group.max()) > margin:
            out.append((g, example + examples[g * group_size + int(group.argmin())]))
    return out


def round_pairs(ro: Rollouts, scores: torch.Tensor, cfg: IterDPOConfig, reward: Rewarder, tokenizer):
    """The preference examples ``(chosen ids, chosen labels, rejected ids, rejected labels)`` of this rank's
    prompts, as one list per prompt (prompt-major, for :func:`fastalign.train.rollout.gather_prompts`), and the
    counts ``(tied prompts, pairs with the data's completion as chosen)``."""
    G = cfg.num_generations
    pairs, tied = preference_pairs(scores, G, cfg.pairs, cfg.pair_margin)
    examples = ro.examples
    per_prompt: list[list[tuple]] = [[] for _ in range(len(ro.prompts) // G)]
    for w, lo in pairs:
        per_prompt[w // G].append(examples[w] + examples[lo])
    from_data = data_answer_pairs(ro, scores, tied, G, reward, tokenizer, cfg.max_length, cfg.pair_margin) \
        if cfg.data_chosen and tied else []
    for g, example in from_data:
        per_prompt[g].append(example)
    return per_prompt, len(tied), len(from_data)


class RoundState:
    """What one round trains on: its pairs (global order), their reference log-probabilities ``[n, 2]`` (None:
    a reference-free loss), and its sampling statistics; saved in a checkpoint taken inside the round."""

    def __init__(self, examples: list, ref_logps, stats: dict):
        self.examples, self.ref_logps, self.stats = examples, ref_logps, stats

    def state(self) -> dict:
        return {"examples": [tuple(list(x) for x in e) for e in self.examples], "ref_logps": self.ref_logps,
                "stats": self.stats}

    @classmethod
    def from_state(cls, saved: dict) -> RoundState:
        return cls([tuple(e) for e in saved["examples"]], saved["ref_logps"], saved["stats"])


def train_iterdpo(cfg: IterDPOConfig) -> dict:
    """Run iterative DPO as configured; return the summary (also written to ``<output_dir>/summary.json``).

    The study's DPO-Iter. TRL's nearest is ``OnlineDPOTrainer``, which pairs two samples per prompt every step;
    here each round samples a whole batch from the current policy, pairs it, then trains DPO on those pairs.

    Example:
        >>> summary = train_iterdpo(make_config(IterDPOConfig, {"model": "runs/sft/final", "rounds": 4,
        ...                                                      "reward_fn": "my.py:score"}, "iterdpo"))
        >>> summary["exact_match after"]
    """
    run = Run(cfg, "iterdpo")
    if run.fsdp:
        raise ConfigError("iterdpo: distributed must be ddp (each rank samples and scores its own share of the "
                          "prompts, a number of forwards FSDP2's collectives cannot follow); got fsdp")
    start_model, tok, prompts, eval_prompts, batcher, resume_path, state = rollout_start(cfg, run)
    lm = load_policy(start_model, cfg, resume_path, run.attn)
    run.check(lm)
    seq = SequenceLogps(lm)
    policy = run.wrap(seq)
    reward = Rewarder(cfg, tok, run, batcher)
    needs_ref = not all(t in REFERENCE_FREE for t in cfg.loss_type)
    fixed_ref = None
    if needs_ref and cfg.ref_update == "fixed":  # the starting model, frozen
        ref_lm = load_model(start_model, seed=cfg.seed, dtype=cfg.torch_dtype, attn_implementation=run.attn)
        fixed_ref = SequenceLogps(ref_lm.eval().requires_grad_(False)).to(run.device)
    per_round = cfg.max_steps // cfg.rounds
    G = cfg.num_generations
    prompt_stream = BatchStream(len(prompts), cfg.seed, rank=run.rank, world=run.world)
    start, before, rounds = 0, {}, []
    if state is not None:
        if state["steps_per_round"] != per_round:  # max_steps may change on resume, but not the rounds' length
            raise ConfigError(f"iterdpo: max_steps / rounds must stay {state['steps_per_round']} steps per round on "
                              f"resume (the checkpoint's); got max_steps={cfg.max_steps} for rounds={cfg.rounds}: "
                              f"{per_round} per round")
        start, prompt_stream.consumed, before = state["step"], state["prompts_consumed"], state["before"]
        rounds = list(state["rounds"])
        if start % per_round == 0:  # at a round's end: the next round starts afresh, from the saved RNG
            checkpoint.set_rng_state(state["rng"])
    elif eval_prompts:
        before["exact_match"] = exact_match(run.generator(lm), tok, eval_prompts, cfg.max_new_tokens)
        run.say(f"iterdpo: exact match of greedy generations before training: {before['exact_match']:.3f}")

    run.progress(start)
    for r in range(start // per_round, cfg.rounds):
        first, last = r * per_round, (r + 1) * per_round
        opt, sched = run.optimizer(policy.parameters(), total_steps=per_round)  # each round: a fresh schedule
        resumed = state is not None and first < start  # inside this round: its pairs and optimizer are saved
        if resumed:
            rnd = RoundState.from_state(state["round"])
            run.restore(state, opt, sched)
        else:  # sample, score and pair with the current policy
            t0 = time.perf_counter()
            seeds = prompt_seeds(cfg.seed, prompt_stream.consumed, run, cfg.rollout_batch_size, G)
            chosen = [prompts[i] for i in prompt_stream.next(cfg.rollout_batch_size) for _ in range(G)]
            ro = sample(run.generator(lm), tok, chosen, seeds, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
            scores = reward(ro)
            per_prompt, tied, from_data = round_pairs(ro, scores, cfg, reward, tok)
            ref = (seq if cfg.ref_update == "round" else fixed_ref) if needs_ref else None
            local = [e for group in per_prompt for e in group]
            ref_rows = iter(score_pairs(ref, local, run, 64, batcher).tolist() if ref is not None and local else [])
            with_ref = [[(e, next(ref_rows, None)) for e in group] for group in per_prompt]  # (pair, its ref logps)
            gathered = [x for group in gather_prompts(run, with_ref) for x in group]
            examples = [e for e, _ in gathered]
            ref_logps = None if ref is None else torch.tensor([r for _, r in gathered],
                                                              dtype=torch.float32).view(-1, 2)
            tied, from_data, total, n = run.sum_all(tied, from_data, float(scores.double().sum()), scores.numel())
            rnd = RoundState(examples, ref_logps, {
                "round": r + 1, "rollout/reward": total / n, "pairs": len(examples), "pairs/tied_prompts": tied,
                "pairs/from_data": from_data, "time/rollout": time.perf_counter() - t0})
            run.log(first + 1, rnd.stats, show=("rollout/reward", "pairs"))
        stream = BatchStream(len(rnd.examples), cfg.seed + r, consumed=state["consumed"] if resumed else 0,
                             rank=run.rank, world=run.world)
        bco = BCORunningMean() if "bco_pair" in cfg.loss_type and cfg.bco_shift else None
        if bco is not None and resumed and state.get("bco") is not None:
            bco.load_state_dict(state["bco"])
        if not rnd.examples:
            run.say(f"iterdpo: round {r + 1} gave no preference pair (every prompt's completions scored within "
                    f"pair_margin={cfg.pair_margin} of each other, and no dataset completion above them): its "
                    f"{per_round} steps are skipped")

        def loss_of(_, rnd=rnd, stream=stream, bco=bco):
            idx = stream.next(cfg.per_device_train_batch_size)
            batch = batcher.pref([rnd.examples[i] for i in idx])
            ref = None if rnd.ref_logps is None else (rnd.ref_logps[idx, 0], rnd.ref_logps[idx, 1])
            return dpo_batch_loss(policy, batch, ref, cfg, run, bco)

        for step in range(max(start, first), last):
            done = step + 1
            if rnd.examples:
                metrics = run.accumulate(step, cfg.gradient_accumulation_steps, loss_of)
                metrics.update(run.step(policy, opt, sched))
                if run.every(cfg.logging_steps, done):
                    run.log(done, {**metrics, "round": r + 1, "epoch": stream.epoch},
                            show=("loss", "rewards/accuracies"))
            if eval_prompts and (done == last or run.every(cfg.eval_steps, done)):
                run.log(done, {"eval_exact_match": exact_match(run.generator(lm), tok, eval_prompts,
                                                               cfg.max_new_tokens)}, show=("eval_exact_match",))
            if done == last:
                rounds.append({**rnd.stats, **({"eval_exact_match": run.history[-1]["eval_exact_match"]}
                                               if eval_prompts and run.main else {})})
            if done == last or run.every(cfg.save_steps, done):
                run.save(done, lm, tok, opt, sched, stream.consumed, {
                    "before": before, "rounds": rounds, "prompts_consumed": prompt_stream.consumed,
                    "steps_per_round": per_round,
                    "round": None if done == last else rnd.state(), "bco": None if bco is None else bco.state_dict()})
            run.advance(done)

    summary = {"steps": cfg.max_steps, "rounds": cfg.rounds, "start_model": start_model,
               "final_model": str(run.save_final(lm, tok))}
    if eval_prompts:
        summary["exact_match before"] = before.get("exact_match")
        summary["exact_match after"] = exact_match(run.generator(lm), tok, eval_prompts, cfg.max_new_tokens)
    summary["per_round"] = rounds
    return run.finish(summary, [["loss"], ["rewards/accuracies"], ["rewards/margins"], ["rollout/reward"],
                                ["pairs", "pairs/tied_prompts", "pairs/from_data"], ["eval_exact_match"]])

