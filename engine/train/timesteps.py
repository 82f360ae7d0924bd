"""Timestep sampling, noisy inputs and loss weighting for rectified-flow training (musubi-tuner's methods).

Convention: t ∈ [0, 1], t = 1 is pure noise; x_t = (1 − t)·x0 + t·ε; target = ε − x0.
Continuous methods feed the DiT `timesteps = 1000·t + 1` (so it sees t + 0.001) while x_t uses t; `sigma`
samples an index into the unshifted 1000-step schedule (timesteps 1000 … 1) and uses σ = timestep / 1000.

API:
- `TimestepSampler.from_config(cfg)`                       from TrainingOptions fields
- `sampler.sample(batch, latent_hw, generator) -> (t, timesteps)`   t for noising; timesteps/1000 to the DiT
- `noisy_input(latents, noise, t) -> (x_t, target)`
- `loss_weighting(scheme, timesteps) -> tensor | None`     sigma_sqrt / cosmap, None for the others
- `qwen_shift(h, w)`                                       exp(μ) with μ = lin(256, 0.5, 8192, 0.9)((h//2)(w//2))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.spec.errors import OptionError

METHODS = ("sigma", "uniform", "sigmoid", "shift", "qwen_shift", "logsnr", "qinglong_qwen")
NUM_TRAIN_TIMESTEPS = 1000
QINGLONG_SHIFT_SHARE = 0.95            # qinglong_qwen: 95 % qwen_shift, 5 % low-noise "logsnr2"
LOGSNR2_MEAN, LOGSNR2_STD = 5.36, 1.0


def lin_function(x1: float, y1: float, x2: float, y2: float):
    """musubi's get_lin_function: the line through (x1, y1) and (x2, y2)."""
    m = (y2 - y1) / (x2 - x1)
    return lambda x: y1 + m * (x - x1)


def qwen_shift(latent_h: int, latent_w: int) -> float:
    """Resolution-dependent shift: tokens = (h//2)(w//2); 1328² → e^0.834 ≈ 2.30, 1024² → e^0.6935 ≈ 2.0."""
    mu = lin_function(256, 0.5, 8192, 0.9)((latent_h // 2) * (latent_w // 2))
    return math.exp(mu)


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class TimestepSampler:
    method: str = "sigma"
    min_timestep: int | None = None
    max_timestep: int | None = None
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    preserve_distribution_shape: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise OptionError(f"--timestep_sampling {self.method!r} is not supported.", f"Use one of {METHODS}.")
        lo, hi = self.t_range
        if not 0 <= lo < hi <= NUM_TRAIN_TIMESTEPS:
            raise OptionError(f"--min_timestep {self.min_timestep} / --max_timestep {self.max_timestep}: need "
                              "0 <= min < max <= 1000.", "Fix the two values.")

    @classmethod
    def from_config(cls, cfg) -> "TimestepSampler":
        return cls(cfg.timestep_sampling, cfg.min_timestep, cfg.max_timestep, cfg.discrete_flow_shift,
                   cfg.sigmoid_scale, cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                   getattr(cfg, "preserve_distribution_shape", False))

    @property
    def t_range(self) -> tuple[int, int]:
        lo = self.min_timestep if self.min_timestep is not None else 0
        hi = self.max_timestep if self.max_timestep is not None else NUM_TRAIN_TIMESTEPS
        return lo, hi

    # ------------------------------------------------------------------------------------------ sampling
    def sample(self, batch: int, latent_hw: tuple[int, int], generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(t for noising, timesteps for the DiT ×1000), both float32 of shape (batch,)."""
        if self.method == "sigma":
            timesteps = self._sigma_timesteps(batch, generator)
            return (timesteps / NUM_TRAIN_TIMESTEPS).to(device), timesteps.to(device)
        lo, hi = (v / NUM_TRAIN_TIMESTEPS for v in self.t_range)
        if self.preserve_distribution_shape:
            t = self._rejection(batch, latent_hw, generator, lo, hi)
        else:
            t = self._raw(batch, latent_hw, generator) * (hi - lo) + lo
        return t.to(device), (t * NUM_TRAIN_TIMESTEPS + 1).to(device)

    def _rejection(self, batch, latent_hw, generator, lo, hi) -> torch.Tensor:
        kept = torch.empty(0)
        for _ in range(1000):
            t = self._raw(batch, latent_hw, generator)
            kept = torch.cat([kept, t[(t >= lo) & (t <= hi)]])
            if len(kept) >= batch:
                return kept[:batch]
        raise OptionError(f"--min_timestep/--max_timestep {self.t_range}: the {self.method} distribution almost "
                          "never falls in this range.", "Widen the range or drop --preserve_distribution_shape.")

    def _raw(self, batch: int, latent_hw, generator) -> torch.Tensor:
        randn = lambda: torch.randn(batch, generator=generator)                       # noqa: E731
        m = self.method
        if m == "uniform":
            return torch.rand(batch, generator=generator)
        if m == "sigmoid":
            return torch.sigmoid(self.sigmoid_scale * randn())
        if m == "shift":
            return shift_t(torch.sigmoid(self.sigmoid_scale * randn()), self.discrete_flow_shift)
        if m == "qwen_shift":
            return shift_t(torch.sigmoid(self.sigmoid_scale * randn()), qwen_shift(*latent_hw))
        if m == "logsnr":
            return torch.sigmoid(-(randn() * self.logit_std + self.logit_mean) / 2)
        # qinglong_qwen: one draw of each kind per sample, picked per sample
        shifted = shift_t(torch.sigmoid(self.sigmoid_scale * randn()), qwen_shift(*latent_hw))
        low_noise = torch.sigmoid(-(randn() * LOGSNR2_STD + LOGSNR2_MEAN) / 2)
        pick = torch.rand(batch, generator=generator) < QINGLONG_SHIFT_SHARE
        return torch.where(pick, shifted, low_noise)

    def _sigma_timesteps(self, batch: int, generator) -> torch.Tensor:
        """u from the weighting-scheme density → index into the unshifted schedule 1000 … 1 (no shift)."""
        if self.weighting_scheme == "logit_normal":
            u = torch.sigmoid(torch.randn(batch, generator=generator) * self.logit_std + self.logit_mean)
        elif self.weighting_scheme == "mode":
            u = torch.rand(batch, generator=generator)
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            u = torch.rand(batch, generator=generator)
        lo, hi = self.t_range
        idx = (u * (hi - lo) + lo).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        return schedule_timesteps()[idx]


def schedule_timesteps() -> torch.Tensor:
    """The unshifted FlowMatchDiscreteScheduler grid: 1000, 999, …, 1."""
    return torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32)


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (1 − t)·x0 + t·ε (t broadcast per sample) and the velocity target ε − x0."""
    tb = t.to(latents.dtype).reshape(-1, *([1] * (latents.dim() - 1)))
    return (1 - tb) * latents + tb * noise, noise - latents


def loss_weighting(scheme: str, timesteps: torch.Tensor) -> torch.Tensor | None:
    """SD3's loss weights on σ looked up in the unshifted schedule (continuous timesteps snap to the grid):
    sigma_sqrt → σ⁻², cosmap → 2 / (π(1 − 2σ + 2σ²)); None for none/logit_normal/mode."""
    if scheme not in ("sigma_sqrt", "cosmap"):
        return None
    sigma = timesteps.round().clamp(1, NUM_TRAIN_TIMESTEPS) / NUM_TRAIN_TIMESTEPS
    if scheme == "sigma_sqrt":
        return sigma.float() ** -2.0
    return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
