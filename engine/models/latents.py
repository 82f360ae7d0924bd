"""Latent packing and the seed → noise recipe (docs/architecture.md, "Precise semantics"), shared by inference
and training."""

from __future__ import annotations

import torch

LATENT_CHANNELS = 16
VAE_SCALE = 8


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, 16, [1,] h, w) → (B, (h/2)(w/2), 64), channel index c·4 + dy·2 + dx, row-major tokens."""
    if latents.ndim == 5:
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, S, 64) → (B, 16, 1, h, w) for an image of height × width pixels."""
    b, _, d = tokens.shape
    h, w = 2 * (height // 16), 2 * (width // 16)
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, 1, h, w)


def initial_noise(seed: int, height: int, width: int, batch: int = 1) -> torch.Tensor:
    """Exactly diffusers' recipe: CPU generator, float32, (B, 1, 16, H/8, W/8), then packed."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    h, w = 2 * (height // 16), 2 * (width // 16)
    noise = torch.randn((batch, 1, LATENT_CHANNELS, h, w), generator=gen, dtype=torch.float32)
    return pack(noise.permute(0, 2, 1, 3, 4))
