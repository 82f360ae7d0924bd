"""VRAM presets as a reusable Gradio component: preset cards + a live VRAM/RAM estimate of the form.

    form = build_form(TrainNetworkConfig, ...)                 # the tab's own form (app/forms.py)
    presets_ui.build("train_network", form, elem_prefix="train")

Each card shows a preset's name, budget, the options it sets and the estimator's VRAM/RAM; its button applies
those options to the form (by option name; options the form does not show are listed, not silently dropped).
Every change of the form re-runs the estimator (pure Python, engine/vram; no torch) and compares the result
with this machine's GPU memory (nvidia-smi, when present) and RAM (psutil).

The functions above `build` are plain Python so tests cover them without a browser.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from typing import Any

import gradio as gr
import psutil

from app.views import error_markdown
from app.workflow import adapt_blocks, preset_fits
from engine.spec import config as C
from engine.spec.errors import EngineError
from engine.spec.presets import Preset, apply_preset, estimate_preset, list_presets, preset_argv
from engine.spec.vram import estimate_config

TRAIN_KINDS = ("train_network", "train")


# ------------------------------------------------------------------ this machine

def detect_gpu_memory_gib() -> float | None:
    """Total memory of the first GPU by nvidia-smi, or None when there is no NVIDIA GPU/driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
    return round(values[0] / 1024, 1) if values else None  # MiB → GiB


def system_ram_gib() -> float:
    return round(psutil.virtual_memory().total / 1024 ** 3, 1)


# ------------------------------------------------------------------ cards

def preset_card(preset: Preset) -> dict:
    est = estimate_preset(preset)
    return {"name": preset.name, "budget_gib": preset.vram_budget_gib, "flags": preset_argv(preset),
            "vram_gib": est["vram_gib"], "ram_gib": est["ram_gib"], "peak_phase": est["peak_phase"],
            "description": preset.description, "resolution": preset.resolution, "file": preset.path.name}


def card_markdown(card: dict) -> str:
    w, h = card["resolution"]
    flags = " ".join(card["flags"]) or "(defaults)"
    return (f"**{card['name']}** — fits {card['budget_gib']:g} GB\n\n{card['description']}\n\n"
            f"`{flags}`\n\nEstimate at {w}×{h}: **{card['vram_gib']:.1f} GiB VRAM**, {card['ram_gib']:.0f} GiB RAM "
            f"(peak: {card['peak_phase'].replace('_', ' ')})")


def apply_to_form(preset: Preset, cfg, form_names: list[str]) -> tuple[Any, list[str]]:
    """The config after applying the preset, and the preset options the form does not show."""
    return apply_preset(preset, cfg), [n for n in preset.fields if n not in form_names]


# ------------------------------------------------------------------ live estimate

def estimate_for(kind: str, cfg, resolution: tuple[int, int] | None = None) -> dict:
    """The estimate of a tab's config; `resolution` (W, H) for training (the dataset decides it)."""
    size = {"resolution": [int(resolution[0]), int(resolution[1])]} if kind in TRAIN_KINDS and resolution else {}
    return estimate_config(cfg, kind, source="form", **size)


def fit_message(est: dict, gpu_gib: float | None, ram_gib: float | None) -> str:
    """One line per resource: what the run needs and whether this machine has it."""
    lines = [f"**Estimated peak: {est['vram_gib']:.1f} GiB VRAM** ({est['peak_phase'].replace('_', ' ')}), "
             f"**{est['ram_gib']:.1f} GiB RAM**."]
    if gpu_gib is None:
        lines.append("No NVIDIA GPU detected (nvidia-smi not found): cannot check the VRAM fit here.")
    elif est["vram_gib"] > gpu_gib:
        lines.append(f"⚠️ Will not fit: this GPU has {gpu_gib:g} GiB. Pick a smaller preset, swap more blocks or "
                     "use fp8.")
    else:
        lines.append(f"Fits this GPU ({gpu_gib:g} GiB).")
    if ram_gib is not None and est["ram_gib"] > ram_gib:
        lines.append(f"⚠️ Needs more RAM than this machine has ({ram_gib:g} GiB): swap fewer blocks or add RAM.")
    for name, row in est.get("commands", {}).items():       # caching jobs run first, each on its own
        fp8 = " with --fp8_vl" if row.get("fp8_vl") else ""
        line = f"Before it, `{name}`{fp8}: {row['vram_gib']:.1f} GiB VRAM, {row['ram_gib']:.1f} GiB RAM."
        if gpu_gib is not None and row["vram_gib"] > gpu_gib:
            hint = " Turn on fp8_vl." if row.get("fp8_vl") is False else ""
            line = f"⚠️ Will not fit this GPU: `{name}`{fp8} needs {row['vram_gib']:.1f} GiB VRAM.{hint}"
        lines.append(line)
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in est["parts"].items() if v)
    lines.append(f"Parts (GiB): {parts}.")
    lines += [f"_Note: {n}_" for n in est.get("notes", [])]
    return "\n\n".join(lines)


def live_estimate(kind: str, form, values: list, resolution: tuple[int, int] | None,
                  gpu_gib: float | None, ram_gib: float | None) -> str:
    try:
        cfg = form.to_config(*values)
        return fit_message(estimate_for(kind, cfg, resolution), gpu_gib, ram_gib)
    except (C.ConfigError, EngineError) as e:
        return f"⚠️ Cannot estimate: {e}"


# ------------------------------------------------------------------ the component

