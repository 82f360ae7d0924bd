"""Writing results: PNGs with their generation parameters, latent files, musubi's file names.

Images: `<save_path>/<YYYYMMDD-HHMMSS-mmm>_<seed>[_<control stem>]_000.png`, with a PNG text chunk `parameters`
holding JSON under the config's field names (the GUI loads it back into its form).
Latents: `<save_path>/<time>_<seed>_latent[_<control stem>].safetensors`, key `latent` (1, 16, 1, H/8, W/8) in DiT
space (normalised), metadata `seeds prompt height width infer_steps embedded_cfg_scale guidance_scale
[negative_prompt]` as musubi writes them, plus our `parameters` JSON.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open

from engine.models.safetensors_io import save_file_atomic
from engine.spec import naming
from engine.spec.errors import ModelFileError, NumericError

PARAMETERS_KEY = naming.PNG_PARAMETERS_KEY


def time_flag() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]


def _unique(path: Path) -> Path:
    """Two outputs in the same millisecond (batch mode) must not overwrite each other."""
    if not path.exists():
        return path
    stem, suffix = path.stem, path.suffix
    n = 1
    while (candidate := path.with_name(f"{stem}-{n}{suffix}")).exists():
        n += 1
    return candidate


def original_suffix(control_paths: list[str], append: bool) -> str:
    return f"_{Path(control_paths[0]).stem}" if append and control_paths else ""


def to_pil(decoded: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → 8-bit RGB, rounded as diffusers' postprocess does."""
    arr = decoded.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def save_image(image: Image.Image, save_dir: Path, seed: int, suffix: str, parameters: dict | None) -> Path:
    save_dir.mkdir(parents=True, exist_ok=True)
    path = _unique(save_dir / f"{time_flag()}_{seed}{suffix}_000.png")
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, json.dumps(parameters, ensure_ascii=False))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        image.save(fh, format="PNG", pnginfo=info)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_parameters(path: str | Path) -> dict | None:
    """The generation parameters of a PNG we wrote (None when it has none)."""
    with Image.open(path) as im:
        text = im.text.get(PARAMETERS_KEY) if hasattr(im, "text") else None
    return json.loads(text) if text else None


def save_latent(latent: torch.Tensor, save_dir: Path, seed: int, suffix: str, job_meta: dict | None) -> Path:
    save_dir.mkdir(parents=True, exist_ok=True)
    path = _unique(save_dir / f"{time_flag()}_{seed}_latent{suffix}.safetensors")
    metadata = None
    if job_meta is not None:
        metadata = {k: str(v) for k, v in job_meta.items() if k != PARAMETERS_KEY and v is not None}
        metadata[PARAMETERS_KEY] = json.dumps(job_meta.get(PARAMETERS_KEY, {}), ensure_ascii=False)
    save_file_atomic({"latent": latent.detach().to("cpu").contiguous()}, path, metadata=metadata)
    return path


def latent_metadata(job, embedded_cfg_scale: float, parameters: dict) -> dict:
    meta = dict(seeds=job.seed, prompt=job.prompt, height=job.height, width=job.width, infer_steps=job.infer_steps,
                embedded_cfg_scale=embedded_cfg_scale, guidance_scale=job.guidance_scale)
    if job.negative_prompt is not None:
        meta["negative_prompt"] = job.negative_prompt
    meta[PARAMETERS_KEY] = parameters
    return meta


def load_latent(path: str | Path) -> tuple[torch.Tensor, dict]:
    """A latent file of ours or musubi's: (latent (1, 16, 1, h, w), metadata)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        latent = f.get_tensor("latent")
    if latent.ndim == 4:
        latent = latent.unsqueeze(0)           # musubi's (16, 1, h, w) → (1, 16, 1, h, w)
    if not bool(torch.isfinite(latent).all()):
        raise ModelFileError(f"--latent_path {path}: the latent contains NaN or infinite values, so it cannot be "
                             "decoded into an image.", "Generate it again (the run that wrote it went wrong: try "
                             "another seed, fewer steps or without fp8).")
    return latent, metadata


def check_finite_image(pixels: torch.Tensor, what: str) -> None:
    """A decoded image with NaN/inf (a diverged DiT, a broken LoRA, fp16 overflow) is refused: clamping would
    save it as a black or grey picture that looks like a result."""
    if not bool(torch.isfinite(pixels).all()):
        raise NumericError(f"{what}: the decoded image contains NaN or infinite values, so nothing was saved.",
                          "The model produced invalid numbers: check the LoRA (--lora_weight) and the DiT file, try "
                          "without --fp8_base/--fp8_scaled, or with fewer --infer_steps or another --guidance_scale.")


def elapsed(start: float) -> float:
    return round(time.time() - start, 3)
