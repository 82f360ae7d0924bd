"""The Qwen2.5-VL-7B text encoder loader → transformers' `Qwen2_5_VLForConditionalGeneration`.

Layouts (docs/architecture.md, "Model files"):
- ComfyUI `qwen_2.5_vl_7b.safetensors` and the transformers-4 files of Qwen/Qwen-Image `text_encoder/`: keys
  `model.*` (language model), `visual.*` (vision tower), optional `lm_head.*`;
- the current transformers layout: `model.language_model.*`, `model.visual.*`, `lm_head.*`;
as one file, a shard set, or a folder (config.json + one file or an index). A pipeline folder holding
`text_encoder/` works too.

Qwen-Image reads only hidden states, so a missing `lm_head` is not an error: it is tied to the token embedding
(no extra memory) and a log line says that generated text would be meaningless.
`fp8_vl` stores the Linear weights as float8_e4m3fn (half the memory of bf16) and upcasts each to the compute
dtype when it is used; embeddings, norms, biases and the patch embedding stay in the compute dtype, and RMSNorm is
computed in float32 (musubi-tuner's --fp8_vl).
"""

from __future__ import annotations

import json
import logging
import os
import types
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from engine.models import common
from engine.models.inspect import identify_tensors
from engine.spec import downloads
from engine.spec.errors import ModelFileError
from engine.spec.safetensors_header import expand_shards, read_headers

log = logging.getLogger(__name__)

# Qwen/Qwen-Image text_encoder/config.json (= Qwen2.5-VL-7B-Instruct), in transformers 5's nested layout.
PUBLISHED_TE_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-06,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 28,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "rope_parameters": {"mrope_section": [16, 24, 24], "rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "dtype": "bfloat16",
    },
    "vision_config": {
        "model_type": "qwen2_5_vl_vision",
        "depth": 32,
        "hidden_size": 1280,
        "hidden_act": "silu",
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "initializer_range": 0.02,
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "tie_word_embeddings": False,
}
PUBLISHED_TE_PARAMS = 8_292_166_656       # incl. vision tower and lm_head
LM_HEAD = "lm_head.weight"
EMBED = "model.language_model.embed_tokens.weight"

def load_text_encoder(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                      fp8_vl: bool = False, need_lm_head: bool = False):
    """Load Qwen2.5-VL as `Qwen2_5_VLForConditionalGeneration` on `device`, in eval mode, frozen.

    dtype: None = the file's bf16 on CUDA, float32 on CPU. fp8_vl: Linear weights stored as float8_e4m3fn.
    need_lm_head: the caller generates text (caption_images), so a file without `lm_head` is refused before any
    weight is read, unless its config ties the head to the token embedding.
    """
    files, folder_config = text_encoder_files(path)
    tensors = read_headers(files)
    check_is_qwen25vl(tensors, files[0])
    common.check_not_prequantized(tensors, "text_encoder")
    rename = key_mapping(tensors)

    config_dict, source = common.resolve_config(files, PUBLISHED_TE_CONFIG, folder_config)
    config = make_config(config_dict, source)
    model = common.build_empty(model_class(), config)
    has_lm_head = any(rename(k) == LM_HEAD for k in tensors)
    if need_lm_head and not has_lm_head and not config_ties_head(config):
        raise no_lm_head_error(files[0])
    extra = None if has_lm_head else {LM_HEAD: model.lm_head.weight}
    common.check_shapes(model, tensors, source, rename=rename, extra=extra, what="Qwen2.5-VL text encoder")

    dtype = common.choose_dtype(device, tensors, dtype)
    fp8_names = _fp8_weight_names(model) if fp8_vl else set()
    log.info("loading text encoder %s (%d file%s) as %s%s on %s", path, len(files), "s" * (len(files) > 1),
             str(dtype).removeprefix("torch."), " with fp8 (e4m3fn) Linear weights" if fp8_vl else "", device)
    if not has_lm_head:
        log.info("text encoder %s has no lm_head: tied to the token embedding (no extra memory). Qwen-Image uses "
                 "only hidden states, which this does not change; text generated with it would be meaningless.",
                 files[0].name)
    transform = _make_transform(fp8_names, tie_lm_head=not has_lm_head)
    model = common.load_weights(model, files, dtype, device, rename=rename, transform=transform)
    if fp8_vl:
        enable_fp8_compute(model)
    return model.requires_grad_(False)


def check_can_generate(path: str | os.PathLike) -> None:
    """Refuse, from the headers alone, a text encoder that cannot write text: no lm_head and no tied head."""
    files, folder_config = text_encoder_files(path)
    tensors = read_headers(files)
    check_is_qwen25vl(tensors, files[0])
    rename = key_mapping(tensors)
    config_dict, source = common.resolve_config(files, PUBLISHED_TE_CONFIG, folder_config)
    if not any(rename(k) == LM_HEAD for k in tensors) and not config_ties_head(make_config(config_dict, source)):
        raise no_lm_head_error(files[0])


def no_lm_head_error(file: Path) -> ModelFileError:
    return ModelFileError(f"{file}: this text encoder file has no lm_head (the layer that turns hidden states into "
                          "words), so it cannot write captions; Qwen-Image itself does not need it.",
                          "Use a text encoder file that includes lm_head.weight: ComfyUI's qwen_2.5_vl_7b.safetensors "
                          f"or the text_encoder/ folder of {downloads.OFFICIAL_REPOS['original']}. "
                          f"{downloads.hint('text_encoder')}")


