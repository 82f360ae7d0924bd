"""The DiT for inference: loaded once with LoRA merged while loading, then fp8 / block swap / attention kernel.

Attention: `sdpa`/`torch` = PyTorch SDPA (diffusers' "native" backend). `flash`, `sageattn` and `xformers` need
their package AND a CUDA device; otherwise one warning and SDPA (the result is the same math, only slower).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from engine.spec.variants import Variant

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
    from engine.models.lora_formats import LoraMerger, read_lora

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
    """Load the DiT once: LoRA merged while reading, then fp8 (--fp8 / --fp8_scaled), block swap, attention."""
    from engine.models.dit import load_dit

    merger = lora_merger(cfg)
    fp8 = Fp8Hook(scaled=cfg.fp8_scaled) if (cfg.fp8 or cfg.fp8_scaled) else None
    hooks = [h for h in (merger.transform if merger else None, fp8.transform if fp8 else None) if h]
    transform = (lambda key, t: _chain(hooks, key, t)) if hooks else None
    swap = cfg.blocks_to_swap > 0
    # with block swap the model is built in host RAM and the swapper places it (non-block parts on the device)
    dit = load_dit(cfg.dit, model_version=variant.name, device="cpu" if swap else device, dtype=dtype,
                   transform=transform)
    if merger is not None:
        merger.check_all_used()
    if fp8 is not None:
        fp8.finish(dit)
    dit.eval().requires_grad_(False)
    if swap:
        from engine.models.block_swap import enable_block_swap

        enable_block_swap(dit, cfg.blocks_to_swap, device, supports_backward=False)
        log.info("block swap: %d of %d blocks stream from host RAM", cfg.blocks_to_swap, len(dit.transformer_blocks))
    backend = attention_backend(cfg.attn_mode, device)
    if backend != "native":
        dit.set_attention_backend(backend)
    dit.qis_attention_backend = backend    # sampling batches cond + uncond only where masks are supported
    return dit


def _chain(hooks, key, tensor):
    for hook in hooks:
        tensor = hook(key, tensor)
    return tensor


class Fp8Hook:
    """fp8 storage of the block Linear weights while loading (engine.models.fp8): each weight is quantised as it
    is read; the block-wise scales are attached after loading (load_dit builds the plain model, which has no
    scale buffers for a strict load to fill)."""

    def __init__(self, scaled: bool):
        self.scaled = scaled
        self.scales: dict[str, torch.Tensor] = {}

    def transform(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        from engine.models.fp8 import is_target, quantize_weight

        if not is_target(key) or tensor.dim() == 1:
            return tensor
        q, scale = quantize_weight(tensor, self.scaled, key)
        if scale is not None:
            self.scales[key] = scale
        return q

    def finish(self, dit) -> None:
        from engine.models.fp8 import patch_fp8_linears

        modules = dict(dit.named_modules())
        for key, scale in self.scales.items():
            modules[key[: -len(".weight")]].register_buffer("scale_weight", scale)
        patched = patch_fp8_linears(dit, self.scaled)
        log.info("fp8%s: %d block Linear weights stored as float8_e4m3fn", " (block-wise scaled)" * self.scaled,
                 len(patched))
