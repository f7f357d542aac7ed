"""Typed configs of the trainer commands and their command-line / YAML parsing.

``fastalign <cmd> [--config file.yaml] [key=value ...] [--key value] [--flag]``: defaults, then the YAML file,
then the command-line overrides. Field names follow TRL's (``learning_rate``, ``gradient_accumulation_steps``,
``truncation_mode``, ``beta``, ``loss_type``, ``precompute_ref_log_probs``, ``sync_ref_model``...). Every
default runs on the embedded model and data (``model=embedded``, ``data=embedded``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field

ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


class ConfigError(ValueError):
    """A config file or override that cannot be applied (unknown key, wrong type, bad value)."""


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(name: str, device) -> str:
    """The ``attn_implementation`` to load models with: ``auto`` is ``flash_attention_2`` when flash-attn is
    installed (the ``[flash]`` extra) and the device is CUDA, else ``sdpa`` (PyTorch's
    scaled_dot_product_attention)."""
    if name == "auto":
        return "flash_attention_2" if device.type == "cuda" and flash_attn_installed() else "sdpa"
    if name == "flash_attention_2" and device.type != "cuda":
        raise ConfigError(f"attn_implementation must be auto, sdpa or eager on device {device}; got "
                          f"flash_attention_2 (flash-attn runs on CUDA only)")
    return name


@dataclass
class TrainConfig:
    """Options shared by every command."""

    model: str = field(default="embedded", metadata={"help": "local path or hub id of an AutoModelForCausalLM; "
                                                     "'embedded': the tiny random-init Llama of fastalign/assets"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer path (default: the model's)"})
    data: str = field(default="embedded", metadata={"help": "training data: .jsonl, .parquet or a datasets "
                                                    "directory saved with save_to_disk; 'embedded': the demo task"})
    eval_data: str = field(default="", metadata={"help": "held-out data in the same format (default: the embedded "
                                                 "held-out set when data=embedded, else none)"})
    gen_eval_data: str = field(default="", metadata={
        "help": "prompt/completion rows whose greedy generations are scored by exact match before and after "
                "training (default: the embedded arithmetic set when data=embedded, else none)"})
    max_new_tokens: int = field(default=6, metadata={"help": "generation length: the exact-match evaluation, and ppo's "
                                                     "rollouts"})
    output_dir: str = field(default="", metadata={"help": "where checkpoints, metrics and plots go "
                                                  "(default: runs/<command>)"})
    max_length: int = field(default=64, metadata={"help": "max tokens per sequence (prompt + completion)"})
    truncation_mode: str = field(default="keep_end", metadata={
        "help": "keep_end: drop tokens from the start of the prompt; keep_start: drop them from the end"})
    packing: bool = field(default=False, metadata={
        "help": "padding-free batches (TRL's padding_free, and packing without splitting sequences): each "
                "micro-batch's sequences laid end to end, position ids restarting at 0 per sequence; with "
                "flash_attention_2 one row and no pad token (varlen kernel), with sdpa/eager rows of at most "
                "max_length tokens (a block-diagonal mask); attention stays inside each sequence (checked at start)"})
    attn_implementation: str = field(default="auto", metadata={
        "help": "auto: flash_attention_2 when flash-attn is installed (the [flash] extra) and the device is CUDA, "
                "else sdpa; or sdpa, eager, flash_attention_2"})
    check_model: bool = field(default=True, metadata={
        "help": "at load, compare fastalign's fused log-probabilities with the model's own logits on two short "
                "sequences and refuse a model where they disagree (an unsupported logit transform)"})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "skip malformed rows (each one counted and reported) instead of stopping at the first"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "sequences (pairs) per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps, then cosine decay to 0"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    eval_steps: int = field(default=100, metadata={"help": "evaluate every this many steps (0: only at the end)"})
    save_steps: int = field(default=100, metadata={"help": "checkpoint every this many steps (0: only at the end)"})
    logging_steps: int = field(default=10, metadata={"help": "write metrics every this many steps"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto (cuda when available, else cpu), cpu, cuda, cuda:1"})
    cpu_threads: int = field(default=0, metadata={
        "help": "torch CPU threads; 0: 1 for model=embedded (its matrices are too small to gain from threads: "
                "measured 3x faster than 2 threads on a busy 2-core machine), else torch's default"})
    dtype: str = field(default="float32", metadata={"help": "dtype of the weights: float32, bfloat16, float64"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on GPU (ignored on CPU)"})
    distributed: str = field(default="ddp", metadata={
        "help": "with torchrun (2+ processes): ddp (a full replica per rank) or fsdp (FSDP2 fully_shard: each "
                "decoder layer, then the root with the embeddings and LM head; sft, dpo and ppo)"})
    gradient_checkpointing: bool = False
    use_lora: bool = field(default=False, metadata={
        "help": "train LoRA adapters (peft, the [lora] extra) instead of every weight; sft, dpo and ppo; final/ holds "
                "the merged model and final/adapter the adapter"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (the update is alpha/r B A)"})
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "module names that get adapters, comma separated; all-linear: every linear layer but the LM head"})
    resume: str = field(default="", metadata={"help": "'latest': the newest checkpoint in output_dir (none yet: start "
                                              "fresh); or a checkpoint directory; '': start fresh (refused when "
                                              "output_dir holds an earlier run, unless overwrite_output_dir)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start fresh in an output_dir that holds an earlier run, replacing its checkpoints, metrics and "
                "final model (once the new run's model and data have loaded); without it such a run is refused"})
    report_to_tensorboard: bool = field(default=True, metadata={"help": "also log to TensorBoard when installed"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots of the curves at the end"})
    progress_bar: bool = True

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@dataclass
class SFTConfig(TrainConfig):
    """``fastalign sft``: supervised fine-tuning on prompt/completion (or messages) rows."""

    max_steps: int = 600
    learning_rate: float = 3e-3
    per_device_train_batch_size: int = 64
    completion_only_loss: bool = field(default=True, metadata={"help": "loss on completion tokens only "
                                                               "(False: on the prompt too)"})


@dataclass
class RMConfig(TrainConfig):
    """``fastalign rm``: a Bradley-Terry reward model (the LM's decoder plus a scalar value head)."""

    center_rewards_coefficient: float = field(default=0.0, metadata={"help": "weight of mean((r_c + r_r)^2)"})


@dataclass
class WarmStartConfig(TrainConfig):
    """Options of the commands that start from an SFT model (dpo, ppo): with ``model=embedded`` a warm start."""

    sft_data: str = field(default="embedded", metadata={"help": "SFT data of the warm start"})
    sft_warmup_steps: int = field(default=600, metadata={
        "help": "with model=embedded (a random init), first run this many SFT steps (the sft command's "
                "defaults) on sft_data and start from the result; ignored for a real model"})


@dataclass
class DPOConfig(WarmStartConfig):
    """``fastalign dpo``: the DPO family on prompt/chosen/rejected rows."""

    max_steps: int = 150
    learning_rate: float = 5e-4
    eval_steps: int = 50
    beta: float = field(default=0.1, metadata={"help": "temperature of the implicit reward"})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid", "sft"], metadata={
        "help": "one or more of fastalign.losses.dpo.LOSS_TYPES, comma separated (weighted by loss_weights); "
                "the default sigmoid,sft is DPO plus the chosen NLL (RPO); TRL's default is sigmoid"})
    loss_weights: list[float] = field(default_factory=list, metadata={"help": "one weight per loss type"})
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    bco_shift: bool = field(default=False, metadata={
        "help": "loss_type=bco_pair: subtract the running mean of the implicit rewards (the BCO paper, older TRL); "
                "false: TRL 1.16's bco_pair, without the shift"})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "score the data with the reference once (cached on disk keyed by model and data) and drop it"})
    sync_ref_model: bool = field(default=False, metadata={
        "help": "TR-DPO / EMA reference: every ref_model_sync_steps, ref = alpha * policy + (1 - alpha) * ref"})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "alpha of sync_ref_model (1: hard copy)"})
    ref_model_sync_steps: int = field(default=64, metadata={"help": "steps between reference updates"})


