"""MARS-Sep reinforcement-learning fine-tuning of the separator's Beta mask policy.

- :mod:`marsctl.rl.advantages`: group-relative advantages (+ moving-average baseline);
- :mod:`marsctl.rl.losses`: the clipped surrogate with entropy bonus and KL to the reference policy;
- :mod:`marsctl.rl.rewards`: rewards as a weighted list of named reward functions;
- :mod:`marsctl.rl.trainer`: ``marsctl train rl`` (rollouts, PPO epochs, checkpoints, DDP);
- :mod:`marsctl.rl.decode`: ``best-of-N`` decoding for ``marsctl separate``.
"""
