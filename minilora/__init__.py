"""minilora: LoRA and QLoRA fine-tuning from scratch in plain PyTorch."""
