"""The trainer: ``fastalign sft`` / ``rm`` / ``dpo`` / ``ppo`` / ``grpo`` / ``iterdpo`` on any Hugging Face causal LM,
or the embedded default.

Each command is one readable loop (``sft.py``, ``rm.py``, ``dpo.py``, ``ppo.py``, ``grpo.py``, ``iterdpo.py``; the
rollouts and what the online loops share in ``rollout.py``) over shared parts: typed configs (``config.py``), data
(``data.py``), model loading and saving (``model.py``; what the models compute is :mod:`fastalign.hf`'s: hidden
states -> ``linear_logprobs``, no logits), checkpoints (``checkpoint.py``) and the run environment (``common.py``:
ranks, optimizer, the accumulation step, logging).
"""

from fastalign.train.config import DPOConfig, GRPOConfig, IterDPOConfig, PPOConfig, RMConfig, SFTConfig, TrainConfig
from fastalign.train.dpo import train_dpo
from fastalign.train.grpo import train_grpo
from fastalign.train.iterdpo import train_iterdpo
from fastalign.train.ppo import train_ppo
from fastalign.train.rm import train_rm
from fastalign.train.sft import train_sft

__all__ = ["DPOConfig", "GRPOConfig", "IterDPOConfig", "PPOConfig", "RMConfig", "SFTConfig", "TrainConfig", "train_dpo",
           "train_grpo", "train_iterdpo", "train_ppo", "train_rm", "train_sft"]
