"""VRAM presets: `presets/*.toml` files holding only the options they change, plus a `[preset]` header.

    fp8_base = true                      # option fields, validated against the command's config class
    blocks_to_swap = 45
    [preset]
    name = "LoRA, 12 GB"
    kind = "train_network"               # train_network | train | generate_image
    vram_budget_gib = 12
    resolution = [1024, 1024]            # width, height the estimate was made at
    ram_gib = 23                         # RAM the estimator says the run needs (rounded up)
    description = "..."

A preset, a saved run TOML and a command line are views of one config: `apply_preset` returns the config
with the preset's fields set, `preset_argv` the matching command-line options. No torch import.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.spec import config as C
from engine.spec.errors import OptionError
from engine.spec.vram import estimate_config

PRESET_DIR = Path(__file__).resolve().parents[2] / "presets"
KIND_CONFIG = {"train_network": C.TrainNetworkConfig, "train": C.TrainConfig,
               "generate_image": C.GenerateImageConfig}
HEADER_KEYS = {"name": str, "kind": str, "vram_budget_gib": (int, float), "resolution": list, "ram_gib": (int, float),
               "description": str}


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str
    vram_budget_gib: float
    resolution: tuple[int, int]  # width, height
    ram_gib: float
    description: str
    fields: dict[str, Any]
    path: Path

    @property
    def config_class(self) -> type:
        return KIND_CONFIG[self.kind]


def load_preset(path: str | Path) -> Preset:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionError(f"{path}: preset file not found.", "Check the path or pick one from presets/.") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"{path}: not valid TOML ({e}).", "Fix the line the message names.") from None
    header = data.pop("preset", None)
    if not isinstance(header, dict):
        raise OptionError(f"{path}: no [preset] table.", "Add a [preset] table with " + ", ".join(HEADER_KEYS) + ".")
    _check_header(path, header)
    fields = _check_fields(path, header["kind"], data)
    return Preset(name=header["name"], kind=header["kind"], vram_budget_gib=float(header["vram_budget_gib"]),
                  resolution=tuple(header["resolution"]), ram_gib=float(header["ram_gib"]),
                  description=header["description"], fields=fields, path=path)


def _check_header(path: Path, header: dict) -> None:
    for key, kind in HEADER_KEYS.items():
        if key not in header:
            raise OptionError(f"{path}: [preset] lacks '{key}'.", f"Add {key} to the [preset] table.")
        if not isinstance(header[key], kind) or isinstance(header[key], bool):
            raise OptionError(f"{path}: [preset] {key} = {header[key]!r} has the wrong type.",
                              f"Give {key} as {getattr(kind, '__name__', 'a number')}.")
    extra = set(header) - set(HEADER_KEYS)
    if extra:
        raise OptionError(f"{path}: unknown [preset] key(s) {', '.join(sorted(extra))}.",
                          "Allowed: " + ", ".join(HEADER_KEYS) + "; option fields go above the table.")
    if header["kind"] not in KIND_CONFIG:
        raise OptionError(f"{path}: kind {header['kind']!r} is not one of {', '.join(KIND_CONFIG)}.",
                          "Set kind to the command the preset is for.")
    res = header["resolution"]
    if len(res) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in res):
        raise OptionError(f"{path}: resolution {res!r} must be [width, height], multiples of 16.",
                          "For example resolution = [1024, 1024].")
    try:       # the range of estimate_vram's --resolution, declared once in the option registry
        C.check_value(next(f for f in C.option_fields(C.EstimateVramConfig) if f.name == "resolution"), list(res),
                      f"{path}: [preset]")
    except C.ConfigError as e:
        raise OptionError(e.message, e.hint) from None


def _check_fields(path: Path, kind: str, fields: dict) -> dict:
    """Every field must be an option of the preset's command, with a valid value."""
    cls = KIND_CONFIG[kind]
    try:
        cfg = C.from_dict(cls, dict(fields), source=str(path))
        C.validate(cfg)
    except C.ConfigError as e:
        raise OptionError(str(e), f"Use option names of `python -m engine {kind} --help`.") from None
    return {name: getattr(cfg, name) for name in fields}


def list_presets(kind: str | None = None, folder: str | Path = PRESET_DIR) -> list[Preset]:
    """All presets in the folder (optionally of one kind), smallest budget first."""
    presets = [load_preset(p) for p in sorted(Path(folder).glob("*.toml"))]
    presets = [p for p in presets if kind is None or p.kind == kind]
    return sorted(presets, key=lambda p: (p.kind, p.vram_budget_gib, p.name))


def apply_preset(preset: Preset, cfg=None):
    """The config with the preset's fields set (a fresh default config when none is given)."""
    cfg = cfg if cfg is not None else preset.config_class()
    known = {f.name for f in dataclasses.fields(cfg)}
    missing = set(preset.fields) - known
    if missing:
        raise OptionError(f"{preset.path}: {', '.join(sorted(missing))} are not options of {type(cfg).__name__}.",
                          f"Apply a {preset.kind} preset to a {preset.kind} config.")
    return dataclasses.replace(cfg, **preset.fields)


def preset_argv(preset: Preset) -> list[str]:
    """The command-line options the preset stands for."""
    return C.to_argv(apply_preset(preset))


def estimate_preset(preset: Preset, base=None) -> dict:
    """The estimate of the preset's options (on top of `base`, a config of its kind) at its stated resolution."""
    w, h = preset.resolution
    size = {"image_size": [h, w]} if preset.kind == "generate_image" else {"resolution": [w, h]}
    return estimate_config(apply_preset(preset, base), preset.kind, source=str(preset.path), **size)


def ram_header_value(estimate: dict) -> int:
    """What a preset's `ram_gib` should say for an estimate: the RAM rounded up to whole GiB."""
    return math.ceil(estimate["ram_gib"])
