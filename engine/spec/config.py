"""Typed configuration: the single source of truth for every engine option.

Each option is a dataclass field whose metadata carries its help text, group and CLI shape. From these
fields we generate the argparse parser of each command, TOML load/save of a run, the README's CLI
reference and the GUI's form fields. Option names are musubi-tuner's, so a musubi command line works
with only the script name changed.

This module must stay importable without torch (the GUI imports it at start-up).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import tomli_w

from engine.spec.diskio import atomic_write_text  # noqa: F401  (re-exported: callers import it from here)
from engine.spec.options import (  # noqa: F401  (re-exported: engine.spec.config is the one import point)
    MODEL_VERSIONS, EDIT_VERSIONS, DEFAULT_NETWORK_ALPHA, DEFAULT_NETWORK_DIM, ConfigError, opt, CommonOptions,
    ModelVersionOptions, DitOption, VaeOption, TextEncoderOptions, DatasetOption, CachingOptions, Fp8VlOption,
    TrainAttentionOptions, TrainingOptions, NetworkOptions, FinetuneOptions, GenerationOptions, InspectModelConfig,
    MakeDemoConfig, CheckDatasetConfig, CacheLatentsConfig, CacheTextEncoderConfig, TrainNetworkConfig, TrainConfig,
    GenerateImageConfig, ESTIMATE_TARGETS, EstimateOptions, EstimateVramConfig, CaptionOptions, CaptionImagesConfig,
)
from engine.spec.options import (  # noqa: F401  (the LoRA tools' configs, re-exported the same way)
    LORA_FORMATS, InspectLoraConfig, ConvertLoraConfig, MergeLoraConfig, ExtractLoraConfig, ResizeLoraConfig,
)

# --------------------------------------------------------------------------------------------------
# Machinery: types, argparse, TOML
# --------------------------------------------------------------------------------------------------

def _base_type(tp) -> tuple[type, bool, bool]:
    """(scalar type, is_list, is_optional) for an annotation like Optional[int] or list[str]."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
        origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def option_fields(cls) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        f.type = hints[f.name]
        out.append(f)
    return out


