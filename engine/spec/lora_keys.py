"""LoRA key names, file formats and summaries, without torch: what the Tools tab, the Generate tab's LoRA picker
and `inspect_lora` show, read from the safetensors header alone (plus the few bytes of each 0-d `alpha` tensor).

Formats (the names `convert_lora --format` writes):
- `kohya`:     `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha` — what kohya's
               sd-scripts and musubi-tuner's trainer write; ComfyUI and diffusers' `load_lora_weights` load it.
- `musubi`:    musubi-tuner's own layout, which is kohya's key layout (the file written is the same).
- `diffusers`: `transformer.<module.path>.lora_A.weight` / `.lora_B.weight` (PEFT), alpha in the metadata
               `lora_adapter_metadata` (PEFT LoraConfig JSON: `lora_alpha`, `alpha_pattern`), as diffusers'
               `save_lora_weights` writes it.
- `comfyui`:   `diffusion_model.<module.path>.lora_A.weight` / `.lora_B.weight` + `.alpha` (ComfyUI / ai-toolkit).
Read only: DiffSynth (`lora_A.default.weight`), LyCORIS LoHa (`hada_*`) and LoKr (`lokr_*`).

API:
- `module_path_from_kohya(name)`, `kohya_name(path)`, `split_key(key)`, `module_of(stem)`: key naming
- `summarize(path) -> dict`      format, kind, modules, ranks/alphas (uniform or per module), targets, version,
                                 dtype, size, training metadata; raises ModelFileError for another model family
- `check_version(summary, version, what)`   refuse a LoRA recorded for another model version
- `summary_markdown(summary)`    the readable table the app shows
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Iterable, TypeVar

from engine.spec.errors import ModelFileError
from engine.spec.safetensors_header import DTYPE_SHORT, Header, read_header
from engine.spec.variants import VARIANTS

KOHYA_PREFIX = "lora_unet_"
FORMATS = ("kohya", "musubi", "diffusers", "comfyui")
PEFT_METADATA_KEY = "lora_adapter_metadata"
T = TypeVar("T")

# The Linear layers inside one QwenImageTransformerBlock (all 14 are LoRA targets by default).
BLOCK_LINEARS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "img_mod.1", "txt_mod.1",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
# Linear layers outside the blocks (extraction covers them; diffusers' converter knows these).
TOP_LINEARS = ("img_in", "txt_in", "proj_out", "norm_out.linear",
               "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2")

_BLOCK_TAIL = {p.replace(".", "_"): p for p in BLOCK_LINEARS}
_TOP = {p.replace(".", "_"): p for p in TOP_LINEARS}
# Prefixes in front of the diffusers module path, longest first.
PATH_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lycoris_")

# suffix → factor name. Longest suffixes first so `.lora_A.default.weight` wins over `.weight`.
SUFFIXES = [
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"), (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"), (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"), (".lokr_w1", "lokr_w1"), (".lokr_w2", "lokr_w2"), (".lokr_t2", "lokr_t2"),
    (".alpha", "alpha"), (".dora_scale", "dora_scale"),
]

# Evidence that a file belongs to another model family: (regex on a key, description).
OTHER_FAMILIES = [
    (re.compile(r"(double_blocks|single_blocks)[._]\d"), "a Flux LoRA (double_blocks / single_blocks keys)"),
    (re.compile(r"(down_blocks|up_blocks|input_blocks|output_blocks|mid_block)[._]"),
     "an SD/SDXL UNet LoRA (down_blocks / input_blocks keys)"),
    (re.compile(r"^lora_te\d?_|text_model"), "a LoRA for a CLIP text encoder (lora_te / text_model keys)"),
    (re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn|ffn)"), "a Wan LoRA (blocks_N self_attn/ffn keys)"),
    (re.compile(r"(^|[._])(joint_blocks|layers)[._]\d"), "an SD3 / Lumina-style LoRA (joint_blocks / layers keys)"),
]
FOREIGN_HINT = ("Use a LoRA trained for Qwen-Image / Qwen-Image-Edit (keys like "
                "lora_unet_transformer_blocks_0_attn_to_q or diffusion_model.transformer_blocks.0.attn.to_q).")

# Training metadata worth showing, in display order: (key, label).
TRAINING_KEYS = (
    ("modelspec.title", "title"), ("ss_output_name", "output name"), ("ss_base_model_version", "base model"),
    ("modelspec.architecture", "architecture"), ("ss_network_module", "network module"),
    ("ss_network_dim", "network dim"), ("ss_network_alpha", "network alpha"), ("ss_steps", "steps"),
    ("ss_epoch", "epoch"), ("ss_num_epochs", "epochs"), ("ss_max_train_steps", "max steps"),
    ("ss_learning_rate", "learning rate"), ("ss_optimizer", "optimizer"), ("ss_num_train_items", "train items"),
    ("ss_sd_model_name", "base model file"), ("ss_sd_model_hash", "base model hash"),
    ("sshs_model_hash", "file hash"), ("ss_training_started_at", "started"),
    ("ss_training_finished_at", "finished"), ("modelspec.date", "date"),
)


# ---------------------------------------------------------------------------------------------- key names

def module_path_from_kohya(name: str) -> str | None:
    """`transformer_blocks_12_attn_to_out_0` → `transformer_blocks.12.attn.to_out.0`; None if unknown.

    Underscores are ambiguous (`to_out`, `img_mlp`), so the tail is looked up in the table of real names."""
    m = re.fullmatch(r"transformer_blocks_(\d+)_(.+)", name)
    if m:
        tail = _BLOCK_TAIL.get(m.group(2))
        return f"transformer_blocks.{m.group(1)}.{tail}" if tail else None
    return _TOP.get(name)


def kohya_name(module_path: str) -> str:
    """`transformer_blocks.0.attn.to_q` → `lora_unet_transformer_blocks_0_attn_to_q`."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


