"""The Qwen-Image VAE loader → diffusers' `AutoencoderKLQwenImage`, plus pixel ↔ normalised-latent helpers.

Layouts (docs/architecture.md, "Model files"): the diffusers layout (Qwen/Qwen-Image `vae/` folder with config.json, or a single file),
and the ComfyUI `qwen_image_vae.safetensors` file, which keeps the original Wan-2.1 key names (detected by its
top-level `conv1.bias`). The Wan names are converted by the rules below (musubi-tuner converts them the same way).

Latent convention (shared by caching, training and inference): `encode_pixels` gives the posterior mode,
normalised as (z − latents_mean) / latents_std, shape (B, 16, 1, h, w); `decode_latents` undoes it and returns
images in [0, 1]. This is what diffusers' Qwen-Image pipelines do.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage

from engine.models import common
from engine.models.inspect import identify_tensors
from engine.models.text_encoder import sibling_config
from engine.spec import downloads
from engine.spec.errors import ModelFileError
from engine.spec.safetensors_header import expand_shards, read_headers

log = logging.getLogger(__name__)

# Qwen/Qwen-Image vae/config.json.
PUBLISHED_VAE_CONFIG = {
    "_class_name": "AutoencoderKLQwenImage",
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                     0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                    1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
}
PUBLISHED_VAE_PARAMS = 126_892_531
LATENT_CHANNELS = 16
COMFY_MARKER = "conv1.bias"   # top-level quant conv under its Wan name

# ---- Wan (ComfyUI) → diffusers key rules, applied to the module path (the key minus its last part) ----------
WAN_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv",
           "encoder.conv1": "encoder.conv_in", "decoder.conv1": "decoder.conv_in",
           "encoder.head.0": "encoder.norm_out", "encoder.head.2": "encoder.conv_out",
           "decoder.head.0": "decoder.norm_out", "decoder.head.2": "decoder.conv_out"}
# Inside a residual block: Sequential(norm, SiLU, conv, norm, SiLU, Dropout, conv) + 1x1 shortcut.
WAN_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                "shortcut": "conv_shortcut"}
# Middle: Sequential(residual, attention, residual). Attention submodule names (norm, to_qkv, proj) are equal.
WAN_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_MIDDLE_RE = re.compile(r"^(encoder|decoder)\.middle\.(\d+)(?:\.(.*))?$")
_DOWN_RE = re.compile(r"^encoder\.downsamples\.(\d+)\.(.*)$")
_UP_RE = re.compile(r"^decoder\.upsamples\.(\d+)\.(.*)$")

def load_vae(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Load the Qwen-Image VAE as diffusers' `AutoencoderKLQwenImage` on `device`, in eval mode, frozen.

    dtype: None = float32 on CPU, the file's bf16 on CUDA (engine.models.runtime.compute_dtype).
    """
    files, folder_config = vae_files(path)
    tensors = read_headers(files)
    comfy = COMFY_MARKER in tensors
    check_is_qwen_vae(tensors, files[0], comfy)
    common.check_not_prequantized(tensors, "vae")

    config, source = common.resolve_config(files, PUBLISHED_VAE_CONFIG, folder_config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    rename = wan_key_rename(config.get("num_res_blocks", 2)) if comfy else None
    try:
        model = common.build_empty(model_class(), config)
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise ModelFileError(f"{source} is not a valid AutoencoderKLQwenImage config ({type(exc).__name__}: {exc}).",
                             "Store the diffusers config dict of the VAE there, or remove it to use the published "
                             "Qwen-Image VAE config.") from exc
    common.check_shapes(model, tensors, source, rename=rename, what="Qwen-Image VAE")

    dtype = common.choose_dtype(device, tensors, dtype)
    log.info("loading VAE %s (%s layout) as %s on %s", path, "ComfyUI/Wan" if comfy else "diffusers",
             str(dtype).removeprefix("torch."), device)
    model = common.load_weights(model, files, dtype, device, rename=rename)
    return model.requires_grad_(False)


def model_class():
    return AutoencoderKLQwenImage


def vae_files(path: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """(safetensors files, config.json next to them or None) for a file, vae/ folder or pipeline folder.
    A file's sibling config.json counts only when it is an AutoencoderKLQwenImage config."""
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "vae").is_dir():
        path = path / "vae"   # a whole diffusers pipeline folder
    files = expand_shards(path)
    if path.is_dir():
        return files, path / "config.json"
    return files, sibling_config(path, "_class_name", PUBLISHED_VAE_CONFIG["_class_name"])


def check_is_qwen_vae(tensors: common.TensorMap, first: Path, comfy: bool) -> None:
    """Refuse files that are not a 16-channel RGB Qwen-Image VAE, naming what they look like (headers only; the
    identification is inspect_model's)."""
    def refuse(what: str):
        raise ModelFileError(f"{first}: this is not the Qwen-Image VAE; it looks like {what}.",
                             f"Pass the Qwen-Image VAE to --vae. {downloads.hint('vae')}")

    ident = identify_tensors(tensors)
    if ident.component != "vae" or ident.family != "qwen-image":
        refuse(ident.description or "no known model layout")
    quant, conv_in = ("conv1.weight", "encoder.conv1.weight") if comfy else ("quant_conv.weight",
                                                                             "encoder.conv_in.weight")
    if quant not in tensors or conv_in not in tensors:
        refuse(f"an incomplete VAE (no {quant!r} / {conv_in!r})")
    z_channels = tensors[quant][1].shape[0] // 2
    if z_channels != LATENT_CHANNELS:
        refuse(f"a VAE with {z_channels} latent channels (the Wan2.2 VAE has 48); Qwen-Image uses 16")
    image_channels = tensors[conv_in][1].shape[1]
    if image_channels == 4:
        refuse("the Qwen-Image-Layered RGBA VAE (4 image channels); Qwen-Image, Edit, 2509 and 2511 use the RGB VAE")
    if image_channels != 3 or ident.problems:
        refuse(f"a VAE for {image_channels}-channel images ({'; '.join(ident.problems)}); the Qwen-Image VAE takes RGB")


def wan_key_rename(num_res_blocks: int):
    """rename(Wan/ComfyUI key) → diffusers key, for a VAE with `num_res_blocks` residual blocks per level."""
    def rename(key: str) -> str:
        module, _, param = key.rpartition(".")
        return f"{wan_module_to_diffusers(module, num_res_blocks)}.{param}"

    return rename


def wan_module_to_diffusers(module: str, num_res_blocks: int) -> str:
    """One module path from Wan-2.1 naming to diffusers' AutoencoderKLQwenImage naming (unknown paths unchanged,
    so the shape check reports them)."""
    if module in WAN_TOP:
        return WAN_TOP[module]
    m = _MIDDLE_RE.match(module)
    if m and m.group(2) in WAN_MIDDLE:
        side, idx, rest = m.groups()
        return ".".join(p for p in (side, WAN_MIDDLE[idx], _residual_part(rest)) if p)
    m = _DOWN_RE.match(module)
    if m:   # encoder: the same flat list (residual blocks and resamplers) under another name
        return f"encoder.down_blocks.{m.group(1)}.{_residual_part(m.group(2))}"
    m = _UP_RE.match(module)
    if m:   # decoder: flat list of (num_res_blocks + 1) residual blocks + 1 resampler per level
        level, j = divmod(int(m.group(1)), num_res_blocks + 2)
        if j <= num_res_blocks:
            return f"decoder.up_blocks.{level}.resnets.{j}.{_residual_part(m.group(2))}"
        return f"decoder.up_blocks.{level}.upsamplers.0.{m.group(2)}"
    return module


def _residual_part(rest: str | None) -> str | None:
    """'residual.2' → 'conv1', 'shortcut' → 'conv_shortcut'; anything else (resample.1, time_conv, attention
    parts) keeps its name."""
    if rest is None:
        return None
    for wan, diffusers_name in WAN_RESIDUAL.items():
        if rest == wan or rest.startswith(wan + "."):
            return diffusers_name + rest[len(wan):]
    return rest


# ---------------------------------------------------------------------------------------------- pixels ↔ latents

def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) or (B, 3, 1, H, W) pixels in [-1, 1] → normalised latents (B, 16, 1, H/8, W/8): the posterior
    mode (no sampling), then (z − latents_mean) / latents_std."""
    x = pixels.unsqueeze(2) if pixels.ndim == 4 else pixels
    z = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, 16, 1, h, w) or (B, 16, h, w) → images (B, 3, 8h, 8w) in [0, 1]."""
    z = latents.unsqueeze(2) if latents.ndim == 4 else latents
    z = z.to(device=vae.device, dtype=vae.dtype)
    mean, std = _latent_stats(vae, z)
    image = vae.decode(z * std + mean).sample[:, :, 0]
    return (image.clamp(-1, 1) * 0.5 + 0.5).clamp(0, 1)    # clamp keeps NaN: callers check (infer/outputs.py)
