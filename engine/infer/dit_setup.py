"""The DiT for inference: loaded once with LoRA merged while loading, then fp8 / block swap / attention kernel.

Attention: `sdpa`/`torch` = PyTorch SDPA (diffusers' "native" backend). `flash`, `sageattn` and `xformers` need
their package AND a CUDA device; otherwise one warning and SDPA (the result is the same math, only slower).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from engine.errors import OptionError
from engine.variants import Variant

log = logging.getLogger(__name__)

# --attn_mode → (package that must be importable, diffusers attention backend name)
ATTENTION_BACKENDS = {
    "sdpa": (None, "native"),
    "torch": (None, "native"),
    "flash": ("flash_attn", "flash"),
    "sageattn": ("sageattention", "sage"),
    "xformers": ("xformers", "xformers"),
}


def attention_backend(mode: str, device: torch.device) -> str:
    """The diffusers backend for --attn_mode on this machine (one warning when it must fall back to SDPA)."""
    package, backend = ATTENTION_BACKENDS[mode]
    if package is None:
        return backend
    missing = []
    if importlib.util.find_spec(package) is None:
        missing.append(f"the '{package}' package is not installed")
    if device.type != "cuda":
        missing.append(f"it needs a CUDA device (running on {device.type})")
    if missing:
        log.warning("--attn_mode %s: %s; using PyTorch SDPA instead (same result, possibly slower)",
                    mode, " and ".join(missing))
        return "native"
    return backend


def lora_merger(cfg):
    """A load-time merge hook for --lora_weight (None without LoRA)."""
    if not cfg.lora_weight:
        return None
    from engine.lora_formats import LoraMerger, read_lora

    multipliers = list(cfg.lora_multiplier) or [1.0]
    if len(multipliers) == 1:
        multipliers = multipliers * len(cfg.lora_weight)
    loras = []
    for path, mult in zip(cfg.lora_weight, multipliers):
        lora = read_lora(path)
        log.info("LoRA %s: %s format, %d modules, multiplier %g", path, lora.format, len(lora), mult)
        loras.append((lora, mult))
    return LoraMerger(loras)


def load_transformer(cfg, variant: Variant, device: torch.device, dtype: torch.dtype):
    from engine.models.dit import load_dit

    check_memory_options(cfg, device)
    merger = lora_merger(cfg)
    dit = load_dit(cfg.dit, model_version=variant.name, device=device, dtype=dtype,
                   transform=merger.transform if merger else None)
    if merger is not None:
        merger.check_all_used()
    dit.eval().requires_grad_(False)
    backend = attention_backend(cfg.attn_mode, device)
    if backend != "native":
        dit.set_attention_backend(backend)
    return dit


def check_memory_options(cfg, device: torch.device) -> None:
    """--fp8 / --fp8_scaled / --blocks_to_swap need the fp8 and block-swap modules; refuse clearly without them."""
    wanted = [name for name, on in (("--fp8", cfg.fp8), ("--fp8_scaled", cfg.fp8_scaled),
                                    ("--blocks_to_swap", cfg.blocks_to_swap > 0)) if on]
    if wanted:
        raise OptionError(f"{', '.join(wanted)}: not available in generate_image yet",
                          "run without it (needs ~41 GB of VRAM for the DiT in bf16)")
