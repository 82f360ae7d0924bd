"""Inpaint mask and Reference Consistency Mask (RCM) for edit models, as musubi-tuner does them
(docs/architecture.md, "Precise semantics"). White / 1 = change, black / 0 = keep the first control image.

Both blend the current latents with the first control re-noised to the current time,
`ref_t = z_ctrl0·(1 − t/1000) + ε0·t/1000`, between the velocity prediction and the scheduler step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.models.latents import unpack
from engine.spec import imageio
from engine.spec.controls import cover_crop
from engine.spec.events import RcmStep
from engine.spec.jobs import Job

def load_mask_tokens(path: str | Path, width: int, height: int) -> torch.Tensor:
    """(1, S, 1) soft mask on the token grid: cover-resize + centre crop to the output size, red channel,
    bilinear down to (H/16, W/16), mapped to [0, 1]."""
    image = cover_crop(imageio.read_rgb(path), (width, height))
    red = torch.from_numpy(np.asarray(image, dtype=np.float32)[..., 0] / 255.0 * 2.0 - 1.0)
    grid = F.interpolate(red[None, None], size=(height // 16, width // 16), mode="bilinear", align_corners=False)
    return ((grid + 1.0) / 2.0).reshape(1, -1, 1)


def noisy_reference(ref0: torch.Tensor, noise0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t_n = (t / 1000).to(torch.float32)
    return (ref0.float() * (1 - t_n) + noise0.float() * t_n).to(ref0.dtype)


def inpaint_blend(mask: torch.Tensor, ref0: torch.Tensor, noise0: torch.Tensor) -> Callable:
    """Blend hook for `sampling.denoise`: keep the black region on the noisy reference at every step."""
    mask = mask.to(ref0.device, ref0.dtype)

    def blend(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return latents * mask + noisy_reference(ref0, noise0, t) * (1 - mask)

    return blend


def gaussian_kernel_size(kernel_size: int) -> int:
    return kernel_size | 1   # musubi forces an odd kernel


def gaussian_blur(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's `gaussian_blur(x, [k, k])` with its default sigma 0.3·((k−1)·0.5 − 1) + 0.8 and reflect
    padding, without torchvision: a separable depthwise conv2d."""
    k = kernel_size
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    half = (k - 1) * 0.5
    coords = torch.linspace(-half, half, steps=k)
    pdf = torch.exp(-0.5 * (coords / sigma).pow(2))
    kernel1d = pdf / pdf.sum()
    kernel2d = torch.outer(kernel1d, kernel1d).to(x.dtype if x.is_floating_point() else torch.float32)
    c = x.shape[1]
    weight = kernel2d.to(x.device).expand(c, 1, k, k)
    pad = k // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, weight, groups=c)


def rcm_mask_name(job: Job, step: int) -> str:
    """musubi's debug mask name: first control's stem, the RCM settings, the step."""
    return (f"{Path(job.control_image_path[0]).stem}_th{job.rcm_threshold}_rel{int(job.rcm_relative_threshold)}"
            f"_ks{job.rcm_kernel_size}_ds{job.rcm_dilate_size}_rcm_mask_{step:02d}.png")


def rcm_difference(latents: torch.Tensor, ref_t: torch.Tensor, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, th): the channel-mean |blurred latents − blurred reference| on the latent grid, and the threshold."""
    lat = unpack(latents, job.height, job.width)[:, :, 0].float()
    ref = unpack(ref_t, job.height, job.width)[:, :, 0].float()
    if job.rcm_kernel_size > 1:
        k = gaussian_kernel_size(job.rcm_kernel_size)
        lat, ref = gaussian_blur(lat, k), gaussian_blur(ref, k)
    d = (lat - ref).abs().mean(dim=1, keepdim=True)
    th = job.rcm_threshold * d.max() if job.rcm_relative_threshold else torch.tensor(job.rcm_threshold)
    return d, th


def rcm_mask(d: torch.Tensor, th: torch.Tensor, job: Job, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, H/16, W/16) mask: 1 where the latents moved away from the noisy reference (keep generating)."""
    mask = (d >= th).to(dtype)
    mask = F.interpolate(mask, size=(job.height // 16, job.width // 16), mode="bilinear", align_corners=False)
    if job.rcm_dilate_size > 0:
        r = job.rcm_dilate_size
        mask = F.max_pool2d(mask, kernel_size=2 * r + 1, stride=1, padding=r)
    return mask


def rcm_blend(job: Job, ref0: torch.Tensor, noise0: torch.Tensor, debug_dir: Path | None = None,
              on_step: Callable[[RcmStep], None] | None = None) -> Callable:
    """Blend hook for `sampling.denoise`: from the second step on, reset regions that still match the reference.
    With `debug_dir` (--rcm_debug_save) each step's mask is saved there and `on_step` gets its RcmStep record."""

    def blend(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if i == 0:
            return latents
        ref_t = noisy_reference(ref0, noise0, t)
        d, th = rcm_difference(latents, ref_t, job)
        mask = rcm_mask(d, th, job, latents.dtype)
        if debug_dir is not None:
            path = Path(debug_dir) / rcm_mask_name(job, i)
            save_mask_png(mask, path)
            if on_step is not None:
                on_step(RcmStep(str(path), step=i, min=d.min().item(), max=d.max().item(), mean=d.mean().item(),
                                threshold=float(th)))
        m = mask.reshape(latents.shape[0], -1, 1).to(latents.dtype)
        return latents * m + ref_t * (1 - m)

    return blend


def save_mask_png(mask: torch.Tensor, path: Path) -> None:
    """8-bit grayscale PNG of the token-grid mask (W/16 × H/16)."""
    arr = (mask[0, 0].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr, mode="L").save(tmp, format="PNG")
    tmp.replace(path)
