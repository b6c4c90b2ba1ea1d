"""Training: one session (`session`: torchrun, resume, stop, clip and step, logging, checkpoints) and short stage
loops (`pretrain`, `sft`); the recipes (`config`), where the model comes from (`model`), the optimizer and schedule
(`optim`), MoE balancing (`balance`), run checkpoints (`checkpoint`) and the metrics log (`metrics`)."""
