"""Pictures for the Generate / Edit tab, with PIL and numpy only (no torch in the GUI process):

- the inpaint mask from the painter: the painted layer's alpha (not a diff of the composite), then grow / shrink,
  feather and invert; white (255) = change, black = keep, as `--mask_path` takes it;
- what a run left behind, read from its event log (engine/spec/events.py's typed events): output PNGs, live
  previews (never among the outputs) and the per-step RCM records (debug mask + difference statistics);
- the RCM view: each step's mask over the control image, the share of tokens still changing per step, a heatmap
  of |output − control| and the share of pixels that changed where the mask / RCM said "keep";
- the `parameters` PNG text chunk the engine writes (engine/spec/naming.py), read back for the form.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from engine.spec import naming
from engine.spec.controls import cover_crop
from engine.spec.events import IMAGE_OUTPUT, Image as ImageEvent, Preview, RcmStep, parse_event

PARAMETERS_KEY = naming.PNG_PARAMETERS_KEY
CHANGED_TOLERANCE = 10            # |output − control| above this (0-255, channel mean) counts as a changed pixel


class MaskError(ValueError):
    """A painted mask the engine could not use (message names what and how to fix it)."""


# ---------------------------------------------------------------------------------------------- the painter

def painted_mask(background: str | None, layers: list[str] | None) -> Image.Image | None:
    """The painted layers' alpha as an "L" mask of the background's size; None when nothing is painted."""
    if not background or not layers:
        return None
    with Image.open(background) as bg:
        size = bg.size
    alpha = None
    for path in layers:
        with Image.open(path) as layer:
            if layer.size != size:
                raise MaskError(f"the painted mask layer is {layer.size[0]}x{layer.size[1]} but control image 1 is "
                                f"{size[0]}x{size[1]}: clear the mask and paint it again on this image")
            a = np.asarray(layer.convert("RGBA"))[..., 3]
        alpha = a if alpha is None else np.maximum(alpha, a)
    if alpha is None or not alpha.any():
        return None
    return Image.fromarray(alpha, mode="L")


def refine_mask(mask: Image.Image, grow: int = 0, feather: float = 0.0, invert: bool = False) -> Image.Image:
    """grow > 0 widens the white region by that many pixels, < 0 shrinks it; feather blurs the edge (radius px);
    invert swaps change and keep (after growing, so "grow" always means the painted strokes)."""
    grow = int(grow or 0)
    if grow:
        size = 2 * abs(grow) + 1
        mask = mask.filter(ImageFilter.MaxFilter(size) if grow > 0 else ImageFilter.MinFilter(size))
    if invert:
        mask = Image.fromarray(255 - np.asarray(mask), mode="L")
    if feather and feather > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(float(feather)))
    return mask


def mask_layer(mask_path: str) -> Image.Image:
    """A saved mask as a painter layer (white, alpha = mask), to load a run's mask back into the editor."""
    with Image.open(mask_path) as m:
        alpha = m.convert("RGB").split()[0]            # the engine reads the red channel
    layer = Image.new("RGBA", alpha.size, (255, 255, 255, 0))
    layer.putalpha(alpha)
    return layer


def save_png(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_control(src: str, folder: Path, index: int) -> Path:
    """Copy an uploaded control image as PNG, keeping its name (the engine names debug masks and, with
    --append_original_name, outputs after the first control's stem). Transparency is flattened on white."""
    stem = Path(src).stem or f"control_{index}"
    with Image.open(src) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        rgb = im.convert("RGB")
    name = stem if index == 1 else f"{stem}_c{index}"
    return save_png(rgb, folder / f"{name}.png")


# ---------------------------------------------------------------------------------------------- PNG parameters

def read_png_parameters(path: str) -> dict:
    """The generation parameters the engine stored in a PNG, or a MaskError-free ValueError saying why not."""
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get(PARAMETERS_KEY)
    except OSError as e:
        raise ValueError(f"{Path(path).name} is not a readable image ({e})") from None
    if not text:
        raise ValueError(f"{Path(path).name} has no '{PARAMETERS_KEY}' text chunk: it was not written by "
                         "generate_image, or with --no_metadata")
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{Path(path).name}: its '{PARAMETERS_KEY}' chunk is not JSON ({e})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{Path(path).name}: its '{PARAMETERS_KEY}' chunk is not a JSON object")
    return params


# ---------------------------------------------------------------------------------------------- a run's events

@dataclass
class RunFiles:
    outputs: list[str] = field(default_factory=list)          # output PNGs, in order
    rcm_steps: list[RcmStep] = field(default_factory=list)    # one record per RCM step: mask path + statistics
    previews: list[Preview] = field(default_factory=list)


def read_run(log_path: Path) -> RunFiles:
    """Outputs, previews and the RCM steps from a job's log (the event lines the engine wrote)."""
    run = RunFiles()
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return run
    for ev in filter(None, map(parse_event, lines)):
        if isinstance(ev, RcmStep):
            run.rcm_steps.append(ev)
        elif isinstance(ev, Preview):
            run.previews.append(ev)
        elif isinstance(ev, ImageEvent) and ev.kind == IMAGE_OUTPUT and ev.path.lower().endswith(".png"):
            run.outputs.append(ev.path)
    return run


# ---------------------------------------------------------------------------------------------- the RCM view

def load_mask_array(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask PNG as floats in [0, 1] (1 = change), optionally scaled (nearest: token masks stay blocky)."""
    with Image.open(path) as m:
        m = m.convert("L")
        if size is not None and m.size != tuple(size):
            m = m.resize(size, Image.NEAREST)
        return np.asarray(m, dtype=np.float32) / 255.0


def changing_percent(mask_path: str) -> float:
    return float(load_mask_array(mask_path).mean() * 100.0)


def overlay(control: Image.Image, mask: np.ndarray) -> Image.Image:
    """The control with the changing region tinted red and the kept region dimmed."""
    base = np.asarray(control.convert("RGB"), dtype=np.float32)
    red = np.array([255.0, 40.0, 40.0])
    m = mask[..., None]
    out = base * (1 - m) * 0.55 + (base * 0.45 + red * 0.55) * m
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


_HEAT = np.array([[0, 0, 0], [90, 0, 110], [220, 40, 40], [255, 170, 0], [255, 255, 255]], dtype=np.float32)


def difference(output: Image.Image, control: Image.Image) -> np.ndarray:
    """Per-pixel channel-mean |output − control| (0-255), the control cover-cropped to the output size."""
    out = np.asarray(output.convert("RGB"), dtype=np.float32)
    ctrl = np.asarray(cover_crop(control.convert("RGB"), output.size), dtype=np.float32)
    return np.abs(out - ctrl).mean(axis=2)


def heatmap(diff: np.ndarray) -> Image.Image:
    """Black (no change) → purple → red → orange → white (difference 255)."""
    x = diff / 255.0 * (len(_HEAT) - 1)
    lo = np.clip(np.floor(x).astype(int), 0, len(_HEAT) - 2)
    t = (x - lo)[..., None]
    rgb = _HEAT[lo] * (1 - t) + _HEAT[lo + 1] * t
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def changed_percent(diff: np.ndarray, region: np.ndarray) -> float | None:
    """% of the pixels in `region` (bool) whose difference exceeds CHANGED_TOLERANCE; None for an empty region."""
    if not region.any():
        return None
    return float((diff[region] > CHANGED_TOLERANCE).mean() * 100.0)