# What a warm-start SFT run sets itself (its data, schedule and output) rather than take from the command that
# starts it; every other option (device, precision, packing, logging, checks...) is inherited.
WARM_START_OWN = ("model", "tokenizer", "data", "eval_data", "output_dir", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "max_steps", "learning_rate", "weight_decay", "adam_beta1",
                  "adam_beta2", "warmup_steps", "max_grad_norm", "eval_steps", "save_steps", "logging_steps",
                  "resume", "overwrite_output_dir", "use_lora", "lora_r", "lora_alpha", "lora_dropout",
                  "lora_target_modules")

# The options a resumed run may change (resume=latest with other values of these continues the run); a change of
# any other option, or of the data files' content, is refused (fastalign.train.common.Run.resume_point). They
# change how the run is watched, where it runs and when it stops, not what it computes step by step.
RESUME_SAFE = ("max_steps", "logging_steps", "eval_steps", "save_steps", "progress_bar", "plots",
               "report_to_tensorboard", "resume", "overwrite_output_dir", "output_dir", "device", "cpu_threads",
               "attn_implementation", "gradient_checkpointing", "check_model", "skip_bad_rows")
# The data options: a resumed run compares their content (a sha256 of the files), so data moved to another path
# resumes, and other rows at the same path do not.
DATA_OPTIONS = ("data", "eval_data", "gen_eval_data", "sft_data")


