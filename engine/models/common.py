"""What every model loader shares: config from metadata, checks before allocating, strict assign-loading.

The recipe (DiT, text encoder and VAE loaders all follow it):

    files   = safetensors_io.expand_shards(path)
    tensors = safetensors_io.read_headers(files)            # name → (file, TensorInfo); headers only
    check_not_prequantized(tensors, files, "dit", variant)   # fp8_scaled / e4m3fn files: one clear error
    config, source = resolve_config(files, PUBLISHED_CONFIG) # metadata "config" JSON, else the published one
    model   = build_empty(ModelClass, config)                # parameters on the meta device: no memory
    check_shapes(model, tensors, source, rename=...)          # every state-dict shape vs the header
    load_weights(model, files, dtype=..., device=..., rename=..., transform=...)
                                                             # one tensor at a time, strict, assign=True

`rename(file_key) -> model_key | None` maps a file's key layout onto the module's (None drops a key, e.g.
a marker tensor); the same function is given to check_shapes and load_weights so they agree.
Loading with `assign=True` makes the read buffers the parameters, so a 40 GB model is never held twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from accelerate import init_empty_weights

from engine.models.runtime import compute_dtype
from engine.models.safetensors_io import Transform, iter_tensors, torch_dtype
from engine.spec import downloads, model_bounds
from engine.spec.errors import ModelFileError
from engine.spec.safetensors_header import FLOAT_DTYPES, FP8_DTYPES, TensorInfo, read_header

log = logging.getLogger(__name__)

Rename = Callable[[str], "str | None"]
TensorMap = Mapping[str, "tuple[Path, TensorInfo]"]

# Key names that only pre-scaled fp8 checkpoints carry (ComfyUI fp8_scaled / mixed, torchao/modelopt style).
FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".weight_scale_2")
FP8_MARKER_KEYS = ("scaled_fp8",)
FP8_MARKER_SUBSTRINGS = ("comfy_quant",)


# ---------------------------------------------------------------------------------------------- config

def config_from_metadata(path: str | os.PathLike) -> dict | None:
    """The config dict stored as a JSON string in metadata key `config`, or None if the file has none."""
    header = read_header(path)
    text = header.metadata.get("config")
    if text is None:
        return None
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"{header.path}: metadata key 'config' is not valid JSON ({e}).",
                             "Re-save the file with a valid config, or remove the key to use the published "
                             "config.") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{header.path}: metadata key 'config' is a JSON {type(config).__name__}, "
                             "not an object.", "Store the diffusers/transformers config dict there.")
    return config


def resolve_config(files: Iterable[str | os.PathLike], published: Mapping,
                   folder_config: str | os.PathLike | None = None) -> tuple[dict, str]:
    """(config, where it came from). Order: metadata `config` of the first file that has one, then a
    config.json next to the weights (`folder_config`), then the published config."""
    for f in files:
        cfg = config_from_metadata(f)
        if cfg is not None:
            source = f"the 'config' metadata of {f}"
            model_bounds.check_config(cfg, source)          # before anything is built from it
            return cfg, source
    if folder_config is not None and Path(folder_config).is_file():
        try:
            cfg = json.loads(Path(folder_config).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ModelFileError(f"{folder_config}: cannot read config ({e}).", "Download it again.") from None
        if not isinstance(cfg, dict):
            raise ModelFileError(f"{folder_config}: is not a JSON object.", "Download it again.")
        model_bounds.check_config(cfg, str(folder_config))
        return cfg, str(folder_config)
    return dict(published), "the published config (the file has no 'config' metadata)"


# ---------------------------------------------------------------------------------------------- fp8

def fp8_evidence(tensors: TensorMap) -> list[str]:
    """Why a set of tensors looks like a pre-quantized fp8 checkpoint (empty list = it does not)."""
    fp8 = [n for n, (_, i) in tensors.items() if i.dtype in FP8_DTYPES]
    scales = [n for n in tensors if n.endswith(FP8_SCALE_SUFFIXES) or n in FP8_MARKER_KEYS
              or any(s in n for s in FP8_MARKER_SUBSTRINGS)]
    out = []
    if fp8:
        kinds = sorted({tensors[n][1].dtype for n in fp8})
        out.append(f"{len(fp8)} tensors stored as {'/'.join(kinds)}, e.g. {fp8[0]!r}")
    if scales:
        out.append(f"{len(scales)} fp8 scale/marker keys, e.g. {scales[0]!r}")
    return out


def check_not_prequantized(tensors: TensorMap, component: str, variant: str | None = None) -> None:
    """One clear error for fp8_scaled / fp8_e4m3fn checkpoints (the seed: they cannot be used)."""
    evidence = fp8_evidence(tensors)
    if not evidence:
        return
    files = sorted({str(p) for p, _ in tensors.values()})
    raise ModelFileError(
        f"{files[0]}: this is a pre-quantized fp8 checkpoint ({'; '.join(evidence)}). "
        "fp8_scaled / fp8_e4m3fn checkpoints cannot be used.",
        f"{downloads.hint(component, variant)} Download the bf16 file; --fp8_base/--fp8_scaled (DiT) or "
        "--fp8_vl (text encoder) store it in fp8 at load time.")


def check_float_tensors(tensors: TensorMap, what: str, skip: Callable[[str], bool] = lambda k: False) -> None:
    """Weights are floating-point: an integer tensor (a damaged file, or a quantization format we cannot read)
    would be cast into nonsense weights. From headers only."""
    for key, (path, info) in tensors.items():
        if info.dtype not in FLOAT_DTYPES and not skip(key):
            raise ModelFileError(f"{path}: tensor {key!r} is stored as {info.dtype} (integers), but a {what} holds "
                                 "floating-point weights.", "The file is damaged or quantized in a format this "
                                 "engine cannot read; use the bf16/fp16/fp32 safetensors file.")


# ---------------------------------------------------------------------------------------------- build + check

def build_empty(cls, config: Mapping) -> torch.nn.Module:
    """Build `cls` from `config` with parameters on the meta device (no memory); plain tensor attributes
    such as RoPE tables are computed normally on CPU. Works for diffusers (`from_config`) and transformers
    (`_from_config` with a config object) classes."""
    with init_empty_weights():
        if hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):
            # diffusers re-applies defaults for names in `_use_default_values` (saved configs carry it), which
            # would undo overrides such as zero_cond_t; the values given are the ones we mean.
            return cls.from_config({k: v for k, v in config.items() if k != "_use_default_values"})
        return cls._from_config(config)


def renamed(tensors: TensorMap, rename: Rename | None) -> dict[str, tuple[str, Path, TensorInfo]]:
    """model key → (file key, file, info) after `rename`; two file keys landing on one name is an error."""
    out: dict[str, tuple[str, Path, TensorInfo]] = {}
    for key, (path, info) in tensors.items():
        name = rename(key) if rename else key
        if name is None:
            continue
        if name in out:
            raise ModelFileError(f"{path}: tensors {out[name][0]!r} and {key!r} both map to {name!r}.",
                                 "The file mixes two key layouts (e.g. with and without a prefix); re-save it "
                                 "with one.")
        out[name] = (key, path, info)
    return out


def check_shapes(model: torch.nn.Module, tensors: TensorMap, config_source: str, rename: Rename | None = None,
                 extra: Mapping[str, torch.Tensor] | None = None, what: str = "model") -> None:
    """Every state-dict entry of `model` (on meta) must be in the file with the same shape, and the file
    must hold nothing else. Runs on headers only, before any weight is allocated."""
    found = renamed(tensors, rename)
    for name, t in (extra or {}).items():
        found.setdefault(name, ("<supplied>", Path("<supplied>"), TensorInfo("F32", tuple(t.shape), 0, 0)))
    expected = model.state_dict()
    first_file = next(iter(sorted({str(p) for p, _ in tensors.values()})), "<no files>")
    for name, param in expected.items():
        if name in found and param.is_floating_point() and found[name][2].dtype not in FLOAT_DTYPES:
            key, path, info = found[name]
            raise ModelFileError(
                f"{path}: tensor {key!r} is stored as {info.dtype} (integers), but the {what} needs floating-point "
                "weights there.", "The file is damaged or quantized in a format this engine cannot read; use the "
                "bf16/fp16/fp32 safetensors file.")
        if name in found and tuple(found[name][2].shape) != tuple(param.shape):
            key, path, info = found[name]
            raise ModelFileError(
                f"{path}: tensor {key!r} has shape {list(info.shape)} but the {what} built from "
                f"{config_source} expects {list(param.shape)}.",
                "The file does not match the config: use the matching model file, or store the right config "
                "as JSON in the file's 'config' metadata.")
    missing = [n for n in expected if n not in found]
    unexpected = [found[n][0] for n in found if n not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors the {what} needs are missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors are not part of it (e.g. {', '.join(unexpected[:3])})")
        raise ModelFileError(f"{first_file}: does not match the {what} built from {config_source}: "
                             f"{'; '.join(parts)}.",
                             "Check that this is the right kind of file (see `python -m engine inspect_model "
                             "FILE`), and that shard sets are complete.")


# ---------------------------------------------------------------------------------------------- load

def file_dtype(tensors: TensorMap) -> torch.dtype | None:
    """The floating dtype holding most bytes (the checkpoint's precision)."""
    sizes: dict[str, int] = {}
    for _, info in tensors.values():
        if info.dtype in ("F64", "F32", "F16", "BF16"):
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    return torch_dtype(max(sizes, key=sizes.get)) if sizes else None


def choose_dtype(device: torch.device, tensors: TensorMap, requested: torch.dtype | None = None) -> torch.dtype:
    """The asked dtype, else the file's bf16 on CUDA and float32 on CPU (engine.models.runtime.compute_dtype)."""
    return requested if requested is not None else compute_dtype(torch.device(device), file_dtype(tensors))


def load_weights(model: torch.nn.Module, files: Iterable[str | os.PathLike], dtype: torch.dtype | None,
                 device: torch.device | str, rename: Rename | None = None, transform: Transform | None = None,
                 extra: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Fill a meta-built `model` from `files`, one tensor read at a time, strict and with assign=True (the
    read buffers become the parameters: no second copy). `extra` supplies tensors a file may lack.
    Non-parameter tensors created at build time (RoPE tables) are moved to `device` afterwards."""
    device = torch.device(device)
    state = dict(iter_tensors(files, dtype=dtype, device=device, rename=rename, transform=transform))
    for name, t in (extra or {}).items():
        state.setdefault(name, t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype))
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.to(device)
    return model.eval()


def count_params(tensors: TensorMap, rename: Rename | None = None) -> int:
    """Exact number of values in the (renamed) tensors — from headers only."""
    return sum(info.numel for _, _, info in renamed(tensors, rename).values())
