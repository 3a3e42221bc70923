"""Fine-tuning from a checkpoint: parameter patterns to train or freeze with per-group learning rates (params.py),
a warm start that reports what it loaded (warm_start.py), LoRA adapters through ``peft`` (lora.py), and a first
stage's decoder adapted to images outside its training domain with the latent space kept (decoder.py)."""