def split_key(key: str) -> tuple[str, str] | None:
    """(stem, factor) for a LoRA tensor key, e.g. (`lora_unet_..._to_q`, `down`); None for other keys."""
    for suffix, part in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def module_of(stem: str) -> tuple[str | None, str]:
    """(diffusers module path or None, prefix style) for the part of a key before its suffix."""
    if stem.startswith(KOHYA_PREFIX):
        return module_path_from_kohya(stem[len(KOHYA_PREFIX):]), "kohya"
    for prefix in PATH_PREFIXES:
        if stem.startswith(prefix):
            return known_path(stem[len(prefix):]), prefix.rstrip("._")
    return known_path(stem), "bare"


def known_path(path: str) -> str | None:
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        return path if m.group(2) in BLOCK_LINEARS else None
    return path if path in TOP_LINEARS else None


def foreign_error(path, unknown: list[str], total: int) -> ModelFileError:
    """The error for keys that name no Qwen-Image Linear layer, saying which family they look like."""
    sample = ", ".join(unknown[:3])
    for pattern, what in OTHER_FAMILIES:
        if any(pattern.search(k) for k in unknown):
            return ModelFileError(f"LoRA file {path} looks like {what}, not a Qwen-Image LoRA (e.g. {sample}).",
                                  FOREIGN_HINT)
    return ModelFileError(
        f"LoRA file {path}: {len(unknown)} of {total} keys name no Qwen-Image Linear layer (e.g. {sample}).",
        "Expected kohya (lora_unet_transformer_blocks_N_...), diffusers (transformer.transformer_blocks.N...."
        "lora_A/B), ComfyUI (diffusion_model....), DiffSynth (lora_A.default), LoHa or LoKr keys.")


def format_of(kinds: set[str], styles: set[str]) -> str:
    """The file's format name from its factor kinds and key prefix styles."""
    if kinds - {"lora"}:
        return "+".join(sorted(kinds))
    if "kohya" in styles:
        return "kohya"
    if "transformer" in styles:
        return "diffusers"
    return "comfyui"


# ---------------------------------------------------------------------------------------------- summary

def group_keys(items: Iterable[tuple[str, T]]) -> tuple[dict[str, dict[str, T]], set[str], list[str]]:
    """(file key, value) pairs as {module path: {factor: value}}, the prefix styles met, and the keys that are not
    a LoRA factor of a Qwen-Image module. The one grouping rule for headers (no torch) and loaded tensors."""
    grouped: dict[str, dict[str, T]] = {}
    styles: set[str] = set()
    unknown: list[str] = []
    for key, value in items:
        split = split_key(key)
        module, style = module_of(split[0]) if split else (None, "")
        if module is None:
            unknown.append(key)
            continue
        styles.add(style)
        grouped.setdefault(module, {})[split[1]] = value
    return grouped, styles, unknown


