"""Training: losses, the loop shared by pretrain and fine-tune, DDP, checkpoints."""

