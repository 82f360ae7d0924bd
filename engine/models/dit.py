"""The Qwen-Image DiT loader: any of the published layouts → diffusers' `QwenImageTransformer2DModel`.

Layouts (docs/architecture.md, "Model files"): a ComfyUI single file (keys with or without the `model.diffusion_model.` prefix,
Edit-2511's `__index_timestep_zero__` marker), a diffusers `transformer/` folder (config.json + one file or an
index + shards), a pipeline folder holding `transformer/`, or any shard of an HF shard set.

Everything that can be checked from headers is checked before a byte of weights is allocated: that the file
is a Qwen-Image DiT at all (not Flux, Wan, SD3, a VAE or a text encoder), not pre-quantized fp8, edit vs
text-to-image evidence against --model_version, and every tensor shape against the config.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel

from engine.models import common, fp8_files
from engine.models.inspect import identify_tensors
from engine.models.safetensors_io import Transform
from engine.spec import downloads
from engine.spec.errors import ModelFileError, OptionError
from engine.spec.safetensors_header import expand_shards, read_headers
from engine.spec.variants import get_variant

log = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."
MARKER_2511 = "__index_timestep_zero__"   # ComfyUI's flag in Edit-2511 checkpoints; not a weight

# diffusers' Qwen/Qwen-Image transformer/config.json (also Edit and Edit-2509; Edit-2511 adds zero_cond_t,
# which we set from the model version). `pooled_projection_dim: 768` of older files is not an init argument.
PUBLISHED_DIT_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
PUBLISHED_DIT_PARAMS = 20_430_401_088


def dit_class():
    return QwenImageTransformer2DModel


def strip_prefix(key: str) -> str | None:
    """File key → diffusers module key: drop ComfyUI's prefix; drop the 2511 marker (not a weight)."""
    key = key[len(COMFY_PREFIX):] if key.startswith(COMFY_PREFIX) else key
    return None if key == MARKER_2511 else key


def dit_files(path: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """(safetensors files, config.json next to them or None) for a file, shard, transformer/ or pipeline folder.
    A file's sibling config.json counts only when it is a QwenImageTransformer2DModel config."""
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "transformer").is_dir():
        path = path / "transformer"   # a whole diffusers pipeline folder
    files = expand_shards(path)
    folder_config = (path if path.is_dir() else path.parent) / "config.json"
    if not path.is_dir() and not _is_dit_config(folder_config):
        folder_config = None          # a ComfyUI file next to some other model's config.json
    return files, folder_config


def _is_dit_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("_class_name") == PUBLISHED_DIT_CONFIG["_class_name"]
    except (OSError, ValueError, AttributeError):
        return False


def load_dit(path: str | os.PathLike, model_version: str = "original", device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None, transform: Transform | None = None):
    """Load a Qwen-Image DiT as diffusers' `QwenImageTransformer2DModel` on `device`, in eval mode.

    dtype: None = the file's bf16 on CUDA, float32 on CPU (engine.models.runtime.compute_dtype).
    transform(name, tensor): called per tensor after the dtype/device cast, with diffusers key names
    (prefix already stripped); return a tensor, {name: tensor} or None — the hook for fp8 quantisation and
    LoRA merging at load time (see safetensors_io.iter_tensors). Any extra keys it returns must exist in the
    module it is loaded into (e.g. after patching Linear layers with scale buffers).
    """
    variant = _variant(model_version)
    files, folder_config = dit_files(path)
    tensors = read_headers(files)
    check_is_qwen_dit(tensors, files[0])
    fp8_kind = fp8_files.check_dit(files, tensors, variant.name)   # only merge_lora's own fp8 files pass
    check_edit_evidence(tensors, Path(path), variant)
    rename = fp8_files.renamer(strip_prefix, fp8_kind)

    config, source = common.resolve_config(files, PUBLISHED_DIT_CONFIG, folder_config)
    config = {**config, "zero_cond_t": variant.zero_cond_t}
    model = common.build_empty(dit_class(), config)
    common.check_shapes(model, tensors, source, rename=rename, what="Qwen-Image DiT")

    dtype = common.choose_dtype(device, tensors, dtype)
    log.info("loading DiT %s (%d file%s) as %s on %s", path, len(files), "s" * (len(files) > 1),
             str(dtype).removeprefix("torch."), device)
    transform = fp8_files.dequantizing(files, fp8_kind, rename, transform)
    return common.load_weights(model, files, dtype, device, rename=rename, transform=transform)


