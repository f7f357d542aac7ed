"""Alignment objectives built on the ops: the DPO family, the PPO family and the reward-model loss."""
