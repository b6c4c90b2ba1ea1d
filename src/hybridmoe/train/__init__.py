"""Training: the recipe, the optimizer and schedule, MoE balancing, trainer state, and the one training loop."""