def warm_start_config(cfg: TrainConfig, **own) -> SFTConfig:
    """The SFT config of a warm start for the run ``cfg``: every option ``SFTConfig`` shares with ``cfg`` and
    does not list in ``WARM_START_OWN`` is ``cfg``'s; those in it take the SFT defaults, then ``own``.

    A warm start that did not complete is redone (``overwrite_output_dir``): its directory is the run's cache,
    reused only when complete; with ``resume`` set (``own``), it continues from its checkpoint instead."""
    inherited = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SFTConfig)
                 if f.name not in WARM_START_OWN and hasattr(cfg, f.name)}
    return make_config(SFTConfig, {**inherited, "overwrite_output_dir": True, **own}, "sft")


@dataclass
class RolloutConfig(WarmStartConfig):
    """Options of the commands that learn from their own sampled completions (ppo, grpo): the sampling, the
    reward, the micro-batch size of the update, and their logging defaults."""

    warmup_steps: int = 0
    eval_steps: int = 50
    save_steps: int = 100
    logging_steps: int = 1
    per_device_train_batch_size: int = field(default=64, metadata={
        "help": "sequences per forward/backward micro-batch (a minibatch is split into micro-batches: gradient "
                "accumulation)"})
    rollout_batch_size: int = field(default=128, metadata={
        "help": "prompts sampled per update on each rank (the study: 512 rollouts per update)"})
    num_mini_batches: int = field(default=2, metadata={"help": "minibatches (optimizer steps) per PPO epoch"})
    reward_fn: str = field(default="embedded", metadata={
        "help": "'module:function' or 'file.py:function' taking (prompts, completions) lists of str and returning "
                "one float per completion; 'embedded': the addition task's exact-sum reward; ignored when "
                "reward_model is given"})
    reward_model: str = field(default="", metadata={"help": "a reward model saved by `fastalign rm` (its "
                                                    "final/ directory); overrides reward_fn"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    top_k: int = field(default=0, metadata={"help": "sample among the k likeliest tokens (0: all; study: 200)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1: off)"})


@dataclass
class PPOConfig(RolloutConfig):
    """``fastalign ppo``: PPO with a critic on prompt rows (``prompt``, or chat ``messages``; the ``completion``
    column, when present, is ignored), rewarded by a reward function or a reward model. One step is one PPO
    update: rollouts, then ``ppo_epochs`` passes over ``num_mini_batches`` minibatches (one optimizer step each)."""

    max_steps: int = field(default=400, metadata={"help": "PPO updates (each: rollouts + ppo_epochs x "
                                                 "num_mini_batches optimizer steps)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "actor (policy) peak learning rate; the study's "
                                                         "default for real models is 1e-5"})
    critic_learning_rate: float = field(default=1e-3, metadata={"help": "critic peak learning rate (study: 5e-6)"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over the rollout batch per update"})
    critic_model: str = field(default="", metadata={
        "help": "initial critic (a model dir; its value_head.safetensors if present); default: the reward model "
                "when given, else the starting policy with a new value head"})
    missing_eos_penalty: float = field(default=0.0, metadata={
        "help": "subtracted from the score of a completion that did not end with EOS within max_new_tokens"})
    reward_clip: float = field(default=20.0, metadata={"help": "clip scores to [-reward_clip, reward_clip] "
                                                       "(0: off)"})
    normalize_reward: bool = field(default=False, metadata={"help": "whiten the scores over the rollout batch"})
    kl_coef: float = field(default=0.02, metadata={"help": "initial KL penalty coefficient (study: 0.1)"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimate of the penalty: k1 or k3"})
    target_kl: float = field(default=0.0, metadata={
        "help": "adaptive KL controller of Ziegler et al. (target KL per sequence; 0: fixed kl_coef)"})
    kl_horizon: float = field(default=10000.0, metadata={"help": "horizon of the adaptive KL controller"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (study: 1.0)"})
    normalize_values: bool = field(default=False, metadata={
        "help": "value normalization: the critic regresses the returns normalized by their running mean and std "
                "(over all updates and ranks), its outputs de-normalized for GAE (the study: on)"})
    whiten_advantages: bool = field(default=True, metadata={"help": "advantage normalization over the rollout "
                                                            "batch (all ranks): the study's first factor"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip (low side)"})
    cliprange_high: float = field(default=0.0, metadata={"help": "upper clip (clip-higher); 0: = cliprange"})
    dual_clip: float = field(default=0.0, metadata={"help": "dual-clip bound c > 1 for negative advantages "
                                                    "(0: off)"})
    loss_aggregation: str = field(default="token-mean", metadata={
        "help": "token-mean, seq-mean-token-sum or seq-mean-token-mean"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip (0: plain MSE)"})
    vf_coef: float = field(default=1.0, metadata={"help": "weight of the value loss (its own optimizer: this only "
                                                  "scales its gradient)"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus weight"})
    critic_warmup_steps: int = field(default=0, metadata={"help": "updates in which only the critic trains"})
    ref_ema_decay: float = field(default=0.0, metadata={
        "help": "EMA reference: after each optimizer step ref = decay * ref + (1 - decay) * policy (the study's "
                "third factor, e.g. 0.99); 0: frozen reference"})



GRPO_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class GRPOConfig(RolloutConfig):
    """``fastalign grpo``: critic-free group RL on prompt rows (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline),
    rewarded by a reward function or a reward model. One step is one update: ``num_generations`` completions of
    each of ``rollout_batch_size`` prompts, their group advantages, then ``num_iterations`` passes over
    ``num_mini_batches`` minibatches (one optimizer step each). Names follow TRL's ``GRPOConfig``."""

    max_steps: int = field(default=1500, metadata={"help": "updates (each: one generation batch + num_iterations x "
                                                  "num_mini_batches optimizer steps)"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate (TRL's default for real "
                                                         "models is 1e-6)"})
    eval_steps: int = 100
    rollout_batch_size: int = field(default=32, metadata={
        "help": "prompts per update on each rank, each sampled num_generations times"})
    num_generations: int = field(default=4, metadata={"help": "completions sampled per prompt (the group size G; "
                                                      "TRL's default: 8)"})
    num_mini_batches: int = field(default=1, metadata={
        "help": "minibatches (optimizer steps) per pass over the num_generations x rollout_batch_size completions"})
    num_iterations: int = field(default=1, metadata={
        "help": "passes over each generation batch (TRL's mu); with 1 pass and 1 minibatch the update is exactly "
                "on-policy"})
    advantage: str = field(default="grpo", metadata={
        "help": "group estimator of fastalign.rl: grpo ((r - mean) / std, or r - mean with scale_rewards=false), "
                "dr_grpo (r - mean), rloo (leave-one-out baseline: RLOO is advantage=rloo), reinforce_pp "
                "(REINFORCE++-baseline: r - mean, whitened over the batch's tokens)"})
    scale_rewards: bool = field(default=True, metadata={
        "help": "advantage=grpo: divide by the group's reward std (TRL's scale_rewards); ignored by the others"})
    epsilon: float = field(default=0.2, metadata={"help": "ratio clip, low side (and high side when "
                                                  "epsilon_high is 0)"})
    epsilon_high: float = field(default=0.0, metadata={"help": "upper ratio clip (DAPO's clip-higher: 0.28); "
                                                       "0: = epsilon"})
    loss_type: str = field(default="dapo", metadata={
        "help": "grpo: mean over sequences of each one's token mean; bnpo: token mean of each micro-batch; "
                "dr_grpo: token sum / (sequences x max_new_tokens); dapo: token mean over the whole minibatch "
                "(all micro-batches and ranks)"})
    beta: float = field(default=0.0, metadata={
        "help": "weight of the k3 KL to the reference in the loss; 0: no reference model is loaded"})

ITERDPO_PAIRS = ("best_worst", "all")
REF_UPDATES = ("round", "fixed")


@dataclass
class IterDPOConfig(DPOConfig, RolloutConfig):
    """``fastalign iterdpo``: iterative (online) DPO, the study's DPO-Iter, on prompt rows. ``rounds`` times: sample
    ``num_generations`` completions of each of ``rollout_batch_size`` prompts from the current policy, score them
    (reward function or reward model, as ``fastalign ppo``), pair each prompt's best completion with its worst (or
    every pair apart by more than ``pair_margin``), then ``max_steps / rounds`` steps of ``fastalign dpo``'s loop on
    the round's pairs (any ``loss_type``; a fresh optimizer and schedule each round), against a reference that is
    the round's starting policy or the first one (``ref_update``)."""

    rounds: int = field(default=5, metadata={"help": "sample -> score -> pair -> DPO rounds"})
    max_steps: int = field(default=250, metadata={
        "help": "DPO optimizer steps over all rounds: max_steps / rounds per round (rounds must divide it)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate of each round's schedule"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warmup steps of each round's schedule"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "pairs per micro-batch"})
    eval_steps: int = field(default=0, metadata={
        "help": "exact-match evaluation every this many steps (0: at the end of each round only)"})
    save_steps: int = field(default=0, metadata={
        "help": "checkpoint every this many steps (0: at the end of each round only; a round's end always saves)"})
    logging_steps: int = 5
    rollout_batch_size: int = field(default=256, metadata={"help": "prompts sampled per round on each rank"})
    num_generations: int = field(default=4, metadata={"help": "completions sampled per prompt each round"})
    pairs: str = field(default="best_worst", metadata={
        "help": "best_worst: one pair per prompt, its best completion over its worst (the study); all: every pair "
                "of its completions whose scores differ by more than pair_margin"})
    pair_margin: float = field(default=0.0, metadata={
        "help": "a pair needs score(chosen) - score(rejected) > pair_margin; a prompt whose completions all "
                "score within it gives no pair (counted as pairs/tied_prompts)"})
    data_chosen: bool = field(default=True, metadata={
        "help": "a prompt with no pair, whose row has a completion scoring above its samples by more than "
                "pair_margin, pairs that completion (chosen) with its worst sample (the study's fallback on code)"})
    ref_update: str = field(default="round", metadata={
        "help": "round: the reference of each round is the policy it starts from; fixed: the first round's "
                "(the starting model) throughout"})


def _base_type(tp):
    """``(origin, arg)`` for a field type: ``(int, None)``, ``(list, float)``; Optional is unwrapped."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return list, typing.get_args(tp)[0]
    return tp, None


def _coerce(name: str, tp, value):
    base, item = _base_type(tp)
    try:
        if base is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(name, item, v) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    type_name = f"list of {item.__name__}" if base is list else base.__name__
    raise ConfigError(f"{name} must be a {type_name}; got {value!r}")


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


# The most sequences one rank holds at once: a micro-batch (per_device_train_batch_size), one optimizer step's
# micro-batches (x gradient_accumulation_steps) and one rollout batch (rollout_batch_size x num_generations). It
# is a bound on the request, not on memory: the data size is not known when options are checked, and a batch
# larger than the data is legal (the stream wraps around epochs); what this stops is a typo such as 10**9 hanging
# while it builds that many indices. 65,536 sequences is more than any device holds at once.
MAX_BATCH = 1 << 16


def _device_expected(device: str) -> str | None:
    """What ``device`` must be, when it is not valid on this machine (None when it is)."""
    if device in ("auto", "cpu"):
        return None
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        return "auto, cpu, cuda or cuda:<index>"
    import torch

    if not torch.cuda.is_available():
        return "auto or cpu on this machine (no CUDA GPU)"
    n = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= n:
        return f"cuda:0 to cuda:{n - 1} ({n} GPUs)"
    return None


def _not_finite(cfg) -> list[tuple[str, bool, str]]:
    """A check of every float option (and list of floats): NaN and infinities are refused everywhere."""
    checks = []
    for name, (_, tp) in _fields(type(cfg)).items():
        base, item = _base_type(tp)
        value = getattr(cfg, name)
        if base is float:
            checks.append((name, math.isfinite(value), "a finite number"))
        elif base is list and item is float:
            checks.append((name, all(math.isfinite(v) for v in value), "finite numbers"))
    return checks


def _validate(cfg, command: str) -> None:
    """Check every option's range (ConfigError naming the option, the allowed range and the value), before any
    work."""
    micro = cfg.per_device_train_batch_size
    checks = _not_finite(cfg) + [
        ("model", bool(cfg.model), "'embedded', a model directory or a hub id"),
        ("data", bool(cfg.data), "'embedded', a data file or a datasets directory"),
        ("max_length", cfg.max_length >= 2, ">= 2"), ("max_steps", cfg.max_steps >= 1, ">= 1"),
        ("max_new_tokens", cfg.max_new_tokens >= 1, ">= 1"),
        ("per_device_train_batch_size", 1 <= micro <= MAX_BATCH, f"in [1, {MAX_BATCH}]"),
        ("gradient_accumulation_steps", cfg.gradient_accumulation_steps >= 1, ">= 1"),
        ("gradient_accumulation_steps", micro * cfg.gradient_accumulation_steps <= MAX_BATCH,
         f"at most {MAX_BATCH} / per_device_train_batch_size = {MAX_BATCH // max(micro, 1)} (a step holds at most "
         f"{MAX_BATCH} sequences per rank)"),
        ("learning_rate", cfg.learning_rate >= 0, ">= 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("adam_beta1", 0 <= cfg.adam_beta1 < 1, "in [0, 1)"), ("adam_beta2", 0 <= cfg.adam_beta2 < 1, "in [0, 1)"),
        ("warmup_steps", cfg.warmup_steps >= 0, ">= 0"),
        ("max_grad_norm", cfg.max_grad_norm >= 0, ">= 0 (0: no clipping)"),
        ("eval_steps", cfg.eval_steps >= 0, ">= 0 (0: only at the end)"),
        ("save_steps", cfg.save_steps >= 0, ">= 0 (0: only at the end)"),
        ("logging_steps", cfg.logging_steps >= 0, ">= 0 (0: only at the end)"),
        ("seed", 0 <= cfg.seed < 2**31, "in [0, 2**31)"),
        ("cpu_threads", cfg.cpu_threads >= 0, ">= 0 (0: the default)"),
        ("device", (device := _device_expected(cfg.device)) is None, device),
        ("truncation_mode", cfg.truncation_mode in ("keep_end", "keep_start"), "keep_end or keep_start"),
        ("dtype", cfg.dtype in ("float32", "bfloat16", "float64"), "float32, bfloat16 or float64"),
        ("distributed", cfg.distributed in ("ddp", "fsdp"), "ddp or fsdp"),
        ("attn_implementation", cfg.attn_implementation in ATTENTION, ", ".join(ATTENTION)),
        ("distributed", not (isinstance(cfg, RMConfig) and cfg.distributed == "fsdp"),
         "ddp for rm (FSDP2 is supported by sft, dpo and ppo)"),
        ("lora_r", cfg.lora_r >= 1, ">= 1"), ("lora_alpha", cfg.lora_alpha > 0, "> 0"),
        ("lora_dropout", 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
        ("lora_target_modules", bool(cfg.lora_target_modules), "a comma-separated list of names")]
    if isinstance(cfg, RMConfig):
        checks.append(("center_rewards_coefficient", cfg.center_rewards_coefficient >= 0, ">= 0"))
    if isinstance(cfg, WarmStartConfig):
        checks += [("sft_warmup_steps", cfg.sft_warmup_steps >= 0, ">= 0"),
                   ("sft_data", bool(cfg.sft_data), "'embedded' or a data file")]
    if cfg.attn_implementation == "flash_attention_2":
        checks.append(("attn_implementation", flash_attn_installed(),
                       "auto, sdpa or eager: flash-attn is not installed (pip install 'fastalign[flash]')"))
    if cfg.packing:
        checks.append(("packing", _transformers_at_least("4.54"), "false: packing needs transformers >= 4.54 "
                       "(position ids -> per-sequence attention)"))
    if cfg.use_lora:
        import importlib.util

        checks += [("use_lora", importlib.util.find_spec("peft") is not None,
                    "false: peft is not installed (pip install 'fastalign[lora]')"),
                   ("use_lora", not isinstance(cfg, RMConfig), "false for rm (LoRA is supported by sft, dpo and ppo)"),
                   ("use_lora", cfg.distributed != "fsdp", "false with distributed=fsdp (use ddp with LoRA)"),
                   ("use_lora", not getattr(cfg, "ref_ema_decay", 0.0),
                    "false with ref_ema_decay (the EMA reference mixes full weights)"),
                   ("use_lora", not getattr(cfg, "sync_ref_model", False),
                    "false with sync_ref_model (the moving reference mixes full weights)")]
    if isinstance(cfg, DPOConfig):
        from fastalign.losses.dpo import LOSS_TYPES

        checks += [("beta", cfg.beta > 0, "> 0"),
                   ("loss_type", bool(cfg.loss_type) and all(t in LOSS_TYPES for t in cfg.loss_type),
                    f"a comma-separated list of {', '.join(LOSS_TYPES)}"),
                   ("loss_weights", not cfg.loss_weights or len(cfg.loss_weights) == len(cfg.loss_type),
                    "empty or one weight per loss type"),
                   ("loss_weights", all(w >= 0 for w in cfg.loss_weights), ">= 0 each"),
                   ("label_smoothing", 0 <= cfg.label_smoothing <= 0.5, "in [0, 0.5]"),
                   ("label_smoothing", "robust" not in cfg.loss_type or cfg.label_smoothing < 0.5,
                    "in [0, 0.5) with loss_type robust"),
                   ("simpo_gamma", cfg.simpo_gamma >= 0, ">= 0"), ("cpo_alpha", cfg.cpo_alpha >= 0, ">= 0"),
                   ("ref_model_mixup_alpha", 0 < cfg.ref_model_mixup_alpha <= 1, "in (0, 1]"),
                   ("ref_model_sync_steps", cfg.ref_model_sync_steps >= 1, ">= 1"),
                   ("precompute_ref_log_probs", not (cfg.precompute_ref_log_probs and cfg.sync_ref_model),
                    "false when sync_ref_model is true (a moving reference cannot be precomputed)")]
    if isinstance(cfg, RolloutConfig):
        module, colon, function = cfg.reward_fn.rpartition(":")
        checks += [("rollout_batch_size", 1 <= cfg.rollout_batch_size <= MAX_BATCH, f"in [1, {MAX_BATCH}]"),
                   ("num_mini_batches", cfg.num_mini_batches >= 1, ">= 1"),
                   ("temperature", cfg.temperature > 0, "> 0"), ("top_k", cfg.top_k >= 0, ">= 0"),
                   ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"),
                   ("max_new_tokens", 1 <= cfg.max_new_tokens <= cfg.max_length - 1,
                    f"in [1, max_length - 1 = {cfg.max_length - 1}]"),
                   ("reward_fn", bool(cfg.reward_fn or cfg.reward_model), "set when reward_model is not"),
                   ("reward_fn", bool(cfg.reward_model) or cfg.reward_fn in ("", "embedded") or
                    bool(colon and module and function), "'embedded', 'module:function' or 'file.py:function'")]
        if hasattr(cfg, "num_generations"):
            checks.append(("num_generations", cfg.rollout_batch_size * cfg.num_generations <= MAX_BATCH,
                           f"at most {MAX_BATCH} / rollout_batch_size = {MAX_BATCH // max(cfg.rollout_batch_size, 1)}"
                           f" (a rollout batch holds at most {MAX_BATCH} sequences per rank)"))
    if isinstance(cfg, IterDPOConfig):
        checks += [("rounds", cfg.rounds >= 1, ">= 1"),
                   ("max_steps", cfg.rounds < 1 or cfg.max_steps % cfg.rounds == 0,
                    f"a multiple of rounds={cfg.rounds}"),
                   ("num_generations", cfg.num_generations >= 2, ">= 2 (a pair needs two completions)"),
                   ("pairs", cfg.pairs in ITERDPO_PAIRS, ", ".join(ITERDPO_PAIRS)),
                   ("pair_margin", cfg.pair_margin >= 0, ">= 0"),
                   ("ref_update", cfg.ref_update in REF_UPDATES, ", ".join(REF_UPDATES)),
                   ("precompute_ref_log_probs", not cfg.precompute_ref_log_probs,
                    "false (iterdpo scores each round's pairs with its reference once, at the round's start)"),
                   ("sync_ref_model", not cfg.sync_ref_model, "false (iterdpo's reference is set by ref_update)")]
    if isinstance(cfg, GRPOConfig):
        completions = cfg.num_generations * cfg.rollout_batch_size
        checks += [("num_generations", cfg.num_generations >= 2, ">= 2 (a group of one has no baseline)"),
                   ("num_mini_batches", 1 <= cfg.num_mini_batches <= completions,
                    f"in [1, num_generations * rollout_batch_size={completions}]"),
                   ("num_iterations", cfg.num_iterations >= 1, ">= 1"),
                   ("advantage", cfg.advantage in GRPO_ADVANTAGES, ", ".join(GRPO_ADVANTAGES)),
                   ("epsilon", 0 < cfg.epsilon < 1, "in (0, 1)"),
                   ("epsilon_high", cfg.epsilon_high >= 0, ">= 0 (0: = epsilon)"),
                   ("loss_type", cfg.loss_type in GRPO_LOSS_TYPES, ", ".join(GRPO_LOSS_TYPES)),
                   ("beta", cfg.beta >= 0, ">= 0 (0: no reference model)")]
    if isinstance(cfg, PPOConfig):
        checks += [("num_mini_batches", 1 <= cfg.num_mini_batches <= cfg.rollout_batch_size,
                    f"in [1, rollout_batch_size={cfg.rollout_batch_size}]"),
                   ("ppo_epochs", cfg.ppo_epochs >= 1, ">= 1"),
                   ("reward_clip", cfg.reward_clip >= 0, ">= 0"), ("kl_coef", cfg.kl_coef >= 0, ">= 0"),
                   ("kl_estimator", cfg.kl_estimator in ("k1", "k3"), "k1 or k3"),
                   ("target_kl", cfg.target_kl >= 0, ">= 0"), ("kl_horizon", cfg.kl_horizon > 0, "> 0"),
                   ("gamma", 0 <= cfg.gamma <= 1, "in [0, 1]"), ("lam", 0 <= cfg.lam <= 1, "in [0, 1]"),
                   ("cliprange", 0 < cfg.cliprange < 1, "in (0, 1)"),
                   ("cliprange_high", cfg.cliprange_high >= 0, ">= 0 (0: = cliprange)"),
                   ("dual_clip", cfg.dual_clip == 0 or cfg.dual_clip > 1, "0 (off) or > 1"),
                   ("loss_aggregation", cfg.loss_aggregation in ("token-mean", "seq-mean-token-sum",
                                                                 "seq-mean-token-mean"),
                    "token-mean, seq-mean-token-sum or seq-mean-token-mean"),
                   ("cliprange_value", cfg.cliprange_value >= 0, ">= 0"), ("vf_coef", cfg.vf_coef > 0, "> 0"),
                   ("critic_learning_rate", cfg.critic_learning_rate >= 0, ">= 0"),
                   ("missing_eos_penalty", cfg.missing_eos_penalty >= 0, ">= 0"),
                   ("entropy_coef", cfg.entropy_coef >= 0, ">= 0"),
                   ("critic_warmup_steps", 0 <= cfg.critic_warmup_steps < cfg.max_steps,
                    f"in [0, max_steps={cfg.max_steps})"),
                   ("ref_ema_decay", 0 <= cfg.ref_ema_decay < 1, "in [0, 1)")]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{command}: {name} must be {expected}; got {getattr(cfg, name)!r}")
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{command}"


def _transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


def make_config(cls, overrides: dict | None = None, command: str = "train"):
    """Build and validate a ``cls`` config from a dict of overrides (values may be strings, as typed on a
    command line). Unknown keys raise :class:`ConfigError` listing the valid ones."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        if key not in fields:
            raise ConfigError(f"{command}: unknown option {key!r}; valid options: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(key, fields[key][1], value)
    cfg = cls(**kwargs)
    _validate(cfg, command)
    return cfg


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    return repr(f.default_factory())


def build_parser(cls, command: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser listing every field of ``cls`` (``--name value``) with its type and default."""
    parser = argparse.ArgumentParser(prog=f"fastalign {command}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Options may also be given as key=value, or in a YAML file with "
                                            "--config; the command line wins over the file.")
    parser.add_argument("--config", default=None, help="YAML file of options (default: none)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides")
    for name, (f, tp) in _fields(cls).items():
        base, item = _base_type(tp)
        type_name = f"list[{item.__name__}]" if base is list else base.__name__
        help_text = f"{f.metadata.get('help', '')} ({type_name}, default: {_default_text(f)})".strip()
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        if base is bool:
            parser.add_argument(*flags, dest=name, nargs="?", const="true", default=argparse.SUPPRESS,
                                metavar="BOOL", help=help_text)
        else:
            parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar=type_name.upper(),
                                help=help_text)
    return parser


_BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")


def _split_argv(cls, command: str, argv: list[str]) -> tuple[str | None, dict]:
    """``(config_file, {key: value})`` from ``--key value``, ``--key=value``, ``--flag`` and ``key=value``."""
    fields = _fields(cls)
    config, values, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:
                is_bool = key in fields and _base_type(fields[key][1])[0] is bool
                if is_bool and not (i + 1 < len(argv) and argv[i + 1].lower() in _BOOL_WORDS):
                    value = "true"  # a bare --flag
                elif i + 1 < len(argv):
                    i, value = i + 1, argv[i + 1]
                else:
                    raise ConfigError(f"{command}: --{key} needs a value")
        elif "=" in arg:
            key, value = arg.split("=", 1)
            key = key.strip()
        else:
            raise ConfigError(f"{command}: arguments must be key=value or --key value; got {arg!r}")
        if key == "config":
            config = value
        else:
            values[key] = value
        i += 1
    return config, values


def parse_args(cls, command: str, argv: list[str], description: str = ""):
    """``fastalign <command>`` arguments -> a validated ``cls`` config (defaults < YAML file < command line).

    ``-h``/``--help`` prints every option with its type and default and exits.
    """
    if "-h" in argv or "--help" in argv:
        build_parser(cls, command, description or (cls.__doc__ or "").strip()).print_help()
        raise SystemExit(0)
    config, cli_values = _split_argv(cls, command, argv)
    values: dict = {}
    if config:
        import yaml

        with open(config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config} must hold a mapping of option: value; got {type(loaded).__name__}")
        values.update(loaded)
    values.update(cli_values)
    return make_config(cls, values, command)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
