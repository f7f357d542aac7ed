"""The rollout step of the online methods (``fastalign ppo``, ``fastalign grpo``; iterative DPO builds on it):
prompts -> sampled completions -> rewards, and the parts of the update both loops share (the micro-batch layout,
per-sequence token storage, global-count loss weights).

Generation uses the model's own ``generate`` (KV cache, temperature / top-k / top-p, EOS stop, no gradient) and
builds logits: it only proposes tokens. The log-probabilities the losses use are computed afterwards by the fused
op on the training path (:class:`fastalign.hf.TokenLogps`), never taken from the sampling logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastalign.hf import RewardModel, ValueHead
from fastalign.train.data import DataError, Encoder, _field, iter_rows, load_prompts, resolve_data, to_device
from fastalign.train.model import generate, load_model, load_tokenizer
from fastalign.train.rewards import call_reward_fn, load_reward_fn
from fastalign.train.sft import warm_start


@dataclass
class Prompt:
    """A rollout prompt: its token ids (as generation starts from them), its text, and the row's reference
    answer when the data has one (``completion``; used by the exact-match evaluation, never by the rollouts)."""

    ids: list[int]
    text: str
    answer: str | None = None


def load_prompt_rows(path: str, enc: Encoder, max_prompt_length: int) -> list[Prompt]:
    """The prompts of ``prompt`` (text or chat messages) rows; a prompt longer than ``max_prompt_length`` tokens
    (the budget ``max_length - max_new_tokens``) raises a :class:`DataError` naming its row."""
    out = []
    for where, row in iter_rows(path):
        if isinstance(row, DataError):
            raise row
        prompt = _field(row, "prompt", where)
        ids = enc.prompt_ids(prompt)
        if len(ids) > max_prompt_length:
            raise DataError(f"{where}: the prompt is {len(ids)} tokens; at most max_length - max_new_tokens = "
                            f"{max_prompt_length} fit (raise max_length or shorten the prompt)")
        text = prompt if isinstance(prompt, str) else enc.tok.decode(ids, skip_special_tokens=True)
        answer = row.get("completion")
        out.append(Prompt(ids, text, None if answer is None else str(answer).strip()))
    if not out:
        raise DataError(f"{path}: no prompt rows")
    return out


@dataclass
class Rollouts:
    """One batch of sampled completions: ``examples[i] = (prompt + completion ids, labels)`` with labels -100 on
    the prompt (the trainer's example format), the decoded completions, whether each ended with EOS, and the
    scores ``[S]`` float32."""

    prompts: list[Prompt]
    completions: list[list[int]]
    texts: list[str]
    ended: list[bool]
    scores: torch.Tensor | None = None

    @property
    def examples(self) -> list[tuple[list[int], list[int]]]:
        return [(p.ids + c, [-100] * len(p.ids) + c) for p, c in zip(self.prompts, self.completions)]

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


class SeededSampling:
    """A ``generate`` logits processor that samples each row from its own seed: with greedy decoding after it, the
    token chosen is ``argmax(z / temperature + g)`` over the tokens top-k / top-p keep, ``g`` standard Gumbel noise
    drawn from a generator seeded by ``(seeds[row], position)`` alone: an exact sample of
    ``softmax(z / temperature)`` restricted to those tokens (the Gumbel-max trick). A prompt's completion therefore
    does not depend on which other prompts share its batch, on the batch size or on the number of ranks, nor on
    the global RNG (which it leaves alone)."""

    def __init__(self, seeds: list[int], prompt_length: int, temperature: float, top_k: int, top_p: float):
        self.seeds, self.T = seeds, prompt_length
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        z = scores.float() / self.temperature
        if self.top_k and self.top_k < z.shape[-1]:
            kth = torch.topk(z, self.top_k, dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, -torch.inf)
        if self.top_p < 1.0:  # keep the smallest set of likeliest tokens whose mass reaches top_p
            p, order = torch.softmax(z, -1).sort(-1, descending=True)
            drop = (p.cumsum(-1) - p) >= self.top_p
            z = z.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
        position = input_ids.shape[1] - self.T
        noise = torch.empty_like(z)
        for row, seed in enumerate(self.seeds):
            g = torch.Generator(device=z.device).manual_seed((seed * 1_000_003 + position) % 2**63)
            u = torch.rand(z.shape[-1], generator=g, device=z.device).clamp_(1e-12, 1.0 - 1e-7)
            noise[row] = -torch.log(-torch.log(u))
        return z + noise


@torch.no_grad()
def sample(lm, tokenizer, prompts: list[Prompt], seeds: list[int], *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, batch_size: int = 256) -> Rollouts:
    """Sample one completion per prompt from ``lm``, prompt ``i`` from the seed ``seeds[i]`` (:class:`SeededSampling`:
    the same model, prompt and seed give the same completion in any batch, on any number of ranks, and in a
    resumed run). A completion keeps its EOS token when it has one and ends there; one that reaches
    ``max_new_tokens`` without EOS is kept as it is (``ended`` False)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds must give one seed per prompt ({len(prompts)}); got {len(seeds)}")
    completions = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        sampler = SeededSampling(seeds[i:i + batch_size], max(len(p.ids) for p in chunk), temperature, top_k, top_p)
        completions += generate(lm, tokenizer, [p.ids for p in chunk], max_new_tokens, batch_size, do_sample=False,
                                logits_processor=[sampler])
    ended = [bool(c) and c[-1] == tokenizer.eos_token_id for c in completions]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Rollouts(list(prompts), completions, texts, ended)


class Rewarder:
    """Scores of completions: a reward function (``reward_fn``: ``module:function``, ``file.py:function`` or
    ``embedded``) or a reward model from ``fastalign rm`` (``reward_model``), which must share the policy's
    tokenizer (checked)."""

    def __init__(self, cfg, tokenizer, run, batcher):
        self.run, self.batcher, self.model, self.fn = run, batcher, None, None
        if cfg.reward_model:
            rm_tok = load_tokenizer(cfg.reward_model)
            if rm_tok.get_vocab() != tokenizer.get_vocab():
                raise DataError(f"reward_model {cfg.reward_model}: its tokenizer differs from the policy's "
                                f"({len(rm_tok.get_vocab())} vs {len(tokenizer.get_vocab())} tokens, or other ids); "
                                f"the reward model must score the policy's tokens")
            lm = load_model(cfg.reward_model, dtype=cfg.torch_dtype, attn_implementation=run.attn)
            head = ValueHead.load(cfg.reward_model, lm.config.hidden_size)
            if head is None:
                raise FileNotFoundError(f"reward_model {cfg.reward_model} has no value_head.safetensors: give the "
                                        f"final/ directory of a `fastalign rm` run")
            self.model = RewardModel(lm, head).to(run.device).eval().requires_grad_(False)
            self.name = f"reward_model {cfg.reward_model}"
        else:
            self.fn, self.name = load_reward_fn(cfg.reward_fn), f"reward_fn {cfg.reward_fn}"

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> torch.Tensor:
        """``[S]`` float32 scores on the CPU."""
        if self.fn is not None:
            return call_reward_fn(self.fn, [p.text for p in rollouts.prompts], rollouts.texts, self.name)
        scores = []
        examples = rollouts.examples
        for i in range(0, len(examples), 64):
            batch = self.batcher.sft(examples[i:i + 64])
            with self.run.autocast():
                scores.append(self.model(**to_device(batch, self.run.device)).float().cpu())
        return torch.cat(scores)


def rollout_data(cfg, start_model: str):
    """``(tokenizer, prompts, eval_prompts)`` of a rollout run: the prompt rows of ``data`` (each at most
    ``max_length - max_new_tokens`` tokens) and the exact-match prompts (``gen_eval_data``; by default the
    embedded held-out sums when ``data=embedded``)."""
    tok = load_tokenizer(cfg.tokenizer or start_model)
    enc = Encoder(tok, cfg.max_length, cfg.truncation_mode)
    prompts = load_prompt_rows(resolve_data(cfg.data, "sft"), enc, cfg.max_length - cfg.max_new_tokens)
    gen_path = cfg.gen_eval_data or (resolve_data("embedded", "sft", eval_set=True) if cfg.data == "embedded" else "")
    return tok, prompts, load_prompts(gen_path, enc) if gen_path else []


def rollout_start(cfg, run):
    """What an online run (ppo, grpo, iterdpo) starts from: ``(start_model, tokenizer, prompts, eval_prompts,
    batcher, resume_path, state)``: the model after the warm start (``fastalign.train.sft.warm_start``), the data of
    :func:`rollout_data`, and the checkpoint to resume from (``(None, None)`` for a fresh run)."""
    start_model = warm_start(cfg, run)
    tok, prompts, eval_prompts = rollout_data(cfg, start_model)
    resume_path, state = run.resume_point()
    return start_model, tok, prompts, eval_prompts, run.batcher(tok), resume_path, state


def prompt_seeds(seed: int, consumed: int, run, n: int, per_prompt: int = 1) -> list[int]:
    """The sampling seeds of this rank's next ``n`` prompts, ``per_prompt`` completions each (prompt-major): this
    rank's prompts are every ``world``-th of the global batch from stream position ``consumed``, and completion
    ``g`` of the prompt at position ``q`` gets ``seed * 2**32 + q * per_prompt + g``, so every completion of a run
    has its own seed, whatever the number of ranks."""
    first = consumed + run.rank
    return [seed * 2**32 + (first + k * run.world) * per_prompt + g for k in range(n) for g in range(per_prompt)]


def gather_prompts(run, per_prompt: list) -> list:
    """Items of this rank's prompts (one per prompt, in its order: every ``world``-th prompt of the global batch, as
    :func:`prompt_seeds` lays them out) from every rank, in the global prompt order; identity on one process. Every
    rank takes part and gets the whole list."""
    if run.world == 1:
        return list(per_prompt)
    parts = [None] * run.world
    dist.all_gather_object(parts, list(per_prompt))
    return [parts[rank][k] for k in range(len(per_prompt)) for rank in range(run.world)]


def micro_batches(order: torch.Tensor, num_mini_batches: int, micro: int) -> list[list[list[int]]]:
    """Sequence indices in ``order`` split into ``num_mini_batches`` near-equal minibatches, each split into
    micro-batches of at most ``micro`` sequences."""
    out = []
    for mb in torch.tensor_split(order, num_mini_batches):
        ids = mb.tolist()
        out.append([ids[i:i + micro] for i in range(0, len(ids), micro)])
    return out


def pass_layout(S: int, pass_index: int, seed: int, step: int, num_mini_batches: int,
                micro: int) -> list[list[list[int]]]:
    """The minibatches and micro-batches of one pass over an update's ``S`` rollouts: the first pass takes them in
    rollout order (the prompts come shuffled, so each global minibatch holds the same sequences however many ranks
    share it), later passes reshuffle them, seeded by ``(seed, step, pass_index)``."""
    if pass_index == 0:
        order = torch.arange(S)
    else:
        order = torch.randperm(S, generator=torch.Generator().manual_seed(seed * 100003 + step + pass_index))
    return micro_batches(order, num_mini_batches, micro)


@torch.no_grad()
def score_on_layout(ro: Rollouts, layout, batcher, run, score) -> list:
    """Run ``score(batch) -> (cu, tensor, ...)`` on every micro-batch of ``layout`` (the update's first pass, so
    its first minibatch sees exactly these values again) under no_grad and autocast, and return one
    :class:`TokenStore` per tensor, each holding it per sequence."""
    stores = None
    examples = ro.examples
    for minibatch in layout:
        for idx in minibatch:
            batch = to_device(batcher.sft([examples[i] for i in idx]), run.device)
            with run.autocast():
                cu, *values = score(batch)
            stores = stores or [TokenStore(len(examples)) for _ in values]
            for store, x in zip(stores, values):
                store.put(idx, x, cu)
    return stores


class TokenStore:
    """Per-sequence token tensors of one rollout batch, filled micro-batch by micro-batch and read back packed in
    any sequence order."""

    def __init__(self, num_seqs: int):
        self.rows: list[torch.Tensor | None] = [None] * num_seqs

    def put(self, idx: list[int], values: torch.Tensor, cu: torch.Tensor) -> None:
        for k, i in enumerate(idx):
            self.rows[i] = values[cu[k]:cu[k + 1]].detach()

    def packed(self, idx=None) -> torch.Tensor:
        return torch.cat([self.rows[i] for i in (range(len(self.rows)) if idx is None else idx)])


def packed_offsets(lengths: list[int], device) -> torch.Tensor:
    """``cu_seqlens`` ``[S + 1]`` int64 of sequences of ``lengths`` tokens laid end to end."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu.to(device)


def micro_weights(minibatch: list[list[int]], lengths: list[int], agg: str, run) -> list[float]:
    """The weight of each micro-batch's mean loss such that the minibatch's loss is its mean over all tokens
    (``token-mean``) or sequences (the seq-mean modes) of all ranks: ``count_i * world / total`` (DDP averages the
    ranks' gradients). The minibatch's gradient then does not depend on how it is split into micro-batches or
    ranks."""
    counts = [sum(lengths[j] for j in idx) if agg == "token-mean" else len(idx) for idx in minibatch]
    (total,) = run.sum_all(float(sum(counts)))
    return [c * run.world / total for c in counts]


def rank_mean(run, update: dict) -> dict:
    """An update's metrics averaged over ranks, but the ``time/`` ones (each rank's own seconds)."""
    timed = {k: v for k, v in update.items() if k.startswith("time/")}
    return {**run.mean_metrics({k: v for k, v in update.items() if k not in timed}), **timed}


def update_summary(run, rows: list[dict], keys) -> dict:
    """What an online run's summary says of its logged updates ``rows``: the first and last value of each of
    ``keys`` (those logged), the largest first-minibatch ratio deviation, the mean time split, and on CUDA the peak
    memory."""
    out = {}
    for k in keys:
        if rows and k in rows[0]:
            out[f"{k} first"], out[f"{k} last"] = rows[0][k], rows[-1][k]
    if rows:
        out["policy/ratio_max_abs_dev_first_minibatch max"] = max(
            r["policy/ratio_max_abs_dev_first_minibatch"] for r in rows)
        for k in ("time/generation", "time/scoring", "time/training"):
            out[f"{k} mean"] = sum(r[k] for r in rows) / len(rows)
    if run.device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    return out