def group_header(header: Header) -> tuple[dict[str, dict[str, str]], set[str]]:
    """{module path: {factor: file key}} and the prefix styles; a foreign key is a ModelFileError."""
    grouped, styles, unknown = group_keys((key, key) for key in header.tensors)
    if not header.tensors:
        raise ModelFileError(f"LoRA file {header.path} holds no tensors.", "Use a LoRA trained for Qwen-Image.")
    if not grouped and not any(split_key(k) for k in header.tensors):
        raise ModelFileError(f"{header.path} is not a LoRA file: none of its {len(header.tensors)} tensors is a LoRA "
                             f"factor (lora_down/lora_up, lora_A/lora_B, hada_*, lokr_*; e.g. {unknown[0]}).",
                             "Give a LoRA file here; `python -m engine inspect_model FILE` says what a model file is.")
    if unknown:
        raise foreign_error(header.path, unknown, len(header.tensors))
    return grouped, styles


def read_scalar(header: Header, key: str) -> float:
    """The value of a 0-d (or 1-element) float tensor, read straight from the file (no torch)."""
    info = header.tensors[key]
    with open(header.path, "rb") as f:
        f.seek(header.data_start + info.start)
        raw = f.read(info.nbytes)
    if info.dtype == "F32":
        return struct.unpack("<f", raw[:4])[0]
    if info.dtype == "F16":
        return struct.unpack("<e", raw[:2])[0]
    if info.dtype == "BF16":
        return struct.unpack("<f", b"\0\0" + raw[:2])[0]
    if info.dtype == "F64":
        return struct.unpack("<d", raw[:8])[0]
    raise ModelFileError(f"LoRA file {header.path}: {key} is {info.dtype}, not a float alpha.",
                         "The file is damaged or in an unsupported layout.")


def peft_config(metadata: dict) -> dict | None:
    """The PEFT LoraConfig diffusers stores in `lora_adapter_metadata` (keys without the component prefix)."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return {k.removeprefix("transformer."): v for k, v in cfg.items()} if isinstance(cfg, dict) else None


def peft_alpha(module: str, peft: dict, rank: int) -> float:
    """A module's alpha under a PEFT config: alpha_pattern (regex on the module path), else lora_alpha,
    else the rank (scale 1)."""
    alpha = peft.get("lora_alpha")
    for pattern, value in (peft.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return float(alpha if alpha is not None else rank)


def _module_rank_alpha(header: Header, module: str, parts: dict[str, str], peft: dict | None):
    """(kind, rank or None, alpha or None) of one module, from shapes and the alpha tensor / PEFT config."""
    if "down" in parts:
        rank = header.tensors[parts["down"]].shape[0]
        if "alpha" in parts:
            return "lora", rank, read_scalar(header, parts["alpha"])
        return "lora", rank, (peft_alpha(module, peft, rank) if peft else None)
    kind = "loha" if any(p.startswith("hada_") for p in parts) else "lokr" if any(
        p.startswith("lokr_") for p in parts) else "other"
    rank = None
    for name in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
        if name in parts:
            rank = header.tensors[parts[name]].shape[0]
    alpha = read_scalar(header, parts["alpha"]) if "alpha" in parts else None
    return kind, rank, alpha


def summarize(path: str | os.PathLike) -> dict:
    """Everything `inspect_lora` reports about one LoRA file, from its header."""
    header = read_header(path)
    grouped, styles = group_header(header)
    peft = peft_config(header.metadata)
    modules = {}
    for module, parts in sorted(grouped.items(), key=lambda kv: _natural(kv[0])):
        kind, rank, alpha = _module_rank_alpha(header, module, parts, peft)
        modules[module] = {"kind": kind, "rank": rank, "alpha": alpha}
    kinds = {m["kind"] for m in modules.values()}
    fmt = format_of(kinds, styles)
    version, version_source = lora_version(header.metadata)
    ranks = Counter(m["rank"] for m in modules.values())
    alphas = Counter(m["alpha"] for m in modules.values())
    return {
        "path": str(header.path), "format": fmt, "kind": "+".join(sorted(kinds)), "modules": len(modules),
        "rank": next(iter(ranks)) if len(ranks) == 1 else None,
        "alpha": next(iter(alphas)) if len(alphas) == 1 else None,
        "ranks": {str(k): v for k, v in sorted(ranks.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))},
        "per_module": None if len(ranks) == 1 and len(alphas) == 1 else modules,
        "targets": targets(modules),
        "version": version, "version_source": version_source,
        "dtype": DTYPE_SHORT.get(header.main_dtype() or "", header.main_dtype()),
        "size_bytes": header.file_size, "params": header.params(),
        "training": {label: header.metadata[key] for key, label in TRAINING_KEYS if key in header.metadata},
        "datasets": datasets_summary(header.metadata.get("ss_datasets")),
    }


def _natural(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def targets(modules: dict) -> dict:
    """Which layers are covered: per block-layer name the number of blocks, the blocks, the top-level layers."""
    by_layer: dict[str, list[int]] = {}
    top = []
    for module in modules:
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
        if m:
            by_layer.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            top.append(module)
    blocks = sorted({b for bs in by_layer.values() for b in bs})
    return {"layers": {k: len(v) for k, v in sorted(by_layer.items(), key=lambda kv: BLOCK_LINEARS.index(kv[0]))},
            "blocks": _ranges(blocks), "num_blocks": len(blocks), "top_level": sorted(top)}


def _ranges(numbers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def datasets_summary(raw: str | None) -> str | None:
    """ss_datasets (JSON list of dataset dicts) as one line: images, repeats, resolution per dataset."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return raw[:200]
    parts = []
    for d in data if isinstance(data, list) else [data]:
        if not isinstance(d, dict):
            continue
        bits = [f"{k}={d[k]}" for k in ("num_train_images", "num_repeats", "resolution", "batch_size_per_device")
                if k in d]
        parts.append(", ".join(bits) or "dataset")
    return "; ".join(parts) or None


