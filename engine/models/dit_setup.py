"""A DiT ready to run, set up in the one order that works, for inference and both kinds of training.

1. `load`: read the file once. A LoRA to merge (generate_image --lora_weight) and fp8 quantisation
   (--fp8 / --fp8_base, --fp8_scaled) or bitsandbytes nf4/int8 storage (train_network --base_model_precision,
   engine/models/bnb_quant.py) are applied tensor by tensor while reading, so the full-precision DiT is never held; with block swap the model is built in host RAM and placed by the swapper in step 3.
2. The caller's own step: train_network wraps the block Linears in the LoRA network here (their forward, fp8 or
   not, stays underneath); inference and the full finetune have nothing to add.
3. `finish`: block swap places the model (the LoRA weights stay on the device), then gradient checkpointing
   (+ activation CPU offload), then the attention kernel.

Attention: `sdpa`/`torch` = PyTorch SDPA (diffusers' "native" backend). `flash`, `sageattn` and `xformers` need
their package AND a CUDA device. Inference falls back to SDPA with one warning (the same math, only slower);
training refuses, because the kernel was asked for by name and its memory use differs.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from engine.models import bnb_quant
from engine.models.block_swap import BlockSwap, enable_block_swap
from engine.models.checkpointing import enable_gradient_checkpointing
from engine.models.dit import load_dit
from engine.models.fp8 import Fp8Hook
from engine.models.lora_formats import LoraMerger, read_lora
from engine.spec.errors import OptionError
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
# the training flag that names each kernel (train_network/train take --flash_attn, --xformers, --sage_attn)
TRAIN_FLAGS = {"flash": "--flash_attn", "xformers": "--xformers", "sageattn": "--sage_attn"}


def lora_merger(paths: list[str], multipliers: list[float]) -> LoraMerger | None:
    """A load-time merge hook for generate_image's --lora_weight / --lora_multiplier (None without LoRA)."""
    if not paths:
        return None
    multipliers = list(multipliers) or [1.0]
    if len(multipliers) == 1:
        multipliers = multipliers * len(paths)
    loras = []
    for path, mult in zip(paths, multipliers):
        lora = read_lora(path)
        log.info("LoRA %s: %s format, %d modules, multiplier %g", path, lora.format, len(lora), mult)
        loras.append((lora, mult))
    return LoraMerger(loras)


def load(path: str, variant: Variant, device: torch.device, dtype: torch.dtype, *, fp8: bool = False,
         fp8_scaled: bool = False, swap: bool = False, merger: LoraMerger | None = None,
         base_precision: str = "no_change") -> nn.Module:
    """Step 1: the DiT read once, with the LoRA merged and fp8 or nf4/int8 applied while reading."""
    fp8_hook = Fp8Hook(scaled=fp8_scaled) if fp8 else None
    if base_precision in bnb_quant.MODES:
        fp8_hook = bnb_quant.BnbHook(base_precision, dtype)     # the same place in the order as fp8
    hooks = [h for h in (merger.transform if merger else None, fp8_hook.transform if fp8_hook else None) if h]
    transform = (lambda key, t: _chain(hooks, key, t)) if hooks else None
    dit = load_dit(path, model_version=variant.name, device="cpu" if swap else device, dtype=dtype,
                   transform=transform)
    if merger is not None:
        merger.check_all_used()
    if fp8_hook is not None:
        fp8_hook.finish(dit)
    return dit


def finish(dit: nn.Module, device: torch.device, *, blocks_to_swap: int = 0, training: bool = False,
           trainable_blocks: bool = False, checkpointing: bool = False, checkpoint_offload: bool = False,
           attention: str = "sdpa") -> BlockSwap | None:
    """Step 3: block swap, gradient checkpointing, attention kernel. Returns the swapper (None without swap).
    `trainable_blocks`: the swapped block weights are trained (full finetune with the fused backward)."""
    swap = None
    if blocks_to_swap > 0:
        swap = enable_block_swap(dit, blocks_to_swap, device, supports_backward=training, trainable=trainable_blocks)
        log.info("block swap: %d of %d blocks stream from host RAM", blocks_to_swap, len(dit.transformer_blocks))
    if checkpointing:
        enable_gradient_checkpointing(dit, checkpoint_offload, device)
    backend = attention_backend(attention, device, strict=training)
    if backend != "native":
        dit.set_attention_backend(backend)
    dit.qis_attention_backend = backend    # sampling batches cond + uncond only where masks are supported
    return swap


def attention_backend(mode: str, device: torch.device, strict: bool = False) -> str:
    """The diffusers backend for an attention mode on this machine. Missing package or no CUDA: `strict`
    (training) refuses; otherwise one warning and SDPA."""
    package, backend = ATTENTION_BACKENDS[mode]
    if package is None:
        return backend
    if strict and device.type != "cuda":
        raise OptionError(f"{TRAIN_FLAGS.get(mode, mode)} needs a CUDA device (running on {device.type}).",
                          "Use --sdpa.")
    missing = []
    if importlib.util.find_spec(package) is None:
        missing.append(f"the '{package}' package is not installed")
    if device.type != "cuda":
        missing.append(f"it needs a CUDA device (running on {device.type})")
    if missing:
        if strict:
            raise OptionError(f"{TRAIN_FLAGS.get(mode, mode)}: " + " and ".join(missing) + ".",
                              f"pip install {package}, or use --sdpa.")
        log.warning("--attn_mode %s: %s; using PyTorch SDPA instead (same result, possibly slower)",
                    mode, " and ".join(missing))
        return "native"
    return backend


def _chain(hooks, key, tensor):
    for hook in hooks:
        tensor = hook(key, tensor)
    return tensor