def _variant(model_version: str):
    try:
        return get_variant(model_version)
    except ValueError as e:
        raise OptionError(str(e), "Use --model_version original, edit, edit-2509 or edit-2511.") from None


def check_is_qwen_dit(tensors: common.TensorMap, first: Path) -> None:
    """Refuse a file that is not a Qwen-Image DiT, naming what it looks like."""
    ident = identify_tensors(tensors)
    if ident.component == "dit" and ident.family == "qwen-image":
        return
    looks = ident.description or "no known model layout"
    raise ModelFileError(f"{first}: this is not a Qwen-Image DiT; it looks like {looks}.",
                         f"Pass the Qwen-Image DiT to --dit. {downloads.hint('dit')}")


def edit_evidence(tensors: common.TensorMap, path: Path) -> tuple[bool, str | None]:
    """(looks like an edit model, the evidence). Edit and t2i DiTs have identical shapes:
    only the 2511 marker key or "edit" in the file/folder name tells them apart."""
    if any(strip_prefix(k) is None for k in tensors):
        return True, f"the Edit-2511 marker key {MARKER_2511!r}"
    name = _evidence_name(path)
    if "edit" in name.lower():
        return True, f"the name {name!r} contains 'edit'"
    return False, f"the name {name!r} does not contain 'edit' and there is no {MARKER_2511!r} key"


def _evidence_name(path: Path) -> str:
    """The file name; for a diffusers folder its name plus the pipeline folder's (…/Qwen-Image-Edit/transformer)."""
    if path.is_dir():
        return f"{path.parent.name}/{path.name}" if path.name == "transformer" else path.name
    return path.name


def check_edit_evidence(tensors: common.TensorMap, path: Path, variant) -> None:
    has_marker = any(strip_prefix(k) is None for k in tensors)
    if has_marker and not variant.zero_cond_t:
        raise ModelFileError(f"{path}: has the {MARKER_2511!r} key, so it is a Qwen-Image-Edit-2511 DiT, but "
                             f"--model_version is {variant.name}.",
                             "Use --model_version edit-2511 with this file, or pass the DiT of the version you want.")
    looks_edit, evidence = edit_evidence(tensors, path)
    if looks_edit and not variant.is_edit:
        raise ModelFileError(f"{path}: looks like an edit-model DiT ({evidence}) but no edit mode was given "
                             "(--model_version original).",
                             "Add --model_version edit / edit-2509 / edit-2511 (or --edit / --edit_plus), or pass "
                             "the text-to-image DiT.")
    if not looks_edit and variant.is_edit:
        log.warning("DiT %s looks like a text-to-image model (%s) but --model_version is %s; edit and "
                    "text-to-image DiTs have identical shapes, so loading it anyway.", path, evidence, variant.name)
    else:
        log.info("DiT %s: %s model (evidence: %s)", path, "edit" if looks_edit else "text-to-image", evidence)


def check_dit_headers(path: str, variant) -> None:
    """The DiT's kind and edit evidence from its headers (milliseconds), so a wrong file or a missing edit mode
    fails before the text encoder has run or a training dataset is opened."""
    files, folder_config = dit_files(path)
    tensors = read_headers(files)
    check_is_qwen_dit(tensors, files[0])
    fp8_files.check_dit(files, tensors, variant.name)
    common.check_float_tensors(tensors, "Qwen-Image DiT", skip=lambda k: strip_prefix(k) is None)
    common.resolve_config(files, PUBLISHED_DIT_CONFIG, folder_config)     # its 'config' within sane bounds
    check_edit_evidence(tensors, Path(path), variant)


def weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Module key (diffusers names) → shape of every tensor of the DiT, from its headers: what a LoRA is checked
    against before anything loads."""
    files, _ = dit_files(path)
    return {name: tuple(info.shape) for key, (_, info) in read_headers(files).items()
            if (name := strip_prefix(key)) is not None}
