"""RL math for PPO-style training: advantage estimators, KL estimators, whitening."""

from fastalign.rl.advantages import dr_grpo, gae, grpo, reinforce_pp, rloo
from fastalign.rl.kl import k1, k2, k3, kl_estimate, kl_penalized_rewards
from fastalign.rl.whiten import whiten

__all__ = ["dr_grpo", "gae", "grpo", "k1", "k2", "k3", "kl_estimate", "kl_penalized_rewards", "reinforce_pp",
           "rloo", "whiten"]

from fastalign.rl.ppo import AdaptiveKLController, FixedKLController, ema_update_, ppo_advantages  # noqa: E402

__all__ += ["AdaptiveKLController", "FixedKLController", "ema_update_", "ppo_advantages"]