def build_parser(cls, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in option_fields(cls):
        meta = f.metadata
        scalar, is_list, _ = _base_type(f.type)
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        help_text = meta["help"] + (f" ({range_text(f)})" if range_text(f) else "")
        kwargs: dict[str, Any] = dict(help=help_text or " ", default=argparse.SUPPRESS)
        if meta["metavar"]:
            kwargs["metavar"] = tuple(meta["metavar"].split()) if is_list else meta["metavar"]
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if scalar is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = scalar
            if is_list:
                fixed = len(meta["metavar"].split()) if meta["metavar"] else None
                kwargs["nargs"] = fixed or ("*" if not meta["positional"] else "+")
        if meta["positional"]:
            kwargs.pop("default")
            if not is_list and f.default is not dataclasses.MISSING:
                kwargs["nargs"] = "?"
                kwargs["default"] = f.default
            group.add_argument(f.name, **kwargs)
        else:
            names = [f"--{f.name}", *meta["aliases"]]
            group.add_argument(*names, dest=f.name, **kwargs)
    return parser


def parse_args(cls, argv: list[str], prog: str, description: str = ""):
    """CLI → config. A --config_file TOML is applied first; options given on the command line win."""
    parser = build_parser(cls, prog, description)
    ns = vars(parser.parse_args(argv))
    base: dict[str, Any] = {}
    if ns.get("config_file"):
        base = read_toml_values(cls, ns["config_file"])
    base.update(ns)
    return from_dict(cls, base, source="command line")


def from_dict(cls, values: dict[str, Any], source: str = "config"):
    known = {f.name: f for f in option_fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(unknown_key_message(key, known, source))
    cfg = cls(**{k: _coerce(known[k], v, source) for k, v in values.items()})
    return cfg


def unknown_key_message(key: str, known, source: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else " Remove it or check the option list with --help."
    return f"{source}: unknown option '{key}'.{hint}"


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    scalar, is_list, optional = _base_type(f.type)
    if value is None:
        if optional or f.metadata.get("positional"):
            return None
        raise ConfigError(f"{source}: option '{f.name}' cannot be empty; give a {scalar.__name__}.")
    if is_list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce_scalar(f.name, scalar, v, source) for v in items]
    return _coerce_scalar(f.name, scalar, value, source)


def _coerce_scalar(name: str, scalar: type, value: Any, source: str) -> Any:
    if scalar is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: option '{name}' must be true or false, got {value!r}.")
    if scalar is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if scalar is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if scalar is str and isinstance(value, str):
        return value
    if scalar in (int, float) and isinstance(value, str):
        try:
            return scalar(value)
        except ValueError:
            pass
    raise ConfigError(f"{source}: option '{name}' must be a {scalar.__name__}, got {value!r}.")


def validate(cfg) -> None:
    """The one check of a config against its option registry: every field's choices and declared range.
    Run wherever a config is made: the command line (engine/__main__.py), a GUI form, a preset, the estimator."""
    for f in option_fields(type(cfg)):
        check_value(f, getattr(cfg, f.name))


def check_value(f: dataclasses.Field, value: Any, where: str = "") -> None:
    """One option's value (each item of a list) against its choices, `min`, `max` and `multiple_of`.
    `where` names the source when it is not the option itself (e.g. "--from_file line 3")."""
    if value is None:
        return
    meta, prefix = f.metadata, f"{where}: " if where else ""
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{prefix}option '{f.name}': {value!r} is not one of {', '.join(map(str, meta['choices']))}.")
    items = value if isinstance(value, list) else [value]
    given = f"--{f.name} {' '.join(map(str, items))}"
    for v in items:
        if meta.get("plain_name") and not is_plain_name(v):
            raise ConfigError(f"{prefix}--{f.name} {v!r}: must be a plain file name (not empty, no folders, not "
                              "hidden).", "Give only the name, e.g. my_lora; the folder has its own option "
                              "(--output_dir).")
        if meta["min"] is not None and v < meta["min"]:
            raise ConfigError(f"{prefix}{given}: must be at least {meta['min']}", f"Give {range_text(f)}.")
        if meta["max"] is not None and v > meta["max"]:
            raise ConfigError(f"{prefix}{given}: must be at most {meta['max']}", f"Give {range_text(f)}.")
        if meta["multiple_of"] and v % meta["multiple_of"]:
            raise ConfigError(f"{prefix}{given}: {v} is not a multiple of {meta['multiple_of']}",
                              f"Give {range_text(f)}, e.g. {' '.join(str(_round_to(v, f)) for v in items)}.")


def is_plain_name(name: str) -> bool:
    """A name that stays inside the folder it is joined to and shows in it: no separators, no leading "." (which
    also refuses "." and ".."), no control character."""
    return (bool(name.strip()) and not name.startswith(".") and not any(c in name for c in "/\\")
            and all(c.isprintable() for c in name))


def range_text(f: dataclasses.Field) -> str:
    """The declared range in words ("a multiple of 16 from 16"), or "" when the option declares none."""
    meta = f.metadata
    parts = [f"a multiple of {meta['multiple_of']}"] if meta["multiple_of"] else []
    if meta["min"] is not None and meta["max"] is not None:
        parts.append(f"from {meta['min']} to {meta['max']}")
    elif meta["min"] is not None:
        parts.append(f"{meta['min']} or more" if not parts else f"from {meta['min']}")
    elif meta["max"] is not None:
        parts.append(f"{meta['max']} or less")
    return " ".join(parts)


def _round_to(v, f: dataclasses.Field):
    step = f.metadata["multiple_of"]
    return max(f.metadata["min"] or step, int(v + step // 2) // step * step)     # the nearest multiple, halves up


def to_dict(cfg, only_changed: bool = True) -> dict[str, Any]:
    """The run as a plain dict (TOML-ready: None values are left out)."""
    out = {}
    for f in option_fields(type(cfg)):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value is None or (only_changed and value == default) or f.name == "config_file":
            continue
        out[f.name] = value
    return out


def to_argv(cfg, only_changed: bool = True) -> list[str]:
    """The exact argument list that reproduces this config on the command line.

    No value can become a separate option on the way (the app builds jobs from forms and PNG parameters): a
    scalar that starts with '-' is written `--name=value`; a list item or positional that starts with '-' (other
    than a negative number) cannot be written safely at all, so it is refused with a ConfigError."""
    argv: list[str] = []
    values = to_dict(cfg, only_changed)
    for f in option_fields(type(cfg)):
        if f.name not in values:
            continue
        value = values[f.name]
        if f.metadata["positional"]:
            argv.extend(_free_item(f.name, v) for v in (value if isinstance(value, list) else [value]))
        elif value is True:
            argv.append(f"--{f.name}")
        elif value is False:
            continue
        elif isinstance(value, list):
            if value:
                argv.append(f"--{f.name}")
                argv.extend(_free_item(f.name, v) for v in value)
        elif str(value) == "--":        # argparse drops a bare "--" even from `--name=--`
            raise ConfigError(f"{f.name}: the value '--' cannot be passed on a command line.", "Change the value.")
        elif str(value).startswith("-"):
            argv.append(f"--{f.name}={value}")
        else:
            argv.extend([f"--{f.name}", str(value)])
    return argv


def _free_item(name: str, value: Any) -> str:
    """A list item or positional value as an argument, refused when argparse would read it as an option."""
    text = str(value)
    if text.startswith("-") and not _is_number(text):
        raise ConfigError(f"{name}: the value {text!r} starts with '-', so the command line would read it as an "
                          "option of its own.", f"Remove the leading '-' (write a path as ./{text}).")
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# Options the app sets itself (where events go, which TOML a run reads): never taken from a form, a PNG or a job
# record, so nothing a person types in the browser can make the engine append to or read an arbitrary file.
PLUMBING_OPTIONS = ("events_file", "config_file")


def check_no_plumbing(cfg, source: str = "this job") -> None:
    for name in PLUMBING_OPTIONS:
        if getattr(cfg, name, None):
            raise ConfigError(f"{source}: --{name} is set by the app itself and cannot come from a form, a PNG or a "
                              "job record.", f"Remove {name}; use the command line for it.")


def read_toml_values(cls, path: str | os.PathLike) -> dict[str, Any]:
    """Read a run TOML. musubi-style sections are flattened; unknown keys are an error with a suggestion."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found. Check the path given to --config_file.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}). Fix the line it names.") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = {f.name for f in option_fields(cls)}
    for key in flat:
        if key not in known:
            raise ConfigError(unknown_key_message(key, known, str(path)))
    return flat


def load_toml(cls, path: str | os.PathLike):
    return from_dict(cls, read_toml_values(cls, path), source=str(path))


def save_toml(cfg, path: str | os.PathLike, only_changed: bool = False) -> None:
    """Write the run TOML atomically, grouped by option group."""
    atomic_write_text(path, toml_text(cfg, only_changed))


def toml_text(cfg, only_changed: bool = False) -> str:
    """The run TOML that save_toml writes, as text (the GUI shows it before launching)."""
    grouped: dict[str, dict[str, Any]] = {}
    values = to_dict(cfg, only_changed)
    for f in option_fields(type(cfg)):
        if f.name in values:
            grouped.setdefault(f.metadata["group"].lower().replace(" ", "_"), {})[f.name] = values[f.name]
    return tomli_w.dumps(grouped)


# --------------------------------------------------------------------------------------------------
# Option values that are lists of key=value (musubi's --optimizer_args, --network_args)
# --------------------------------------------------------------------------------------------------

def parse_key_values(items, option: str, example: str) -> dict:
    """musubi's `--optimizer_args` / `--network_args` lists: `["k=v", ...]` → {k: v}, each value through
    ast.literal_eval (lists, numbers, bools) and kept as a string when it is not a Python literal."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--{option} {item!r} is not key=value.", f"Write e.g. {example}.")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_optimizer_args(items) -> dict:
    return parse_key_values(items, "optimizer_args", "weight_decay=0.01")


def parse_network_args(items) -> dict:
    """`["rank_dropout=0.1", "exclude_patterns=['.*mod.*']"]` → {..}; values via ast.literal_eval, else strings."""
    return parse_key_values(items, "network_args", "rank_dropout=0.1")
