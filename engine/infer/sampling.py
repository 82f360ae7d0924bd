"""The denoising loop: Qwen-Image's flow-matching scheduler, true CFG with norm rescale, edit references.

Matches diffusers' QwenImagePipeline / QwenImageEditPipeline / QwenImageEditPlusPipeline step for step; the
scheduler is diffusers' own class with Qwen/Qwen-Image's published scheduler_config.json. Two deliberate
differences that vanish in float32: the timestep goes to the DiT as float32 t/1000 (musubi, for bf16 runs), and
an optional `blend` hook (inpaint mask / RCM, engine/infer/masks.py) runs between the prediction and the step.
An optional `on_estimate` hook gets the clean estimate x0 = x_t − σ·v after chosen steps (live previews,
engine/infer/preview.py); it reads the loop's tensors and never changes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from engine.infer.preview import clean_estimate, preview_steps
from engine.models.textenc import pad_embeddings

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    invert_sigmas=False, stochastic_sampling=False, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False)


def make_scheduler(flow_shift: float | None = None):
    """diffusers' FlowMatchEulerDiscreteScheduler with the published config; a fixed --flow_shift replaces the
    resolution-dependent (dynamic) shift, the terminal stretch to 0.02 stays."""
    config = dict(QWEN_SCHEDULER_CONFIG)
    if flow_shift is not None:
        config.update(use_dynamic_shifting=False, shift=float(flow_shift))
    return FlowMatchEulerDiscreteScheduler(**config)


def calculate_mu(image_seq_len: int, config: dict = QWEN_SCHEDULER_CONFIG) -> float:
    """Linear in the packed target token count, between base_shift at 256 and max_shift at 8192 tokens."""
    m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    b = config["base_shift"] - m * config["base_image_seq_len"]
    return image_seq_len * m + b


def set_timesteps(scheduler, steps: int, image_seq_len: int, device) -> torch.Tensor:
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_mu(image_seq_len, dict(scheduler.config)) if scheduler.config.use_dynamic_shifting else None
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
    scheduler.set_begin_index(0)
    return scheduler.timesteps


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True CFG, then rescale each token's 64-vector to the conditional prediction's norm (official pipelines)."""
    comb = uncond + scale * (cond - uncond)
    return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


@dataclass
class Conditioning:
    embeds: torch.Tensor                 # (1, L, D)
    mask: torch.Tensor | None = None     # (1, L) or None when nothing is padded


@dataclass
class DenoiseRequest:
    noise: torch.Tensor                  # (1, S, 64) packed initial noise, compute dtype
    height: int
    width: int
    steps: int
    guidance_scale: float
    positive: Conditioning
    negative: Conditioning | None = None
    control_latents: torch.Tensor | None = None    # (1, sum S_c, 64) packed references, in order
    control_shapes: tuple = ()                     # ((1, h_c/16... as tokens), ...) one per reference
    flow_shift: float | None = None
    batch_cfg: bool = True       # one batch-2 pass for cond + uncond (SDPA only: the padded text needs a mask)

    @property
    def use_cfg(self) -> bool:
        return self.negative is not None and self.guidance_scale != 1.0

    def img_shapes(self) -> list:
        target = (1, self.height // 16, self.width // 16)
        return [[target, *self.control_shapes]]


BlendFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]   # (step index, t, latents) -> latents
StepFn = Callable[[int, int], None]                                   # (step done, total)
EstimateFn = Callable[[int, int, torch.Tensor], None]                 # (step done, total, x0 packed float32)


@torch.no_grad()
def denoise(dit, req: DenoiseRequest, blend: BlendFn | None = None, on_step: StepFn | None = None,
            on_estimate: EstimateFn | None = None, estimate_every: int | None = None) -> torch.Tensor:
    """Run the loop; returns the packed latents (1, S, 64) in the noise dtype. `on_estimate` is called after the
    steps preview.preview_steps(steps, estimate_every) picks."""
    scheduler = make_scheduler(req.flow_shift)
    latents = req.noise
    n_target = latents.shape[1]
    timesteps = set_timesteps(scheduler, req.steps, n_target, latents.device)
    img_shapes = req.img_shapes()
    joint = _joint(req.positive, req.negative) if req.use_cfg and req.batch_cfg else None
    estimate_at = set(preview_steps(len(timesteps), estimate_every)) if on_estimate is not None else set()
    for i, t in enumerate(timesteps):
        model_in = latents if req.control_latents is None else torch.cat([latents, req.control_latents], dim=1)
        timestep = (t.expand(latents.shape[0]) / 1000).to(torch.float32)
        if joint is not None:
            both = _predict(dit, torch.cat([model_in, model_in]), timestep.repeat(2), joint, img_shapes * 2)
            pred, neg = both[:, :n_target].chunk(2)
            pred = cfg_combine(pred, neg, req.guidance_scale)
        else:
            pred = _predict(dit, model_in, timestep, req.positive, img_shapes)[:, :n_target]
            if req.use_cfg:
                neg = _predict(dit, model_in, timestep, req.negative, img_shapes)[:, :n_target]
                pred = cfg_combine(pred, neg, req.guidance_scale)
        if blend is not None:
            latents = blend(i, t, latents)
        # from the latents this step starts from (after the blend) and its velocity: a new tensor, nothing changes
        x0 = clean_estimate(latents, pred, scheduler.sigmas[i]) if i + 1 in estimate_at else None
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
        if x0 is not None:
            on_estimate(i + 1, len(timesteps), x0)
    return latents


def _joint(pos: Conditioning, neg: Conditioning) -> Conditioning:
    """cond and uncond text as one batch of 2, zero-padded to the longer one with a mask (None if equal)."""
    embeds, mask = pad_embeddings([pos.embeds[0], neg.embeds[0]])
    return Conditioning(embeds, mask)


def _predict(dit, hidden, timestep, cond: Conditioning, img_shapes) -> torch.Tensor:
    return dit(hidden_states=hidden, timestep=timestep, encoder_hidden_states=cond.embeds,
               encoder_hidden_states_mask=cond.mask, img_shapes=img_shapes, return_dict=False)[0]
