"""RL math for PPO-style training: advantage estimators, KL estimators and controllers, whitening, EMA."""

from fastalign.rl.advantages import dr_grpo, gae, grpo, reinforce_pp, rloo
from fastalign.rl.kl import k1, k2, k3, kl_estimate, kl_penalized_rewards
from fastalign.rl.ppo import AdaptiveKLController, FixedKLController, RunningMoments, ema_update_, ppo_advantages
from fastalign.rl.whiten import whiten

__all__ = ["AdaptiveKLController", "FixedKLController", "RunningMoments", "dr_grpo", "ema_update_", "gae", "grpo",
           "k1", "k2", "k3", "kl_estimate", "kl_penalized_rewards", "ppo_advantages", "reinforce_pp", "rloo",
           "whiten"]
