"""Training building blocks: LoRA network (lora.py) and its file metadata (lora_metadata.py), timestep sampling
and noisy inputs (timesteps.py), optimizers, LR schedulers and the fused Adafactor step (optim.py)."""
