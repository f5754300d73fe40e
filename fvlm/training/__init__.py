"""One training run: optimisation, logging, checkpoints, resume, DDP."""
