"""RL math for PPO-style training: advantage estimators, KL estimators, whitening."""
