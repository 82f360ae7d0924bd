"""Caches made by musubi-tuner: used after checks instead of refused, so people switching keep their caches.

musubi writes the same file names and tensor keys as we do (engine/spec/dataset/cache_files.py) but its metadata
holds only `architecture` ("qwen_image" for every Qwen variant), `format_version`, and `width`/`height`
(latents) or `caption1` (text encoder outputs); no fingerprints, no model version, no encoder identity. Such a
file is accepted when everything that can be checked from its header agrees with the current dataset:

latents   architecture and format_version; width/height = the image's size (also in the file name);
          exactly one `latents_1x{h}x{w}_{dtype}` of shape (16, 1, h, w) with (h, w) = the item's bucket / 8; for
          edit versions one `latents_control_{i}_...` per control image, each at its cached control size / 8.
text      architecture and format_version; one 2-D `varlen_vl_embed_{dtype}`, whose width is the text encoder's
          hidden size when the text encoder is known; `caption1` = the item's caption.

Staleness is judged by file times, as musubi's workflow does (it never re-reads sources): the cache is stale when
the image, a control image or the caption file was modified after the cache file was written. The model version
is only partly checked: the file name's `qi`/`qie` separates text-to-image from edit, but musubi records nothing
that separates Edit, Edit-2509 and Edit-2511, so their text caches are taken as made for the version in use (the
Cache tab says so on every such entry).

Importable without torch.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.spec.dataset.plan import PlannedItem
from engine.spec.safetensors_header import Header, expand_shards, read_header

ORIGIN_OURS = "qis"
ORIGIN_MUSUBI = "musubi-tuner"
ARCHITECTURE = "qwen_image"
LATENT_CHANNELS = 16
_LATENT_KEY = re.compile(r"^(latents|latents_control_(\d+))_(\d+)x(\d+)x(\d+)_([a-z0-9]+)$")
_TEXT_KEY = re.compile(r"^varlen_vl_embed_([a-z0-9]+)$")


def is_foreign(meta: dict) -> bool:
    """A Qwen-Image cache written by musubi-tuner: its metadata, and none of ours (`qis_*`)."""
    return meta.get("architecture") == ARCHITECTURE and not any(k.startswith("qis_") for k in meta)


def note(kind: str, edit: bool) -> str:
    """What the Cache tab shows beside an accepted musubi entry."""
    text = "made by musubi-tuner: checked by shapes, keys and file times"
    if kind == "text" and edit:
        text += " (its edit model version is not recorded; taken as the one in use)"
    return text


def stale_reason(item: PlannedItem, path: Path, kind: str, edit: bool, text_width: int | None = None) -> str:
    """Why a musubi cache file cannot be used for `item` ("" when it can)."""
    header = read_header(path)
    meta = header.metadata
    if not str(meta.get("format_version", "")).startswith("1."):
        return f"made by musubi-tuner with format_version {meta.get('format_version')!r}, which this version " \
               "does not know"
    check = _latent_problem if kind == "latents" else _text_problem
    problem = check(item, header, edit, text_width)
    if problem:
        return "made by musubi-tuner, but " + problem
    newer = _newer_sources(item, path, kind, edit)
    if newer:
        return f"made by musubi-tuner before {newer} was modified (judged by file times)"
    return ""


def _latent_problem(item: PlannedItem, header: Header, edit: bool, _width) -> str:
    meta = header.metadata
    size = (_int(meta.get("width")), _int(meta.get("height")))
    if size != tuple(item.size):
        return f"it records the image size {size[0]}x{size[1]}, the image is {item.size[0]}x{item.size[1]}"
    found: dict[str, tuple] = {}
    for name, info in header.tensors.items():
        m = _LATENT_KEY.match(name)
        if not m:
            return f"it holds the unexpected tensor {name}"
        if m.group(1) in found:
            return f"it holds {m.group(1)} twice (dtypes {found[m.group(1)][1]} and {m.group(6)})"
        found[m.group(1)] = (tuple(info.shape), m.group(6), tuple(int(m.group(i)) for i in (3, 4, 5)))
    wanted = {"latents": item.bucket}
    if edit:
        wanted.update({f"latents_control_{i}": b for i, b in enumerate(item.control_buckets)})
    if set(found) != set(wanted):
        return f"its latents are {sorted(found)}, the dataset needs {sorted(wanted)}"
    for name, (w, h) in wanted.items():
        shape, _, named = found[name]
        want = (LATENT_CHANNELS, 1, h // 8, w // 8)
        if shape != want or named != want[1:]:
            return f"{name} has shape {list(shape)}, the dataset's size {w}x{h} needs {list(want)}"
    return ""


def _text_problem(item: PlannedItem, header: Header, _edit, width: int | None) -> str:
    names = list(header.tensors)
    if len(names) != 1 or not _TEXT_KEY.match(names[0]):
        return f"its tensors are {names}, a text cache holds one varlen_vl_embed_<dtype>"
    shape = header.tensors[names[0]].shape
    if len(shape) != 2 or shape[0] < 1:
        return f"{names[0]} has shape {list(shape)}, not (tokens, width)"
    if width is not None and shape[1] != width:
        return f"its embeddings are {shape[1]} wide, the text encoder's are {width}"
    if "caption1" in header.metadata and header.metadata["caption1"] != (item.item.caption or ""):
        return "its caption differs from the dataset's"
    return ""


def _newer_sources(item: PlannedItem, path: Path, kind: str, edit: bool) -> str:
    """The first source file modified after the cache was written, by name ("" when none)."""
    written = path.stat().st_mtime_ns
    sources = [item.item.image_path] if kind == "latents" else [item.item.caption_path]
    if kind == "latents" or edit:
        sources += list(item.item.control_paths)
    for src in sources:
        if src is not None and Path(src).is_file() and Path(src).stat().st_mtime_ns > written:
            return Path(src).name
    return ""


def text_encoder_width(text_encoder: str | None) -> int | None:
    """The hidden size of a text encoder file or folder, read from its token embedding's header (None when
    not given or not found)."""
    if not text_encoder:
        return None
    for f in expand_shards(text_encoder):
        for name, info in read_header(f).tensors.items():
            if name.endswith("embed_tokens.weight") and len(info.shape) == 2 and "visual" not in name:
                return int(info.shape[1])
    return None


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
