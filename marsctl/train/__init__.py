"""Training: the loop shared by ``train sup`` and ``train rl`` (:mod:`marsctl.train.loop`: checkpoints
and exact resume, validation cadence, logging, DDP, the run lock) and the supervised task."""
