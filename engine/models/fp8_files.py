"""fp8 DiT files written by merge_lora (`--merged_precision fp8 / fp8_e4m3fn`), and how the DiT loader reads them.

Pre-quantized fp8 checkpoints from elsewhere are refused (engine/models/common.py: check_not_prequantized): their
scale layouts differ and musubi-tuner cannot use them either. A file we wrote ourselves carries the metadata key
`qis_fp8` and exactly our layout, so the loader can read it back:
- `qis_fp8 = "scaled"`: the block Linear weights (engine/models/fp8.py: is_target) in float8_e4m3fn with a
  block-wise `<layer>.scale_weight` beside each (fp8.quantize_weight's layout, the one --fp8_scaled builds);
- `qis_fp8 = "plain"`: the same weights cast to float8_e4m3fn without scales.
Every other tensor stays in the file's main dtype. The layout is checked against the marker before loading;
while loading each fp8 weight is dequantised (q · scale) to the compute dtype, so the model is an ordinary one
(and --fp8 / --fp8_scaled re-quantise it as they would a bf16 file).

API:
- `MARKER_KEY`, `SCALED`, `PLAIN`
- `fp8_kind(files)`                             the marker's value or None
- `check_dit(files, tensors, variant)`          None for a plain file, our kind for ours, else the usual refusal
- `renamer(rename, kind)`                       the loader's rename, with our scale keys dropped
- `dequantizing(files, kind, transform)`        the load hook that dequantises, chained before `transform`
"""

from __future__ import annotations

import os
from typing import Iterable

import torch

from engine.models import common
from engine.models.fp8 import chain, dequantize_weight, is_target, scale_shape
from engine.models.safetensors_io import Transform, read_tensor
from engine.spec import naming
from engine.spec.errors import ModelFileError
from engine.spec.safetensors_header import FP8_DTYPES, read_header

MARKER_KEY = naming.FP8_MARKER_KEY
SCALED, PLAIN = "scaled", "plain"
SCALE_SUFFIX = ".scale_weight"


def scale_key(weight_key: str) -> str:
    return weight_key[: -len(".weight")] + SCALE_SUFFIX


def fp8_kind(files: Iterable[str | os.PathLike]) -> str | None:
    kinds = {read_header(f).metadata.get(MARKER_KEY) for f in files}
    return next(iter(kinds)) if len(kinds) == 1 else None


def check_dit(files: list, tensors: common.TensorMap, variant: str | None) -> str | None:
    """A file without our marker goes through the usual fp8 refusal (None when it is not fp8 at all); a file
    with it must hold exactly our layout, else it is refused naming the first tensor that breaks it."""
    kind = fp8_kind(files)
    if kind is None:
        common.check_not_prequantized(tensors, "dit", variant)
        return None
    if kind not in (SCALED, PLAIN):
        raise ModelFileError(f"{files[0]}: metadata {MARKER_KEY}={kind!r} is not a layout this engine writes "
                             f"({SCALED!r} or {PLAIN!r}).", "Merge the DiT again with merge_lora, or use a bf16 file.")
    for key, (path, info) in tensors.items():
        problem = _layout_problem(key, info, tensors, kind)
        if problem:
            raise ModelFileError(f"{path}: marked {MARKER_KEY}={kind} but {problem}.",
                                 "The file was changed after merge_lora wrote it; merge again, or use a bf16 file.")
    return kind


def _layout_problem(key: str, info, tensors: common.TensorMap, kind: str) -> str | None:
    if key.endswith(SCALE_SUFFIX):
        weight = key[: -len(SCALE_SUFFIX)] + ".weight"
        if kind != SCALED or weight not in tensors or tensors[weight][1].dtype not in FP8_DTYPES:
            return f"{key!r} is a scale without an fp8 weight"
        if tuple(info.shape) != scale_shape(tuple(tensors[weight][1].shape)):
            return f"{key!r} has shape {list(info.shape)}, not the block-wise scale shape of {weight!r}"
        return None
    if info.dtype in FP8_DTYPES:
        if info.dtype != "F8_E4M3" or not is_target(key) or len(info.shape) != 2:
            return f"{key!r} is {info.dtype} but only block Linear weights are stored in float8_e4m3fn"
        if kind == SCALED and scale_key(key) not in tensors:
            return f"{key!r} has no {SCALE_SUFFIX} beside it"
    return None


def renamer(rename, kind: str | None):
    """`rename` for the loader, dropping our scale keys (they are read by the dequantising hook instead)."""
    if kind != SCALED:
        return rename
    return lambda key: None if key.endswith(SCALE_SUFFIX) else rename(key)


class _Dequantizer:
    """Load hook: an fp8 weight arrives already cast to the compute dtype (exact: every e4m3 value is a bf16
    value); multiply it by its block-wise scale, read from the file."""

    def __init__(self, files: list, rename):
        self.where = {}
        for f in files:
            header = read_header(f)
            for key in header.tensors:
                if key.endswith(SCALE_SUFFIX):
                    self.where[rename(key[: -len(SCALE_SUFFIX)] + ".weight")] = (header, key)

    def transform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        found = self.where.get(name)
        if found is None:
            return tensor
        header, key = found
        with open(header.path, "rb") as f:
            scale = read_tensor(f, header, key)
        return dequantize_weight(tensor, scale.to(tensor.device), tensor.dtype)


def dequantizing(files: list, kind: str | None, rename, transform: Transform | None) -> Transform | None:
    """The load hook for a file of `kind`: dequantise our scaled weights first, then `transform`."""
    if kind != SCALED:
        return transform
    hook = _Dequantizer(files, rename).transform
    return chain(hook, transform) if transform else hook
