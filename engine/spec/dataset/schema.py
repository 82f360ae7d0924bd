"""Dataset config: musubi-tuner's TOML schema (`[general]` + `[[datasets]]`), read and checked.

A user's existing musubi dataset config works unchanged. Precedence per key: dataset section > `[general]` >
defaults. Old key names (`qwen_image_edit_no_resize_control`, `qwen_image_edit_control_resolution`,
`flux_kontext_no_resize_control`) are renamed with a warning. Unknown keys are an error naming the line and the
closest known key. Relative paths are resolved against the current folder, as musubi does.

Our additions: `allow_missing_captions` (general or per dataset, default false). musubi silently skips images
that have no caption file; we report them as a problem unless this key is true, in which case they are skipped
with a warning (listing them) exactly as musubi would. `caption_dropout_rate` (general or per dataset, 0-1,
SimpleTuner's name): the probability that a training step sees an item with the empty caption
(engine/spec/dataset/dropout.py). `mask_directory` (per dataset): loss masks named like the images, white = train
here (engine/spec/dataset/masks.py).

Importable without torch.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.spec.errors import DatasetError

log = logging.getLogger(__name__)

DEFAULT_RESOLUTION = (960, 544)   # musubi's BaseDatasetParams default (W, H)
DEFAULT_CAPTION_EXTENSION = ".txt"

# Keys allowed in [general] and in [[datasets]] ("ascendable" in musubi), with their types.
SHARED_KEYS: dict[str, tuple] = {
    "caption_extension": (str,), "batch_size": (int,), "num_repeats": (int,), "resolution": (int, list),
    "enable_bucket": (bool,), "bucket_no_upscale": (bool,), "allow_missing_captions": (bool,),
    "caption_dropout_rate": (float, int),
}
DATASET_KEYS: dict[str, tuple] = {
    "image_directory": (str,), "image_jsonl_file": (str,), "cache_directory": (str,), "control_directory": (str,),
    "control_resolution": (int, list), "no_resize_control": (bool,), "multiple_target": (bool,),
    "mask_directory": (str,),
}
# FramePack-only keys: musubi accepts them in any image dataset; they mean nothing for Qwen-Image.
IGNORED_KEYS = ("fp_latent_window_size", "fp_1f_clean_indices", "fp_1f_target_index", "fp_1f_no_post")
VIDEO_KEYS = ("video_directory", "video_jsonl_file", "target_frames", "frame_extraction", "frame_stride",
              "frame_sample", "max_frames", "source_fps")
DEPRECATED_KEYS = {
    "qwen_image_edit_no_resize_control": "no_resize_control",
    "qwen_image_edit_control_resolution": "control_resolution",
    "flux_kontext_no_resize_control": "no_resize_control",
}


@dataclass
class DatasetSpec:
    """One `[[datasets]]` entry with general/default values filled in. Sizes are (W, H)."""
    index: int                                  # 0-based position in the file
    image_directory: Path | None
    image_jsonl_file: Path | None
    cache_directory: Path
    control_directory: Path | None
    caption_extension: str
    resolution: tuple[int, int]
    batch_size: int
    num_repeats: int
    enable_bucket: bool
    bucket_no_upscale: bool
    control_resolution: tuple[int, int] | None
    no_resize_control: bool
    allow_missing_captions: bool
    caption_dropout_rate: float = 0.0           # probability that a step trains an item with the empty caption
    mask_directory: Path | None = None          # per-image loss masks (white = train here)
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        src = self.image_directory or self.image_jsonl_file
        return f"datasets[{self.index}] ({src})"

    def settings(self) -> dict[str, Any]:
        """The values that change what a cache file holds (recorded in its metadata)."""
        return {"resolution": list(self.resolution), "enable_bucket": self.enable_bucket,
                "bucket_no_upscale": self.bucket_no_upscale,
                "control_resolution": list(self.control_resolution) if self.control_resolution else None,
                "no_resize_control": self.no_resize_control}


@dataclass
class DatasetConfig:
    path: Path
    datasets: list[DatasetSpec]
    warnings: list[str] = field(default_factory=list)


def load_dataset_config(path: str | Path) -> DatasetConfig:
    """Read and check the TOML (or JSON) file; raise DatasetError naming the line/key and the fix."""
    path = Path(path)
    text = _read_text(path)
    data = _parse(path, text)
    where = _KeyLocator(path, text)
    warnings: list[str] = []
    for key in data:
        if key not in ("general", "datasets"):
            raise DatasetError(f"{where(key)}: unknown top-level key '{key}'.",
                               "A dataset config has only a [general] table and [[datasets]] entries.")
    general = _section(data.get("general", {}), "[general]", where.section("[general]"), warnings,
                       allowed=SHARED_KEYS)
    entries = data.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: no [[datasets]] entry.",
                           "Add a [[datasets]] table with image_directory (or image_jsonl_file).")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: datasets[{i}] is not a table.", "Write it as a [[datasets]] table.")
        local = where.section("[[datasets]]", i)
        section = _section(entry, f"datasets[{i}]", local, warnings, allowed={**SHARED_KEYS, **DATASET_KEYS})
        specs.append(_make_spec(i, {**general, **section}, path, local))
    _check_unique_cache_dirs(specs, path)
    return DatasetConfig(path=path, datasets=specs, warnings=warnings)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")      # a BOM (Windows editors) is not part of the TOML
    except FileNotFoundError:
        raise DatasetError(f"{path}: dataset config not found.", "Check the path given to --dataset_config.") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the dataset config ({e}).", "Save it as UTF-8 text.") from None


def _parse(path: Path, text: str) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}).", "Fix that line.") from None
    if suffix != ".toml":
        raise DatasetError(f"{path}: unsupported dataset config format '{suffix}'.",
                           "Use a .toml file (musubi-tuner's dataset config schema) or .json.")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already says "(at line N, column M)".
        raise DatasetError(f"{path}: not valid TOML: {e}.", "Fix the line it names (quotes around paths, "
                           "'=' between key and value, [[datasets]] with two brackets).") from None


class _KeyLocator:
    """Finds the line a key is written on (within one section when narrowed), so messages say `file:line`."""

    def __init__(self, path: Path, text: str, start: int = 0, end: int | None = None):
        self.path, self.text, self.lines = path, text, text.splitlines()
        self.start, self.end = start, len(self.lines) if end is None else end

    def __call__(self, key: str) -> str:
        pattern = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        for n in range(self.start, self.end):
            line = self.lines[n]
            if pattern.match(line) or line.strip() in (f"[{key}]", f"[[{key}]]"):
                return f"{self.path}:{n + 1}"
        return str(self.path)

    def section(self, header: str, occurrence: int = 0) -> "_KeyLocator":
        """The lines of the `occurrence`-th `header` table (e.g. "[[datasets]]", 2)."""
        starts = [n for n, line in enumerate(self.lines) if line.strip().replace(" ", "") == header]
        if occurrence >= len(starts):
            return self
        first = starts[occurrence]
        nxt = next((n for n in range(first + 1, len(self.lines)) if self.lines[n].lstrip().startswith("[")
                    and self.lines[n].strip().endswith("]") and "=" not in self.lines[n]), len(self.lines))
        return _KeyLocator(self.path, self.text, first, nxt)


def _section(values: dict, name: str, where: _KeyLocator, warnings: list[str], allowed: dict) -> dict:
    if not isinstance(values, dict):
        raise DatasetError(f"{where(name)}: {name} must be a table.", f"Write it as [{name}].")
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in DEPRECATED_KEYS:
            new = DEPRECATED_KEYS[key]
            if new in values:
                _warn(warnings, f"{where(key)}: deprecated key '{key}' in {name} is ignored because '{new}' "
                                f"is already set.")
                continue
            _warn(warnings, f"{where(key)}: deprecated key '{key}' in {name}; use '{new}' instead.")
            key = new
        elif key in IGNORED_KEYS:
            _warn(warnings, f"{where(key)}: '{key}' (FramePack only) has no effect for Qwen-Image; ignored.")
            continue
        elif key in VIDEO_KEYS:
            raise DatasetError(f"{where(key)}: '{key}' belongs to a video dataset; Qwen-Image trains on images.",
                               "Use image_directory or image_jsonl_file.")
        elif key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
            place = "" if name.startswith("datasets") or key not in DATASET_KEYS else " (it belongs in [[datasets]])"
            hint = f"Did you mean '{close[0]}'?" if close and not place else f"Remove it{place}."
            raise DatasetError(f"{where(key)}: unknown key '{key}' in {name}.", hint)
        out[key] = _check_type(key, value, allowed.get(key, SHARED_KEYS.get(key, DATASET_KEYS.get(key))),
                               where)
    return out


def _warn(warnings: list[str], message: str) -> None:
    warnings.append(message)
    log.warning(message)


def _check_type(key: str, value: Any, types: tuple, where: _KeyLocator) -> Any:
    ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in types)
    if not ok:
        names = " or ".join("[width, height]" if t is list else t.__name__ for t in types)
        raise DatasetError(f"{where(key)}: '{key}' must be {names}, got {value!r}.", f"Write e.g. "
                           f"{_example(key)}.")
    if types == (int, list):
        return _size(key, value, where)
    if key == "caption_dropout_rate" and not 0 <= value <= 1:
        raise DatasetError(f"{where(key)}: 'caption_dropout_rate' is a probability from 0 to 1, got {value}.",
                           "Write e.g. caption_dropout_rate = 0.1 (one step in ten trains without the caption).")
    if key == "caption_extension":
        _check_caption_extension(value, where)
    if key in ("batch_size", "num_repeats") and value < 1:
        raise DatasetError(f"{where(key)}: '{key}' must be at least 1, got {value}.", f"Write {key} = 1.")
    return value


def _check_caption_extension(value: str, where: _KeyLocator) -> None:
    """The caption of `a.png` is `a` + caption_extension beside it. A separator or `..` would make it a path
    that reaches into other folders (`/../../etc/passwd`), so only a plain file-name ending is accepted."""
    if not value or any(c in value for c in "/\\\0:") or ".." in value or len(value) > 64:
        raise DatasetError(f"{where('caption_extension')}: caption_extension {value!r} must be a plain file-name "
                           "ending (no folder separators, '..' or ':'), like \".txt\".",
                           "Write caption_extension = \".txt\" and keep each caption beside its image.")


def _size(key: str, value: Any, where: _KeyLocator) -> tuple[int, int]:
    """musubi: an int means a square; a list is [width, height]."""
    if isinstance(value, int):
        value = [value, value]
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in value):
        raise DatasetError(f"{where(key)}: '{key}' must be one size or [width, height] of at least 16 px, "
                           f"got {value!r}.", f"Write e.g. {_example(key)}.")
    return int(value[0]), int(value[1])


def _example(key: str) -> str:
    return {"resolution": "resolution = [1024, 1024]", "control_resolution": "control_resolution = [1024, 1024]",
            "caption_extension": 'caption_extension = ".txt"'}.get(key, f"{key} = ...")


def _make_spec(index: int, v: dict, config_path: Path, where: _KeyLocator) -> DatasetSpec:
    label = f"datasets[{index}]"
    image_dir, jsonl = v.get("image_directory"), v.get("image_jsonl_file")
    if bool(image_dir) == bool(jsonl):
        raise DatasetError(f"{config_path}: {label} needs exactly one of image_directory or image_jsonl_file.",
                           "Give the folder of target images and captions (image_directory), or a JSONL file.")
    if v.get("multiple_target"):
        raise DatasetError(f"{where('multiple_target')}: multiple_target is for Qwen-Image-Layered, which this "
                           "engine does not train.", "Remove multiple_target.")
    if jsonl and not v.get("cache_directory"):
        raise DatasetError(f"{config_path}: {label} uses image_jsonl_file but has no cache_directory.",
                           "Add cache_directory = \"path/to/cache\" (musubi requires it for JSONL datasets).")
    cache_dir = v.get("cache_directory") or image_dir
    enable_bucket = v.get("enable_bucket", False)
    return DatasetSpec(
        index=index,
        image_directory=Path(image_dir) if image_dir else None,
        image_jsonl_file=Path(jsonl) if jsonl else None,
        cache_directory=Path(cache_dir),
        control_directory=Path(v["control_directory"]) if v.get("control_directory") else None,
        caption_extension=v.get("caption_extension") or DEFAULT_CAPTION_EXTENSION,
        resolution=v.get("resolution", DEFAULT_RESOLUTION),
        batch_size=v.get("batch_size", 1),
        num_repeats=v.get("num_repeats", 1),
        enable_bucket=enable_bucket,
        bucket_no_upscale=enable_bucket and v.get("bucket_no_upscale", False),  # musubi: forced off w/o buckets
        control_resolution=v.get("control_resolution"),
        no_resize_control=v.get("no_resize_control", False),
        allow_missing_captions=v.get("allow_missing_captions", False),
        caption_dropout_rate=float(v.get("caption_dropout_rate", 0.0)),
        mask_directory=Path(v["mask_directory"]) if v.get("mask_directory") else None,
    )


def _check_unique_cache_dirs(specs: list[DatasetSpec], config_path: Path) -> None:
    seen: dict[Path, DatasetSpec] = {}
    for spec in specs:
        key = spec.cache_directory.resolve()
        if key in seen:
            raise DatasetError(
                f"{config_path}: datasets[{seen[key].index}] and datasets[{spec.index}] share the cache folder "
                f"{spec.cache_directory} (the image folder is the cache folder when cache_directory is not set).",
                "Give each [[datasets]] entry its own cache_directory.")
        seen[key] = spec
