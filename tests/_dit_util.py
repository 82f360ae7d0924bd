"""Tiny QwenImageTransformer2DModel (the real channel layout, tiny widths) and matching inputs, for the LoRA, fp8,
block-swap and checkpointing tests."""

from __future__ import annotations

import torch

TINY = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 4, 4))


def tiny_dit(num_layers: int = 2, seed: int = 0, **extra):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**{**TINY, "num_layers": num_layers, **extra}).eval()


def dit_inputs(batch: int = 1, h: int = 4, w: int = 4, text: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, h * w, 64, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
                encoder_hidden_states_mask=torch.ones(batch, text, dtype=torch.long),
                timestep=torch.full((batch,), 0.6), img_shapes=[[(1, h, w)]] * batch, return_dict=False)


def run(dit, inputs: dict) -> torch.Tensor:
    return dit(**inputs)[0]
