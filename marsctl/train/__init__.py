"""Training: the supervised separator trainer and the infrastructure RL reuses
(checkpoints with exact resume, distributed launch, resumable data order)."""
