"""A frozen DiT stored in 4 or 8 bits with bitsandbytes, for LoRA training (QLoRA style): `--base_model_precision`.

- `nf4-bnb`: 4-bit NormalFloat, blocks of 64 with double-quantised absmax (QLoRA's recipe), computed in the
  DiT's compute dtype (`bnb.nn.Linear4bit`). About 0.52 bytes per weight.
- `int8-bnb`: per-output-row absmax int8 (`bnb.nn.Linear8bitLt`, outlier threshold 0: no fp16 copy kept).
  1 byte per weight plus one scale per row.
- Targets: the same block Linear weights as fp8 (engine/models/fp8.py `is_target`: the 14 Linears of every
  block); embeddings, norms, img_in/txt_in/proj_out/norm_out stay in the compute dtype.
- Quantised while the file is read (engine/models/dit_setup.py's load hook): each target tensor is quantised on
  the compute device as soon as it is read, and only a one-element placeholder takes its place in the state dict,
  so neither the bf16 model nor a second copy of it is ever held. `finish(model)` then swaps each target
  `nn.Linear` for the bitsandbytes layer holding the quantised weight (both are `nn.Linear`s, so the LoRA
  network wraps them like any other, and the saved LoRA is the same file as one trained on a bf16 base).
- bitsandbytes is imported when first needed (importlib, as engine/train/optim.py does for its 8-bit optimisers),
  so a missing or broken install is one clear error for this option, not a failure of every engine command.
- `check_runs(mode, device)` quantises and runs one small layer (forward and backward) on the device before
  any model loads: bitsandbytes missing, built without kernels for this device, or failing there is one clear
  error instead of a crash minutes into loading.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch
from torch import nn

from engine.models.fp8 import is_target
from engine.spec.errors import OptionError

log = logging.getLogger(__name__)

NF4, INT8 = "nf4-bnb", "int8-bnb"
MODES = (NF4, INT8)
NF4_BLOCK = 64
FIX = "Use --base_model_precision no_change (or --fp8_base --fp8_scaled) on this machine, or install a " \
      "bitsandbytes build for it (pip install -U bitsandbytes)."


def bitsandbytes() -> ModuleType:
    """The bitsandbytes package (its `functional` and `nn` submodules loaded), imported on first use."""
    bnb = importlib.import_module("bitsandbytes")
    importlib.import_module("bitsandbytes.functional")
    importlib.import_module("bitsandbytes.nn")
    return bnb


def quantize(mode: str, weight: torch.Tensor):
    """(packed data, state) of one weight on its own device: nf4 → (uint8, QuantState); int8 → (int8, row scales)."""
    bnbF = bitsandbytes().functional
    if mode == NF4:
        return bnbF.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCK, compress_statistics=True,
                                  quant_type="nf4")
    cb, scb, _ = bnbF.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return cb, scb


def make_layer(mode: str, linear: nn.Linear, packed: torch.Tensor, state, dtype: torch.dtype) -> nn.Linear:
    """The bitsandbytes layer for `linear` (its bias kept) holding an already quantised weight."""
    bnb = bitsandbytes()
    has_bias = linear.bias is not None
    if mode == NF4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK,
                                         compress_statistics=True, quant_type="nf4", bnb_quantized=True,
                                         module=layer)
        layer.quant_state = state
        # bitsandbytes repacks nf4 weights for its AVX512-BF16 CPU kernel in eval mode; the repacking needs
        # in_features a multiple of the block and out_features of 32 (true for the real DiT, not for tiny ones)
        if linear.in_features % NF4_BLOCK or linear.out_features % 32:
            layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(packed, requires_grad=False, has_fp16_weights=False)
        layer.weight.CB, layer.weight.SCB = packed, state
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.train(linear.training)


class BnbHook:
    """Load hook (engine/models/dit_setup.py): `.transform` quantises each target weight as it is read,
    `.finish(model)` puts the bitsandbytes layers in place after the strict load."""

    def __init__(self, mode: str, dtype: torch.dtype):
        self.mode, self.dtype = mode, dtype
        self.quantized: dict[str, tuple] = {}

    def transform(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if not is_target(key) or tensor.dim() != 2:
            return tensor
        self.quantized[key] = quantize(self.mode, tensor)
        # a stride-0 view of one element: the strict load sees the right shape, no memory is held
        return torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)

    def finish(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for key, (packed, state) in self.quantized.items():
            path = key[: -len(".weight")]
            parent_path, _, child = path.rpartition(".")
            linear = modules[path]
            setattr(modules[parent_path] if parent_path else model, child,
                    make_layer(self.mode, linear, packed, state, self.dtype))
        log.info("%s: %d block Linear weights stored by bitsandbytes", self.mode, len(self.quantized))
        self.quantized.clear()


def check_runs(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before loading, a machine where bitsandbytes cannot quantise and run a layer (both directions)."""
    try:
        bnb = bitsandbytes()
    except Exception as e:                     # noqa: BLE001  (a broken install raises more than ImportError)
        raise OptionError(f"--base_model_precision {mode}: bitsandbytes cannot be imported ({e}).", FIX) from None
    try:
        linear = nn.Linear(128, 64, device=device, dtype=dtype)
        packed, state = quantize(mode, linear.weight.data)
        layer = make_layer(mode, linear, packed, state, dtype)
        x = torch.randn(2, 128, device=device, dtype=dtype, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("the backward pass gave no finite gradient")
    except Exception as e:                     # noqa: BLE001  (any kernel failure means: cannot train here)
        raise OptionError(f"--base_model_precision {mode}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot "
                          f"run its {mode.split('-')[0]} kernels on {device.type} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).", FIX) from None
