"""One training step's math on cached latents (as musubi-tuner's trainer does it): rectified-flow velocity target, the edit
sequence, per-version RoPE image shapes, and the loss on the target tokens only.

Sequence: `[noisy target tokens | clean control 0 tokens | clean control 1 tokens ...]` (each packed 2×2 → 64
channels), `img_shapes = [[(1, h/2, w/2), (1, hc/2, wc/2), ...]]` per sample, as diffusers' edit pipelines and
musubi build it. Edit-2511's reference tokens at t = 0 (`zero_cond_t`) are handled by the DiT itself (the loader
sets it from the model version). The DiT output is sliced to the target tokens before the loss, so control
tokens never enter it.

API:
- `prepare_inputs(batch, sampler, generator, device, dtype) -> StepInputs`   noise/timesteps from `generator`
- `predict(dit, inputs, split_attn=False) -> (B, S_target, 64)`              target-token prediction
- `flow_loss(pred_tokens, inputs) -> scalar`                                mse(pred, ε − x0) × weighting, mean
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.latents import pack, unpack
from engine.models.textenc import pad_embeddings
from engine.spec.dataset.masks import MASK_KEY
from engine.train.timesteps import TimestepSampler, loss_weighting, noisy_input


@dataclass
class StepInputs:
    hidden: torch.Tensor            # (B, S_target + S_controls, 64): noisy target then clean controls
    n_target: int                   # target tokens (the loss covers these only)
    target: torch.Tensor            # (B, 16, 1, h, w) velocity ε − x0, float32
    timestep: torch.Tensor          # (B,) float32, timesteps / 1000 as the DiT takes it
    text: torch.Tensor              # (B, L, D) zero-padded text embeddings
    text_mask: torch.Tensor | None  # (B, L) or None when nothing is padded
    img_shapes: list                # per sample: [(1, h/2, w/2), (1, hc/2, wc/2), ...]
    weights: torch.Tensor | None    # (B,) loss weights (sigma_sqrt / cosmap) or None
    pixel_hw: tuple[int, int]       # target image height, width in pixels (for unpack)
    mask: torch.Tensor | None = None    # (B, 1, 1, h, w) loss weights per latent (mask_directory) or None


def control_keys(batch: dict) -> list[str]:
    """latents_control_0, latents_control_1, ... in order (edit datasets; none for text-to-image)."""
    keys = [k for k in batch if k.startswith("latents_control_")]
    return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))


def prepare_inputs(batch: dict, sampler: TimestepSampler, generator: torch.Generator, device: torch.device,
                   dtype: torch.dtype) -> StepInputs:
    """Noise and timesteps are drawn on the CPU from `generator`, so a step is reproducible on any device and a
    resumed run draws exactly what the uninterrupted one drew."""
    latents = batch["latents"].float()                                  # (B, 16, 1, h, w)
    b, _, _, h, w = latents.shape
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    t, timesteps = sampler.sample(b, (h, w), generator)
    noisy, target = noisy_input(latents, noise, t)
    parts = [pack(noisy)]
    shapes = [(1, h // 2, w // 2)]
    for key in control_keys(batch):
        control = batch[key].float()
        parts.append(pack(control))
        shapes.append((1, control.shape[-2] // 2, control.shape[-1] // 2))
    text, mask = pad_embeddings([e.float() for e in batch["vl_embed"]])
    weights = loss_weighting(sampler.weighting_scheme, timesteps)
    return StepInputs(
        hidden=torch.cat(parts, dim=1).to(device, dtype), n_target=parts[0].shape[1],
        target=target.to(device), timestep=(timesteps / 1000).to(device, torch.float32),
        text=text.to(device, dtype), text_mask=None if mask is None else mask.to(device),
        img_shapes=[list(shapes)] * b, weights=None if weights is None else weights.to(device),
        pixel_hw=(h * 8, w * 8), mask=None if MASK_KEY not in batch else batch[MASK_KEY].float().to(device))


def predict(dit, inputs: StepInputs, split_attn: bool = False) -> torch.Tensor:
    """The DiT's prediction for the target tokens. `split_attn` runs one sample at a time (no padding mask,
    for attention kernels that ignore masks), as musubi's --split_attn."""
    if split_attn and inputs.hidden.shape[0] > 1:
        outs = []
        for i in range(inputs.hidden.shape[0]):
            length = int(inputs.text_mask[i].sum()) if inputs.text_mask is not None else inputs.text.shape[1]
            outs.append(_forward(dit, inputs.hidden[i:i + 1], inputs.timestep[i:i + 1],
                                 inputs.text[i:i + 1, :length], None, inputs.img_shapes[i:i + 1]))
        out = torch.cat(outs)
    else:
        out = _forward(dit, inputs.hidden, inputs.timestep, inputs.text, inputs.text_mask, inputs.img_shapes)
    return out[:, :inputs.n_target]


def _forward(dit, hidden, timestep, text, mask, img_shapes) -> torch.Tensor:
    return dit(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text,
               encoder_hidden_states_mask=mask, img_shapes=img_shapes, return_dict=False)[0]


def flow_loss(pred_tokens: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """musubi's compute_loss: mse(pred.float(), target, reduction=none) × per-sample weight, mean. With a loss mask
    each latent's error is multiplied by its weight first and the mean stays over all latents (kohya's masked
    loss): an all-white mask is the plain loss, a black region gives no gradient."""
    pred = unpack(pred_tokens.float(), *inputs.pixel_hw)
    loss = torch.nn.functional.mse_loss(pred, inputs.target, reduction="none")
    if inputs.mask is not None:
        loss = loss * inputs.mask
    if inputs.weights is not None:
        loss = loss * inputs.weights.reshape(-1, *([1] * (loss.dim() - 1)))
    return loss.mean()
