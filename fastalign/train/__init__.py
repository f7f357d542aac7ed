"""The trainer: ``fastalign sft`` / ``rm`` / ``dpo`` on any Hugging Face causal LM, or the embedded default.

Each command is one readable loop (``sft.py``, ``rm.py``, ``dpo.py``) over shared parts: typed configs
(``config.py``), data (``data.py``), the model adapter (``model.py``: hidden states -> ``linear_logprobs``, no
logits), checkpoints (``checkpoint.py``) and the run environment (``common.py``: ranks, optimizer, logging).
"""

from fastalign.train.config import DPOConfig, RMConfig, SFTConfig, TrainConfig
from fastalign.train.dpo import train_dpo
from fastalign.train.rm import train_rm
from fastalign.train.sft import train_sft

__all__ = ["DPOConfig", "RMConfig", "SFTConfig", "TrainConfig", "train_dpo", "train_rm", "train_sft"]