def gpu_line(gpu_gib: float | None, ram_gib: float | None) -> str:
    gpu = f"GPU: **{gpu_gib:g} GiB**" if gpu_gib is not None else "GPU: **none detected** (nvidia-smi not found)"
    return f"{gpu} · RAM {ram_gib:g} GiB · presets that fit are marked ✓; the applied one is outlined."


def compact_card(card: dict, gpu_gib: float | None, applied: bool = False) -> str:
    fits = preset_fits(card["vram_gib"], gpu_gib)
    text = f"**{card['name']}**  \n{card['vram_gib']:.1f} GiB VRAM · {card['ram_gib']:.0f} GiB RAM"
    if fits:
        text += "  \n✓ fits this GPU"
    if applied:
        text += "  \n**● applied**"
    return text


def card_classes(card: dict, gpu_gib: float | None, applied: bool) -> list[str]:
    return (["qis-fits"] if preset_fits(card["vram_gib"], gpu_gib) else []) + (["qis-applied"] if applied else [])


def build(kind: str, form, elem_prefix: str = "presets", gpu_gib: float | None = None,
          ram_gib: float | None = None, blocks=None):
    """Compact cards (GPU detected, fitting ones marked, the applied one outlined) + the live estimate, folded.
    `blocks(cfg)`: how many blocks the run's DiT has (None when unknown); a preset's blocks_to_swap is clamped
    to it (app/workflow.adapt_blocks). Returns the estimate Markdown component."""
    gpu_gib = detect_gpu_memory_gib() if gpu_gib is None else gpu_gib
    ram_gib = system_ram_gib() if ram_gib is None else ram_gib
    presets = list_presets(kind)
    cards = [preset_card(p) for p in presets]
    api = elem_prefix.replace("-", "_")      # api names: <prefix>_apply_<preset file stem>, <prefix>_estimate
    gr.Markdown(gpu_line(gpu_gib, ram_gib), elem_id=f"{elem_prefix}-gpu")
    mds, buttons = [], []
    with gr.Row(elem_id=f"{elem_prefix}-presets"):
        for preset, card in zip(presets, cards):
            with gr.Column(min_width=140):
                mds.append(gr.Markdown(compact_card(card, gpu_gib), elem_id=f"{elem_prefix}-card-{preset.path.stem}",
                                       elem_classes=card_classes(card, gpu_gib, False)))
                buttons.append(gr.Button(f"Apply {preset.vram_budget_gib:g} GB", size="sm",
                                         elem_id=f"{elem_prefix}-apply-{preset.path.stem}"))
    status = gr.Markdown(elem_id=f"{elem_prefix}-preset-status")
    for i, (preset, button) in enumerate(zip(presets, buttons)):
        button.click(_applier(preset, form, i, cards, gpu_gib, blocks), inputs=form.inputs,
                     outputs=[*form.inputs, status, *mds, *buttons],
                     api_name=f"{api}_apply_{preset.path.stem}".replace("-", "_"))
    with gr.Accordion("VRAM estimate of this form, and what each preset sets", open=False,
                      elem_id=f"{elem_prefix}-estimate-box"):
        res_inputs = []
        if kind in TRAIN_KINDS:
            with gr.Row():
                res_inputs = [gr.Number(value=1024, precision=0, label="Estimate at width", elem_id=f"{elem_prefix}-w"),
                              gr.Number(value=1024, precision=0, label="height", elem_id=f"{elem_prefix}-h")]
        first = live_estimate(kind, form, [c.value for c in form.inputs],   # the form as built, before any change
                              tuple(c.value for c in res_inputs) or None, gpu_gib, ram_gib)
        estimate_md = gr.Markdown(first, elem_id=f"{elem_prefix}-estimate")
        gr.Markdown("\n\n---\n\n".join(card_markdown(c) for c in cards), elem_id=f"{elem_prefix}-cards-detail")

    def recompute(*values):
        n = len(form.inputs)
        res = tuple(values[n:]) if res_inputs else None
        return live_estimate(kind, form, list(values[:n]), res, gpu_gib, ram_gib)

    gr.on([c.change for c in [*form.inputs, *res_inputs]], recompute, inputs=[*form.inputs, *res_inputs],
          outputs=estimate_md, api_name=f"{api}_estimate", show_progress="hidden", trigger_mode="always_last")
    return estimate_md


def _applier(preset: Preset, form, index: int, cards: list[dict], gpu_gib, blocks=None):
    """The click of card `index`: the form with the preset (adapted to the DiT), a note, each card's look and
    each button's variant (the applied one outlined and primary)."""
    def apply(*values):
        try:
            cfg = form.to_config(*values)
        except (C.ConfigError, EngineError) as e:
            # another field is wrong (e.g. a value remembered from before a rule tightened): name it, change nothing
            unchanged = [gr.skip()] * (len(values) + 2 * len(cards))
            return [*unchanged[:len(values)], f"Not applied: fix this first.\n\n{error_markdown(e)}",
                    *unchanged[len(values):]]
        fields, note_blocks = adapt_blocks(preset.fields, blocks(cfg) if blocks else None)
        applied, missing = apply_to_form(dataclasses.replace(preset, fields=fields), cfg, form.names)
        note = f"Applied **{preset.name}**." + (f" {note_blocks}" if note_blocks else "")
        if missing:
            note += " Not on this form (set them in the run TOML or on the command line): " + \
                    ", ".join(f"`--{m}`" for m in missing) + "."
        look = [gr.update(value=compact_card(c, gpu_gib, i == index), elem_classes=card_classes(c, gpu_gib, i == index))
                for i, c in enumerate(cards)]
        variants = [gr.update(variant="primary" if i == index else "secondary") for i in range(len(cards))]
        return [*form.values(applied), note, *look, *variants]
    return apply
