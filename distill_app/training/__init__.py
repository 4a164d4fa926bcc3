"""Training: configuration, data preparation, schedule, losses, checkpoints and the trainer loop."""
