"""Fine-tuning from a checkpoint: parameter patterns to train or freeze with per-group learning rates (params.py),
a warm start that reports what it loaded (warm_start.py), and LoRA adapters through ``peft`` (lora.py)."""
