"""Gradio inputs generated from engine/spec/config.py fields, bound by NAME (never by position).

    form = build_form(TrainNetworkConfig, include=[...], elem_prefix="train")   # inside a gr.Blocks
    button.click(fn, inputs=form.inputs, ...)                                   # fn(*values)
    cfg = form.to_config(*values)            # -> the typed config, validated like the CLI validates it
    argv = engine.spec.config.to_argv(cfg)        # the exact arguments the job runs with

Widget kinds follow the field type: Checkbox for bool, Dropdown for choices, Number for int/float, Textbox for
str/path and lists (path and text lists one item per line; number lists separated by spaces or commas).
An optional number (default None: "not set") is a Textbox too: gr.Number cannot be empty (the browser shows and
sends 0 for None), and 0 is a real value for e.g. --flow_shift or --rcm_threshold.
Fields are grouped by their metadata group; `advanced` ones sit in a closed Accordion inside their group.
The conversion functions are plain Python, so round trips are tested without a browser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import gradio as gr

from engine.spec.config import ConfigError, _base_type, from_dict, option_fields, to_dict, validate

DEFAULT_CHOICE = "(default)"


def gui_fields(cls, include: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list:
    """The fields a form shows: `gui=True` ones, optionally only `include` (in the config's order)."""
    chosen = set(include) if include is not None else None
    known = {f.name for f in option_fields(cls)}
    for name in (chosen or set()) | set(exclude):
        if name not in known:
            raise ConfigError(f"form for {cls.__name__}: no option named '{name}'.")
    return [f for f in option_fields(cls)
            if f.metadata["gui"] and (chosen is None or f.name in chosen) and f.name not in set(exclude)]


def label_for(name: str) -> str:
    return name.replace("_", " ").capitalize()


def widget_kind(f) -> str:
    scalar, is_list, _ = _base_type(f.type)
    if is_list:
        return "list"
    if f.metadata["choices"]:
        return "choice"
    if scalar is bool:
        return "bool"
    if scalar in (int, float):
        return "number"
    return "text"


def to_widget(f, value: Any) -> Any:
    """A config value as its widget shows it."""
    kind = widget_kind(f)
    if kind == "list":
        scalar = _base_type(f.type)[0]
        sep = " " if scalar in (int, float) else "\n"
        return sep.join(str(v) for v in value or [])
    if kind == "choice":
        return "" if value is None else value
    if kind == "text":
        return value or ""
    return value


def from_widget(f, value: Any) -> Any:
    """A widget value as the config takes it (type checks happen in engine.spec.config.from_dict)."""
    kind = widget_kind(f)
    if kind == "list":
        scalar = _base_type(f.type)[0]
        text = value or ""
        if scalar in (int, float):
            return text.replace(",", " ").split()
        return [line.strip() for line in text.splitlines() if line.strip()]
    if kind in ("choice", "text"):
        return value if value not in (None, "") else _empty(f)
    if kind == "number" and isinstance(value, float) and value.is_integer() and _base_type(f.type)[0] is int:
        return int(value)     # gr.Number may hand back 7.0 for 7
    if kind == "number" and (value is None or (isinstance(value, str) and not value.strip())):
        return _empty(f)
    if kind == "number" and isinstance(value, str):
        return value.strip()          # an optional number's text box; engine.spec.config.from_dict checks the type
    return value


def _empty(f) -> Any:
    """An empty box means "not set": None for optional fields, the default for the others."""
    if _base_type(f.type)[2]:
        return None
    return f.default


def config_to_values(cfg, names: Iterable[str] | None = None) -> dict[str, Any]:
    fields_by_name = {f.name: f for f in option_fields(type(cfg))}
    names = list(names) if names is not None else [f.name for f in gui_fields(type(cfg))]
    return {n: to_widget(fields_by_name[n], getattr(cfg, n)) for n in names}


def values_to_config(cls, values: dict[str, Any], base=None):
    """Widget values (by option name) → a validated config. Fields not in `values` come from `base`
    (or the defaults)."""
    fields_by_name = {f.name: f for f in option_fields(cls)}
    merged = to_dict(base, only_changed=False) if base is not None else {}
    for name, value in values.items():
        if name not in fields_by_name:
            raise ConfigError(f"form for {cls.__name__}: no option named '{name}'.")
        merged[name] = from_widget(fields_by_name[name], value)
    cfg = from_dict(cls, merged, source="form")
    validate(cfg)
    return cfg


@dataclass
class Form:
    cls: type
    components: dict[str, Any]      # option name -> component, in the config's field order

    @property
    def names(self) -> list[str]:
        return list(self.components)

    @property
    def inputs(self) -> list:
        return list(self.components.values())

    def to_config(self, *values, base=None):
        return values_to_config(self.cls, dict(zip(self.components, values)), base=base)

    def values(self, cfg) -> list:
        return list(config_to_values(cfg, self.names).values())


def build_form(cls, include: Iterable[str] | None = None, exclude: Iterable[str] = (), values=None,
               elem_prefix: str = "", columns: int = 3) -> Form:
    """Create the widgets for `cls`'s fields (call inside a gr.Blocks). `values`: a config to pre-fill."""
    cfg = values if values is not None else _defaults(cls)
    components: dict[str, Any] = {}
    for group, fs in _by_group(gui_fields(cls, include, exclude)).items():
        with gr.Accordion(group, open=True, elem_id=f"{elem_prefix}-group-{group.lower()}" if elem_prefix else None):
            _rows([f for f in fs if not f.metadata["advanced"]], cfg, components, elem_prefix, columns)
            advanced = [f for f in fs if f.metadata["advanced"]]
            if advanced:
                with gr.Accordion(f"{group}: advanced", open=False):
                    _rows(advanced, cfg, components, elem_prefix, columns)
    order = [f.name for f in option_fields(cls) if f.name in components]
    return Form(cls, {n: components[n] for n in order})


def make_widget(f, value: Any, elem_prefix: str = ""):
    common = dict(label=label_for(f.name), info=f"{f.metadata['help']} (--{f.name})".strip(),
                  elem_id=f"{elem_prefix}-{f.name}" if elem_prefix else None)
    kind, widget_value = widget_kind(f), to_widget(f, value)
    if kind == "bool":
        return gr.Checkbox(value=bool(widget_value), **common)
    if kind == "choice":
        choices = [(c, c) for c in f.metadata["choices"]]
        if _base_type(f.type)[2]:
            choices.insert(0, (DEFAULT_CHOICE, ""))
        return gr.Dropdown(choices=choices, value=widget_value, **common)
    if kind == "number" and _base_type(f.type)[2]:
        return gr.Textbox(value="" if widget_value is None else str(widget_value), placeholder="(not set)", **common)
    if kind == "number":
        precision = 0 if _base_type(f.type)[0] is int else None
        return gr.Number(value=widget_value, precision=precision, **common)
    multiline = kind == "list" and _base_type(f.type)[0] is str
    placeholder = "one per line" if multiline else (f.metadata["metavar"] or ("path" if f.metadata["path"] else None))
    return gr.Textbox(value=widget_value, lines=2 if multiline else 1, placeholder=placeholder, **common)


def _rows(fs: list, cfg, components: dict, elem_prefix: str, columns: int) -> None:
    for i in range(0, len(fs), columns):
        with gr.Row():
            for f in fs[i:i + columns]:
                components[f.name] = make_widget(f, getattr(cfg, f.name), elem_prefix)


def _by_group(fs: list) -> dict[str, list]:
    groups: dict[str, list] = {}
    for f in fs:
        groups.setdefault(f.metadata["group"], []).append(f)
    return groups


def _defaults(cls):
    """A config of defaults; positional list fields without a default get an empty list."""
    return cls(**{f.name: [] for f in option_fields(cls)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})
