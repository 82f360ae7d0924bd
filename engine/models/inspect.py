"""`python -m engine inspect_model FILE... [--json]`: identify model files from their headers alone.

For each path (a file, any shard of a set, or a folder): component (dit / text_encoder / vae / lora /
unknown), variant (original / edit / edit-2509 / edit-2511, or None when the file cannot tell), main dtype,
exact parameter count from the shapes, size on disk, and a list of problems. Reads headers only and never
imports torch, so it answers in well under a second even for 40 GB files (docs/architecture.md lists the
JSON fields).

The GUI's Models tab runs the command in a subprocess with --json; `inspect_paths` is the same as a function.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.spec import naming
from engine.spec import model_bounds
from engine.spec.errors import EngineError, OptionError
from engine.spec.safetensors_header import DTYPE_SHORT, FP8_DTYPES, TensorInfo, expand_shards, read_header
from engine.spec.variants import VARIANTS

JSON_KEYS = ("path", "component", "variant", "dtype", "params", "size_bytes", "problems", "can_caption")
COMFY_DIT_PREFIX = "model.diffusion_model."
MARKER_2511 = "__index_timestep_zero__"
FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".weight_scale_2")

# The published shapes, to flag a file that needs its own 'config' metadata to be loadable.
QWEN_DIT_WIDTH, QWEN_DIT_BLOCKS = 3072, 60
QWEN_VL_HIDDEN, QWEN_VL_LAYERS = 3584, 28
QWEN_VAE_Z = 16

_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Identity:
    """What a set of tensor names looks like. `family` is e.g. "qwen-image", "flux", "qwen2.5-vl"."""
    component: str = "unknown"
    family: str | None = None
    description: str = ""
    problems: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)   # sizes read from shapes (hidden, layers, z) for the checks


# ---------------------------------------------------------------------------------------------- identify

def identify_tensors(tensors) -> Identity:
    """Identify from tensor names and shapes. `tensors`: name → TensorInfo, or name → (path, TensorInfo)."""
    infos = {k: (v[1] if isinstance(v, tuple) else v) for k, v in tensors.items()}
    for check in (_lora, _qwen_dit, _other_dit, _text_encoder, _vae):
        ident = check(infos)
        if ident is not None:
            return ident
    sample = ", ".join(list(infos)[:3])
    return Identity(description=f"an unknown layout (keys such as {sample})" if infos else "an empty file")


def _has(keys, *parts: str) -> bool:
    return any(all(p in k for p in parts) for k in keys)


def _lora(infos: dict[str, TensorInfo]) -> Identity | None:
    keys = list(infos)
    if not _has(keys, "lora_") and not any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return None
    layout = ("kohya/musubi (lora_unet_*)" if _has(keys, "lora_unet_") else
              "diffusers (transformer.*)" if any(k.startswith("transformer.") for k in keys) else
              "ComfyUI (diffusion_model.*)" if any(k.startswith("diffusion_model.") for k in keys) else "PEFT")
    qwen = _has(keys, "img_mod") or _has(keys, "txt_mlp") or _has(keys, "img_mlp") or _has(keys, "txt_mod")
    if qwen:
        return Identity("lora", "qwen-image", f"a Qwen-Image LoRA, {layout} layout")
    other = ("Flux" if _has(keys, "double_blocks") or _has(keys, "single_transformer_blocks") else
             "Wan" if _has(keys, "self_attn") and _has(keys, "cross_attn") else
             "SD/SDXL" if _has(keys, "lora_te") or _has(keys, "down_blocks") or _has(keys, "input_blocks") else
             "an unknown model")
    return Identity("lora", other.lower(), f"a LoRA for {other}, {layout} layout",
                    [f"LoRA for {other}, not Qwen-Image (no img_mod/img_mlp/txt_mlp targets)"])


def _strip(keys, prefix: str) -> set[str]:
    return {k[len(prefix):] if k.startswith(prefix) else k for k in keys}


def _qwen_dit(infos: dict[str, TensorInfo]) -> Identity | None:
    keys = _strip(infos, COMFY_DIT_PREFIX)
    if not ({"img_in.weight", "txt_in.weight"} <= keys and _has(keys, "transformer_blocks.", ".img_mod.")):
        return None
    problems = []
    if "time_text_embed.addition_t_embedding.weight" in keys:
        problems.append("Qwen-Image-Layered DiT: the layered model is not supported")
    return Identity("dit", "qwen-image", "a Qwen-Image DiT", problems)


def _other_dit(infos: dict[str, TensorInfo]) -> Identity | None:
    keys = _strip(infos, COMFY_DIT_PREFIX)
    checks = (
        (("double_blocks.",), "flux", "a Flux-style DiT (double_blocks.*; Flux / HunyuanVideo)"),
        (("single_transformer_blocks.",), "flux", "a Flux DiT in diffusers layout (single_transformer_blocks.*)"),
        (("joint_blocks.",), "sd3", "an SD3 / SD3.5 MMDiT (joint_blocks.*)"),
        (("blocks.", ".self_attn."), "wan", "a Wan 2.x DiT (blocks.N.self_attn / cross_attn)"),
        (("input_blocks.",), "sd-unet", "a Stable Diffusion / SDXL UNet (input_blocks.*)"),
        (("first_stage_model.",), "sd-checkpoint", "a full Stable Diffusion checkpoint (first_stage_model.*)"),
        (("transformer_blocks.", ".ff.net."), "other-dit", "a DiT of another family (transformer_blocks.N.ff.*)"),
    )
    for parts, family, text in checks:
        if any(all(p in k for p in parts) and not k.startswith(("lora", "model.visual")) for k in keys):
            if family == "wan" and not _has(keys, "cross_attn"):
                continue
            return Identity("dit", family, text, [f"not a Qwen-Image model: looks like {text}"])
    return None


def _text_encoder(infos: dict[str, TensorInfo]) -> Identity | None:
    keys = list(infos)
    lm = [k for k in keys if k.startswith(("model.layers.", "model.language_model.layers.",
                                           "language_model.model.layers."))]
    if _has(keys, "encoder.block.", "SelfAttention"):
        return Identity("text_encoder", "t5", "a T5 text encoder", ["T5 text encoder, not Qwen2.5-VL"])
    if _has(keys, "text_model.encoder.layers."):
        return Identity("text_encoder", "clip", "a CLIP text encoder", ["CLIP text encoder, not Qwen2.5-VL"])
    if not lm:
        return None
    embed = next((infos[k] for k in keys if k.endswith("embed_tokens.weight")), None)
    hidden = embed.shape[1] if embed is not None and len(embed.shape) == 2 else None
    layout = "transformers" if any(k.startswith("model.language_model.") for k in keys) else "ComfyUI/legacy HF"
    has_visual = any(k.startswith(("visual.", "model.visual.")) for k in keys)
    ident = Identity("text_encoder", "qwen2.5-vl", f"a Qwen2.5-VL text encoder ({layout} layout)")
    if not has_visual:
        ident.family = "llm"
        ident.description = f"a language model without a vision tower ({layout} layout)"
        ident.problems.append("no vision tower (visual.*): Qwen-Image needs the full Qwen2.5-VL-7B file")
    if not any(k.endswith("q_proj.bias") for k in keys):
        ident.problems.append("attention projections have no bias: not a Qwen2 / Qwen2.5 language model")
    ident.extra = {"hidden": hidden, "layers": len({m.group(1) for k in keys if (m := _LAYER_RE.search(k))
                                                     and "visual" not in k})}
    return ident


def _vae(infos: dict[str, TensorInfo]) -> Identity | None:
    conv_in = infos.get("decoder.conv_in.weight") or infos.get("decoder.conv1.weight")
    if conv_in is None or not _has(infos, "encoder."):
        return None
    comfy = "decoder.conv1.weight" in infos
    z = conv_in.shape[1] if len(conv_in.shape) > 1 else None
    if len(conv_in.shape) != 5:
        text = f"a 2-D image VAE (SD / SDXL / Flux / SD3 family, {z} latent channels)"
        return Identity("vae", "2d-vae", text, [f"VAE of the wrong family: {text}; Qwen-Image needs its 3-D "
                                                "causal VAE (16 latent channels)"])
    layout = "ComfyUI/Wan original" if comfy else "diffusers"
    ident = Identity("vae", "qwen-image", f"a Qwen-Image / Wan-2.1-style 3-D causal VAE ({layout} layout)")
    enc_in = infos.get("encoder.conv_in.weight") or infos.get("encoder.conv1.weight")
    if enc_in is not None and len(enc_in.shape) == 5 and enc_in.shape[1] == 4:
        ident.problems.append("Qwen-Image-Layered (RGBA) VAE: the layered model is not supported")
    ident.extra = {"z": z}
    return ident


# ---------------------------------------------------------------------------------------------- per file

def inspect_path(path: str | Path) -> dict:
    """One result object (the JSON contract's keys) for a file, shard set or folder. Never raises for a bad
    file: what is wrong goes into `problems`."""
    path = Path(path)
    result = {"path": str(path), "component": "unknown", "variant": None, "dtype": None, "params": 0,
              "size_bytes": 0, "problems": [], "can_caption": None}
    try:
        headers = [read_header(f) for f in _files(path)]
    except EngineError as e:
        result["problems"].append(e.message)
        if path.is_file():
            result["size_bytes"] = path.stat().st_size
        return result
    tensors = {k: v for h in headers for k, v in h.tensors.items()}
    metadata = {k: v for h in reversed(headers) for k, v in h.metadata.items()}
    ident = identify_tensors(tensors)
    result.update(component=ident.component, dtype=_main_dtype(tensors),
                  params=sum(i.numel for i in tensors.values()), size_bytes=sum(h.file_size for h in headers))
    problems = list(ident.problems)
    if naming.FP8_MARKER_KEY not in metadata:      # merge_lora's own fp8 files load (engine/models/fp8_files.py)
        problems += _fp8_problems(tensors)
    variant, notes = _variant(ident, tensors, metadata, path)
    result["variant"] = variant
    problems += notes + _size_problems(ident, tensors, metadata) + _config_problems(metadata)
    if ident.component == "unknown":
        problems.append(f"unrecognised: {ident.description}")
    result["problems"] = problems
    if ident.component == "text_encoder" and ident.family == "qwen2.5-vl":
        result["can_caption"] = lm_head_state(tensors, _config(metadata) or _folder_config(path)) != "missing"
    result["description"] = ident.description  # for the table; not part of the JSON contract
    return result


def _config_problems(metadata: dict) -> list[str]:
    """The 'config' metadata against engine/spec/model_bounds.py (what the loaders refuse before building)."""
    text = metadata.get("config")
    if text is None:
        return []
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        return ["metadata 'config' is not valid JSON"]
    if not isinstance(config, dict):
        return ["metadata 'config' is not a JSON object"]
    return [f"metadata 'config': {p}" for p in model_bounds.config_problems(config)]


def _files(path: Path) -> list[Path]:
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "transformer").is_dir():
        path = path / "transformer"
    return expand_shards(path)


def _main_dtype(tensors: dict[str, TensorInfo]) -> str | None:
    sizes: dict[str, int] = {}
    for info in tensors.values():
        sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    if not sizes:
        return None
    name = max(sizes, key=sizes.get)
    return DTYPE_SHORT.get(name, name.lower())


def _fp8_problems(tensors: dict[str, TensorInfo]) -> list[str]:
    fp8 = [k for k, i in tensors.items() if i.dtype in FP8_DTYPES]
    scales = [k for k in tensors if k.endswith(FP8_SCALE_SUFFIXES) or k == "scaled_fp8" or "comfy_quant" in k]
    if not fp8 and not scales:
        return []
    why = f"{len(fp8)} fp8 tensors" if fp8 else f"fp8 scale keys such as {scales[0]!r}"
    return [f"pre-quantized fp8 checkpoint ({why}): cannot be used; download the bf16 file and use "
            "--fp8_base/--fp8_scaled/--fp8_vl instead"]


def _config(metadata: dict) -> dict | None:
    try:
        cfg = json.loads(metadata["config"])
    except (KeyError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _folder_config(path: Path) -> dict | None:
    """config.json of a transformers folder, or the Qwen2.5-VL config.json next to a file (another model's
    config.json beside a ComfyUI file says nothing about it)."""
    folder = path if path.is_dir() else path.parent
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or (not path.is_dir() and cfg.get("model_type") != "qwen2_5_vl"):
        return None
    return cfg


def lm_head_state(keys, config: dict | None) -> str:
    """Whether a Qwen2.5-VL file can generate text (caption_images): "present" (it has lm_head.weight), "tied"
    (its config shares the head with the token embedding) or "missing" (hidden states only: enough for Qwen-Image,
    not for captions). Headers only."""
    if any(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in keys):
        return "present"
    config = config or {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return "tied" if config.get("tie_word_embeddings") or text.get("tie_word_embeddings") else "missing"


def _evidence_name(path: Path) -> str:
    if path.is_dir():
        return f"{path.parent.name}/{path.name}" if path.name == "transformer" else path.name
    return path.name


def _variant(ident: Identity, tensors, metadata: dict, path: Path) -> tuple[str | None, list[str]]:
    """(variant, notes). Only a DiT or a LoRA says which model version it is for."""
    if ident.component == "lora":
        return _lora_variant(metadata)
    if ident.component != "dit" or ident.family != "qwen-image":
        return None, []
    name = _evidence_name(path).lower()
    by_name = ("edit-2511" if "2511" in name else "edit-2509" if "2509" in name else
               "edit" if "edit" in name else "original" if "qwen" in name else None)
    has_marker = any(k.endswith(MARKER_2511) for k in tensors)
    if has_marker or (_config(metadata) or {}).get("zero_cond_t"):
        why = "the __index_timestep_zero__ key" if has_marker else "zero_cond_t in its config metadata"
        notes = [] if by_name in (None, "edit-2511") else [
            f"the name says {by_name} but {why} marks an Edit-2511 DiT"]
        return "edit-2511", notes
    if by_name is None:
        return None, ["variant unknown: edit and text-to-image DiTs have identical shapes and the name does not "
                      "say (pass --model_version yourself)"]
    if by_name == "edit-2511":
        return by_name, ["variant guessed from the file name only ('2511'), but the file lacks Edit-2511's "
                         "__index_timestep_zero__ key"]
    return by_name, [f"variant {by_name!r} guessed from the file name only (edit, edit-2509 and text-to-image "
                     "DiTs have identical shapes)"]


def _lora_variant(metadata: dict) -> tuple[str | None, list[str]]:
    arch = metadata.get("modelspec.architecture", "").removesuffix("/lora")
    for v in VARIANTS.values():
        if arch and arch == v.modelspec_arch:
            return v.name, []
    base = metadata.get("ss_base_model_version")
    if base == "qwen_image":
        return "original", []
    return None, []


def _size_problems(ident: Identity, tensors: dict[str, TensorInfo], metadata: dict) -> list[str]:
    """A file whose shapes differ from the published model loads only with its own 'config' metadata."""
    cfg = _config(metadata)
    extra = ident.extra
    if ident.component == "dit" and ident.family == "qwen-image":
        keys = _strip(tensors, COMFY_DIT_PREFIX)
        blocks = len({m.group(1) for k in keys if (m := _BLOCK_RE.match(k))})
        width = tensors.get("img_in.weight") or tensors.get(COMFY_DIT_PREFIX + "img_in.weight")
        if cfg is not None:
            n = cfg.get("num_layers")
            return [] if n in (None, blocks) else [f"config metadata says num_layers={n} but the file has {blocks}"]
        if blocks != QWEN_DIT_BLOCKS or (width and width.shape[0] != QWEN_DIT_WIDTH):
            return [f"{blocks} blocks of width {width.shape[0] if width else '?'} (the published DiT has "
                    f"{QWEN_DIT_BLOCKS} of {QWEN_DIT_WIDTH}) and no 'config' metadata: it will not load"]
    if ident.component == "text_encoder" and ident.family == "qwen2.5-vl" and cfg is None:
        if extra.get("hidden") not in (None, QWEN_VL_HIDDEN) or extra.get("layers") != QWEN_VL_LAYERS:
            return [f"hidden size {extra.get('hidden')} with {extra.get('layers')} layers (Qwen2.5-VL-7B has "
                    f"{QWEN_VL_HIDDEN} and {QWEN_VL_LAYERS}) and no 'config' metadata: it will not load"]
    if ident.component == "vae" and ident.family == "qwen-image" and extra.get("z") != QWEN_VAE_Z:
        return [f"VAE of the wrong family: {extra.get('z')} latent channels (Qwen-Image's VAE has {QWEN_VAE_Z}; "
                "48 is the Wan 2.2 VAE)"]
    return []


def inspect_paths(paths) -> list[dict]:
    """inspect_model as a function: one object per path with exactly the JSON contract's keys."""
    return [{k: r[k] for k in JSON_KEYS} for r in map(inspect_path, paths)]


# ---------------------------------------------------------------------------------------------- command

def format_table(results: list[dict]) -> str:
    rows = [("file", "component", "variant", "dtype", "params", "size", "problems")]
    for r in results:
        rows.append((Path(r["path"]).name, r["component"], r["variant"] or "-", r["dtype"] or "-",
                     _human(r["params"], 1000, ["", "K", "M", "B"]), _human(r["size_bytes"], 1024,
                                                                               [" B", " KiB", " MiB", " GiB"]),
                     "; ".join(r["problems"]) or "ok"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(6)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row[:6], widths)) + "  " + row[6] for row in rows)


def _human(n: int, base: int, units: list[str]) -> str:
    value, unit = float(n), units[0]
    for u in units[1:]:
        if value < base:
            break
        value, unit = value / base, u
    return f"{value:.2f}{unit}" if unit != units[0] else f"{int(value)}{unit}"


def run(cfg, events) -> list[str]:
    if not cfg.files:
        raise OptionError("inspect_model needs at least one FILE (or folder).",
                          "Example: python -m engine inspect_model qwen_image_bf16.safetensors --json")
    results = [inspect_path(p) for p in cfg.files]
    if cfg.json:
        print(json.dumps([{k: r[k] for k in JSON_KEYS} for r in results], ensure_ascii=False), flush=True)
    else:
        print(format_table(results), flush=True)
    return []
