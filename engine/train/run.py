"""The two training commands. Both are the same loop (engine/train/loop.py) with a different trainee
(engine/train/trainee.py):

- `python -m engine train_network ...`  LoRA on a frozen DiT (musubi's qwen_image_train_network.py options)
- `python -m engine train ...`          full finetune (+ --full_bf16, --fused_backward_pass, --mem_eff_save)

Either under `accelerate launch [--num_processes N] -m engine <command> ...` for several GPUs / processes.
"""

from __future__ import annotations

from engine.train.loop import run_training


def train_network(cfg, events) -> list[str]:
    return run_training(cfg, events, full=False)


def train(cfg, events) -> list[str]:
    return run_training(cfg, events, full=True)
