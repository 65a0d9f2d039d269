"""MARS-Sep reinforcement-learning fine-tuning of the separator's Beta mask policy (``marsctl train rl``).

- :mod:`marsctl.rl.config`: the settings (``RLConfig``, recipes);
- :mod:`marsctl.rl.rewards`: the open registry of named reward terms (``@reward(name, needs=...)``);
- :mod:`marsctl.rl.rollout`: G sampled masks per mixture, scored by the frozen reward encoder;
- :mod:`marsctl.rl.advantages`: group-relative advantages (+ the moving-average baseline);
- :mod:`marsctl.rl.losses`: the clipped surrogate, the pathwise objective, entropy, KL, diagnostics;
- :mod:`marsctl.rl.update`: one RL step, one equation per line;
- :mod:`marsctl.rl.trainer`: the RL task of the shared training loop (:mod:`marsctl.train.loop`).
"""
