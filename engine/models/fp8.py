"""fp8 storage of the DiT's block Linear weights (`--fp8_base`, `--fp8_scaled`, as in musubi-tuner).

- Targets: `*.weight` keys containing `transformer_blocks` and none of `norm`, `time_text_embed` — i.e. the 14
  Linear layers of every block (modulation included: "modulation layers are large and block-wise scaling may be
  effective"). img_in/txt_in/proj_out/norm_out/time embedding and all norms stay in the compute dtype. (musubi's
  plain --fp8_base casts the whole DiT; keeping the small non-block layers unquantised costs ~0.3 % of the memory
  and avoids their error.)
- `--fp8_scaled`: block-wise E4M3, block 64 along the input dim: `scale[out, in/64, 1] = max|w_block| / 448`
  (clamped ≥ 1e-8), `q = clamp(w / scale, ±448).to(float8_e4m3fn)`; per-output-channel scale when in % 64 ≠ 0,
  per-tensor for non-2-D weights. The scale is stored as `<key>.scale_weight` in the original dtype, and q is
  computed from that rounded scale so the stored pair is self-consistent.
- Forward: dequantise per call (`q.to(dtype) · scale`) then `F.linear`; the input is never quantised.
- `--fp8_base` alone: the same targets stored as plain e4m3 (no scale), upcast per call.

API:
- `is_target(key)`                                 the key rule above
- `quantize_weight(w, scaled=True) -> (q, scale)`  per tensor; refuses tensors that are already fp8
- `dequantize_weight(q, scale, dtype)`
- `Fp8Quantizer(scaled).transform(key, tensor)`    load hook: {key: q, key.scale_weight: scale} for targets
- `Fp8Hook(scaled)`: `.transform` quantises while loading a plain model, `.finish(model)` attaches the scales
                                                   and the fp8 forward afterwards (engine/models/dit_setup.py)
- `patch_fp8_linears(model, scaled)`               give target Linears the fp8 forward (+ scale buffers, also
                                                   on meta models, so a state dict with scale_weight loads)
- `quantize_model(model, scaled)`                  quantise an already loaded model in place, layer by layer
- `chain(*transforms)`                             e.g. chain(LoraMerger(...).transform, Fp8Quantizer().transform)
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.spec.errors import ModelFileError

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0          # largest finite float8_e4m3fn
BLOCK = 64
TARGET_KEYS = ("transformer_blocks",)
EXCLUDE_KEYS = ("norm", "time_text_embed")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_target(key: str) -> bool:
    return (key.endswith(".weight") and any(t in key for t in TARGET_KEYS)
            and not any(e in key for e in EXCLUDE_KEYS))


def scale_shape(weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Block-wise (out, in/64, 1); per-channel (out, 1) when in % 64 ≠ 0; per-tensor (1,) for non-2-D."""
    if len(weight_shape) != 2:
        return (1,)
    out_f, in_f = weight_shape
    return (out_f, in_f // BLOCK, 1) if in_f % BLOCK == 0 else (out_f, 1)


def _blocked(w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """View w so that the scale broadcasts over it."""
    return w.reshape(shape[0], shape[1], BLOCK) if len(shape) == 3 else w


def quantize_weight(w: torch.Tensor, scaled: bool = True, key: str = "weight") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(q in float8_e4m3fn, scale in w's dtype or None). The computation runs in float32 on w's device."""
    if w.dtype in FP8_DTYPES:
        raise ModelFileError(f"{key} is already {str(w.dtype).removeprefix('torch.')}; it cannot be quantised again.",
                             "Load the bf16/fp16 DiT file and let --fp8_base/--fp8_scaled quantise it.")
    if not w.is_floating_point():
        raise ModelFileError(f"{key} has dtype {w.dtype}, not a floating-point weight.", "Check the DiT file.")
    if not scaled:
        return w.clamp(-FP8_MAX, FP8_MAX).to(FP8), None
    shape = scale_shape(tuple(w.shape))
    wf = _blocked(w.float(), shape)
    if len(shape) == 3:
        amax = wf.abs().amax(dim=-1, keepdim=True)
    elif len(shape) == 2:
        amax = wf.abs().amax(dim=1, keepdim=True)
    else:
        amax = wf.abs().amax().reshape(1)
    scale = (amax / FP8_MAX).clamp(min=1e-8).to(w.dtype)     # stored dtype first: q must match the saved scale
    q = (wf / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(w.shape), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return q.to(dtype)
    shape = tuple(scale.shape)
    return (_blocked(q.to(dtype), shape) * scale.to(dtype)).reshape(q.shape)


def _fp8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype if x.is_floating_point() else torch.float32
    w = dequantize_weight(self.weight, getattr(self, "scale_weight", None), dtype)
    bias = self.bias.to(dtype) if self.bias is not None else None
    return F.linear(x, w, bias)


def patch_fp8_linears(model: nn.Module, scaled: bool = True) -> list[str]:
    """Give every target Linear the dequantising forward (and, when scaled, a `scale_weight` buffer of the
    right shape on the weight's device, meta included). Returns the patched weight keys."""
    keys = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not is_target(f"{name}.weight"):
            continue
        if scaled and "scale_weight" not in module._buffers:
            module.register_buffer("scale_weight", torch.ones(scale_shape(tuple(module.weight.shape)),
                                                              dtype=_scale_dtype(module), device=module.weight.device))
        module.forward = _fp8_forward.__get__(module)
        keys.append(f"{name}.weight")
    return keys


def _scale_dtype(module: nn.Linear) -> torch.dtype:
    return module.weight.dtype if module.weight.dtype not in FP8_DTYPES else torch.bfloat16


@torch.no_grad()
def quantize_model(model: nn.Module, scaled: bool = True) -> int:
    """Quantise an already loaded model's target Linears in place (one layer at a time: peak extra memory is
    one layer). Returns the number of quantised weights."""
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not is_target(f"{name}.weight"):
            continue
        q, scale = quantize_weight(module.weight.data, scaled, f"{name}.weight")
        if scale is not None:
            module.register_buffer("scale_weight", scale)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.forward = _fp8_forward.__get__(module)
        count += 1
    return count


class Fp8Quantizer:
    """Load hook: quantise target tensors as they are read (after any LoRA merge)."""

    def __init__(self, scaled: bool = True):
        self.scaled = scaled
        self.count = 0

    def transform(self, key: str, tensor: torch.Tensor):
        if not is_target(key) or tensor.dim() == 1:
            return tensor
        q, scale = quantize_weight(tensor, self.scaled, key)
        self.count += 1
        if scale is None:
            return q
        return {key: q, key[: -len("weight")] + "scale_weight": scale}


class Fp8Hook:
    """fp8 storage of the block Linear weights while loading: each weight is quantised as it is read; the
    block-wise scales are attached after loading (load_dit builds the plain model, which has no scale buffers
    for a strict load to fill)."""

    def __init__(self, scaled: bool):
        self.scaled = scaled
        self.scales: dict[str, torch.Tensor] = {}

    def transform(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if not is_target(key) or tensor.dim() == 1:
            return tensor
        q, scale = quantize_weight(tensor, self.scaled, key)
        if scale is not None:
            self.scales[key] = scale
        return q

    def finish(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for key, scale in self.scales.items():
            modules[key[: -len(".weight")]].register_buffer("scale_weight", scale)
        patched = patch_fp8_linears(model, self.scaled)
        log.info("fp8%s: %d block Linear weights stored as float8_e4m3fn", " (block-wise scaled)" * self.scaled,
                 len(patched))


def chain(*transforms: Callable) -> Callable:
    """Compose load hooks left to right; only the last may return a mapping."""
    def run(key: str, tensor: torch.Tensor):
        for t in transforms:
            tensor = t(key, tensor)
        return tensor
    return run