def config_ties_head(config) -> bool:
    """True when the config shares lm_head with the token embedding (small Qwen2.5-VL models do; 7B does not)."""
    text = getattr(config, "text_config", None)
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def model_class():
    return Qwen2_5_VLForConditionalGeneration


def text_encoder_files(path: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """(safetensors files, config.json next to them or None) for a file, shard, folder or pipeline folder.
    A file's sibling config.json counts only when it is a Qwen2.5-VL config (not some other model's)."""
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "text_encoder").is_dir():
        path = path / "text_encoder"   # a whole diffusers pipeline folder
    files = expand_shards(path)
    if path.is_dir():
        return files, path / "config.json"
    return files, sibling_config(path, "model_type", "qwen2_5_vl")


def sibling_config(file: Path, key: str, value: str) -> Path | None:
    """The config.json next to a weights file when its `key` is `value` (a ComfyUI file may sit next to some
    other model's config.json, which must not be used)."""
    sibling = file.parent / "config.json"
    try:
        return sibling if json.loads(sibling.read_text(encoding="utf-8")).get(key) == value else None
    except (OSError, ValueError, AttributeError):
        return None


def make_config(config_dict: dict, source: str):
    """A `Qwen2_5_VLConfig` from the current nested layout or the transformers-4 flat one (whose top-level
    text fields the config class routes into text_config)."""
    model_type = config_dict.get("model_type", "qwen2_5_vl")
    if model_type != "qwen2_5_vl":
        raise ModelFileError(f"{source} describes a {model_type!r} model, not Qwen2.5-VL ('qwen2_5_vl').",
                             f"Use the Qwen-Image text encoder. {downloads.hint('text_encoder')}")
    try:
        return Qwen2_5_VLConfig(**config_dict)
    except (TypeError, ValueError, KeyError, StrictDataclassError) as exc:
        raise ModelFileError(f"{source} is not a valid Qwen2.5-VL config ({type(exc).__name__}: {exc}).",
                             "Store the transformers config dict of the model there, or remove it to use the "
                             "published Qwen2.5-VL-7B config.") from exc


def check_is_qwen25vl(tensors: common.TensorMap, first: Path) -> None:
    """Refuse a file that is not a Qwen2.5-VL text encoder with its vision tower, naming what it looks like
    (headers only; the identification is inspect_model's)."""
    ident = identify_tensors(tensors)
    if ident.component == "text_encoder" and ident.family == "qwen2.5-vl" and not ident.problems:
        return
    problems = f" ({'; '.join(ident.problems)})" if ident.problems else ""
    raise ModelFileError(f"{first}: this is not the Qwen2.5-VL text encoder; it looks like "
                         f"{ident.description or 'no known model layout'}{problems}.",
                         f"Pass the Qwen-Image text encoder (Qwen2.5-VL-7B with its vision tower) to --text_encoder. "
                         f"{downloads.hint('text_encoder')}")


def key_mapping(tensors: common.TensorMap):
    """rename(file key) → module key. Old layout: `model.` → `model.language_model.`, `visual.` → `model.visual.`."""
    current = any(k.startswith(("model.language_model.", "model.visual.")) for k in tensors)
    old = any(k.startswith("visual.") or (k.startswith("model.") and not k.startswith(("model.language_model.",
                                                                                        "model.visual.")))
              for k in tensors)
    if current and old:
        first = next(iter(tensors.values()))[0]
        raise ModelFileError(f"{first}: mixes the old key layout (model.*, visual.*) with the current one "
                             "(model.language_model.*, model.visual.*).",
                             "Re-save the text encoder in one layout, or download it again.")
    return _identity if current else _old_to_current


def _identity(key: str) -> str:
    return key


def _old_to_current(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


# ---------------------------------------------------------------------------------------------- load helpers

def _fp8_weight_names(model) -> set[str]:
    """Weights stored in fp8: every Linear's weight (language model, vision blocks, merger, lm_head). The patch
    embedding stays high precision: its dtype sets the pixel dtype (model.visual.dtype)."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _make_transform(fp8_names: set[str], tie_lm_head: bool):
    if not fp8_names and not tie_lm_head:
        return None
    fp8_max = torch.finfo(torch.float8_e4m3fn).max

    def transform(name: str, tensor: torch.Tensor):
        if name in fp8_names:
            # e4m3fn has no inf: clamp so an out-of-range value saturates instead of becoming NaN.
            tensor = tensor.clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
        if tie_lm_head and name == EMBED:
            return {name: tensor, LM_HEAD: tensor}   # one storage, two parameters
        return tensor

    return transform


def _linear_fp8_forward(self, x):
    return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def _rmsnorm_fp32_forward(self, hidden_states):
    dtype = hidden_states.dtype
    x = hidden_states.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (self.weight.float() * x).to(dtype)


def enable_fp8_compute(model) -> None:
    """Make an fp8-stored model run: each fp8 Linear upcasts its weight per call; RMSNorm runs in float32."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float8_e4m3fn:
            module.forward = types.MethodType(_linear_fp8_forward, module)
        elif type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_fp32_forward, module)
