"""Live previews during denoising (`--preview_every N`): the model's current guess of the finished image.

Flow matching predicts a velocity v with x_t = (1 − σ)·x0 + σ·noise, so the clean estimate after a step's
prediction is x0 = x_t − σ_t·v (the same formula diffusers' scheduler uses for its stochastic mode). It costs no
extra DiT call, only one VAE decode per preview, with the VAE that is already loaded for the final decode. The
estimate is computed into new tensors: the sampling latents are never touched, so the final image is bit-identical
to a run without previews (tests/test_generate_cli.py checks it).

Previews are written after steps N, 2N, ... but not after the last step (its estimate *is* the output, decoded
anyway). Each is a PNG of at most MAX_SIDE px under `<save_path>/previews/`, named
`<run time>_<job index>_step<step>.png`, announced as an `image` event with kind "preview".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from engine.infer.outputs import time_flag, to_pil
from engine.models.latents import unpack
from engine.models.vae import decode_latents
from engine.spec import naming
from engine.spec.events import Preview

log = logging.getLogger(__name__)

MAX_SIDE = 384        # a preview is for watching the run, not for keeping: small and fast to write and send


def preview_steps(total: int, every: int | None) -> list[int]:
    """The steps (1-based, counted when done) after which a preview is written."""
    if not every:
        return []
    return [s for s in range(every, total, every)]


def clean_estimate(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x_t − σ·v in float32 (as the scheduler steps), as a new tensor."""
    return latents.to(torch.float32) - sigma.to(velocity.device, torch.float32) * velocity.to(torch.float32)


class Previewer:
    """Decodes and saves the clean estimate of one run's jobs every `every` steps."""

    def __init__(self, every: int, vae, save_dir: Path, events):
        self.every = every
        self.vae = vae
        self.folder = save_dir / naming.PREVIEW_FOLDER
        self.stamp = time_flag()          # runs sharing a --save_path (the GUI's) must not overwrite each other
        self.events = events
        self.enabled = True

    @torch.no_grad()
    def save(self, x0: torch.Tensor, step: int, total: int, height: int, width: int, index: int) -> Path | None:
        """Decode x0 (1, S, 64 packed) and write the preview; a CUDA out-of-memory here turns previews off for
        the rest of the run with a warning rather than losing the generation."""
        if not self.enabled:
            return None
        try:
            pixels = decode_latents(self.vae, unpack(x0, height, width))
        except torch.cuda.OutOfMemoryError:
            self.enabled = False
            torch.cuda.empty_cache()
            log.warning("out of GPU memory decoding the step %d preview: previews are off for the rest of this "
                        "run (the image itself is unaffected); use a larger --preview_every or none", step)
            return None
        image = to_pil(pixels[0])
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        path = self.folder / f"{self.stamp}_{index:03d}_step{step:03d}.png"
        _save_png(image, path)
        self.events.write(Preview(str(path), step=step, total=total, index=index))
        return path


def _save_png(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