def lora_version(metadata: dict) -> tuple[str | None, str | None]:
    """(model version the LoRA was trained for, the metadata key that says so); (None, None) when unknown."""
    arch = metadata.get("modelspec.architecture", "")
    if arch:
        for v in VARIANTS.values():
            if arch.removesuffix("/lora") == v.modelspec_arch:
                return v.name, "modelspec.architecture"
    base = metadata.get("ss_base_model_version")
    if base == "qwen_image":
        return "original", "ss_base_model_version"
    if base == "qwen_image_edit":
        return "edit", "ss_base_model_version"    # 2509 and 2511 share the name; modelspec tells them apart
    return None, None


def check_version(summary: dict, version: str, what: str) -> None:
    """Refuse a LoRA whose metadata records another model version than `version` (the --model_version of the
    run). Edit and Edit-2509/2511 LoRAs recorded only as qwen_image_edit match every edit version."""
    found = summary.get("version")
    if found is None or found == version:
        return
    if summary.get("version_source") == "ss_base_model_version" and found == "edit" and version.startswith("edit"):
        return
    raise ModelFileError(
        f"{what} {summary['path']}: its metadata ({summary['version_source']}) says it was trained for "
        f"{VARIANTS[found].title}, but --model_version is {version} ({VARIANTS[version].title}).",
        f"Pass --model_version {found} with the {VARIANTS[found].title} DiT, or use a LoRA trained for "
        f"{VARIANTS[version].title}.")


# ---------------------------------------------------------------------------------------------- display

def _num(v) -> str:
    if v is None:
        return "—"
    return f"{v:g}" if isinstance(v, float) else str(v)


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def summary_rows(s: dict) -> list[tuple[str, str]]:
    """(field, value) rows of one summary, in display order."""
    t = s["targets"]
    layers = ", ".join(f"{k} ×{n}" for k, n in t["layers"].items())
    version = (f"{VARIANTS[s['version']].title} (from {s['version_source']})" if s["version"]
               else "not recorded in the metadata")
    rank = _num(s["rank"]) if s["rank"] is not None or s["per_module"] is None else (
        "per module: " + ", ".join(f"{k} ({n} modules)" for k, n in s["ranks"].items()))
    alpha = _num(s["alpha"]) if s["per_module"] is None or s["alpha"] is not None else "per module"
    rows = [("file", Path(s["path"]).name), ("format", s["format"]), ("kind", s["kind"]),
            ("modules", str(s["modules"])), ("rank", rank), ("alpha", alpha),
            ("blocks", f"{t['num_blocks']} ({t['blocks']})" if t["num_blocks"] else "none"),
            ("layers", layers or "—")]
    if t["top_level"]:
        rows.append(("top-level layers", ", ".join(t["top_level"])))
    rows += [("trained for", version), ("dtype", str(s["dtype"])), ("size", size_text(s["size_bytes"])),
             ("parameters", f"{s['params']:,}")]
    rows += list(s["training"].items())
    if s["datasets"]:
        rows.append(("datasets", s["datasets"]))
    return rows


def summary_markdown(s: dict) -> str:
    """One LoRA's summary as a Markdown table (Tools tab, Generate tab's LoRA picker)."""
    lines = [f"**{Path(s['path']).name}**", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in summary_rows(s)]
    return "\n".join(lines)


def summary_text(s: dict) -> str:
    """The same rows as plain text (the terminal output of inspect_lora)."""
    width = max(len(k) for k, _ in summary_rows(s))
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in summary_rows(s))
