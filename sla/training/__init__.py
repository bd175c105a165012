"""Fine-tuning a diffusers video DiT into SLA: flow-matching / distillation losses, trainer, checkpoints."""
