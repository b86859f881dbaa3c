"""Training: optimiser, schedules, losses, checkpoints and the loop."""
