"""The demo's sample edit dataset: procedural shapes drawn with PIL, musubi-tuner dataset TOMLs and sample
prompt files (docs/architecture.md, "The demo"). Used by `engine.demo`; no torch here.

Each item is an edit pair: the control shows a scene, the target shows the same scene with one shape in another
colour, the mask is white where the shape changed, and the caption describes the target. `control2/` holds two
controls per target for Edit-2509/2511: the scene, and a smaller swatch of the new colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tomli_w
from PIL import Image, ImageDraw

from engine.spec.variants import VARIANTS

COLOURS = {
    "red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "pink": (245, 170, 200), "grey": (128, 128, 128), "cyan": (40, 200, 210),
}


@dataclass(frozen=True)
class Item:
    stem: str
    size: tuple[int, int]   # (width, height)
    background: str
    shape: str              # the shape that changes colour
    before: str
    after: str
    other: str              # a second shape that stays as it is
    other_colour: str

    @property
    def caption(self) -> str:
        return (f"a {self.after} {self.shape} and a small {self.other_colour} {self.other} "
                f"on a {self.background} background")

    @property
    def instruction(self) -> str:
        return f"make the {self.shape} {self.after}"


# 80x48 and 48x80 are exact 16-px buckets of a 64x64 area (a 64x48 image would sit exactly between two buckets).
ITEMS = (
    Item("shapes_00", (64, 64), "pink", "circle", "red", "blue", "square", "yellow"),
    Item("shapes_01", (64, 64), "cyan", "square", "green", "orange", "triangle", "white"),
    Item("shapes_02", (64, 64), "yellow", "triangle", "purple", "red", "circle", "black"),
    Item("shapes_03", (64, 64), "grey", "circle", "white", "green", "square", "red"),
    Item("shapes_04", (64, 64), "white", "square", "blue", "red", "circle", "green"),
    Item("shapes_05", (64, 64), "green", "triangle", "orange", "white", "square", "purple"),
    Item("shapes_06", (80, 48), "blue", "circle", "yellow", "red", "triangle", "white"),
    Item("shapes_07", (48, 80), "orange", "square", "black", "cyan", "circle", "white"),
)
SWATCH_SIZE = (48, 48)
RESOLUTION = [64, 64]
SAMPLE_OPTIONS = "--w 64 --h 64 --s 4 --d 42 --l 4.0"


def corpus() -> list[str]:
    """Text the demo tokenizer is trained on: every prompt template (so their prefixes tokenize like the real
    tokenizer) and the dataset's words (so demo prompts become words, not bytes)."""
    words = [*COLOURS, "circle", "square", "triangle", "shape", "small", "big", "background", "on", "and", "the",
             "a", "make", "turn", "into", "change", "to", "with", "in", "of", "colour", "color", "picture"]
    lines = [item.caption for item in ITEMS] + [item.instruction for item in ITEMS] + [" ".join(words)]
    texts = [v.prompt_text(line, n) for v in VARIANTS.values() for line in lines for n in (1, 2)]
    return texts * 4


def write_dataset(tmp: Path, root: Path) -> dict:
    """Write images, captions, masks, TOMLs and prompt files under `tmp`; paths inside point at `root`.
    Returns the manifest entries that describe them."""
    data = tmp / "dataset"
    for item in ITEMS:
        _write_item(data, item)
    final = root / "dataset"
    configs = {
        "t2i": _write_toml(tmp / "dataset_t2i.toml", final / "images", None, root / "cache" / "t2i"),
        "edit": _write_toml(tmp / "dataset_edit.toml", final / "images", final / "control", root / "cache" / "edit"),
        "edit2": _write_toml(tmp / "dataset_edit2.toml", final / "images", final / "control2",
                             root / "cache" / "edit2"),
    }
    prompts = _write_prompts(tmp, final)
    first = ITEMS[0].stem
    return {
        "dataset_configs": {name: str(root / p.name) for name, p in configs.items()},
        "dataset_config": {"original": str(root / "dataset_t2i.toml"), "edit": str(root / "dataset_edit.toml"),
                           "edit-2509": str(root / "dataset_edit2.toml"),
                           "edit-2511": str(root / "dataset_edit2.toml")},
        "sample_prompts": {version: str(root / p.name) for version, p in prompts.items()},
        "dataset": {"images": str(final / "images"), "control": str(final / "control"),
                    "control2": str(final / "control2"), "masks": str(final / "masks"),
                    "cache": str(root / "cache"), "count": len(ITEMS)},
        "examples": {"prompt": ITEMS[0].caption, "edit_prompt": ITEMS[0].instruction,
                     "control": str(final / "control" / f"{first}.png"),
                     "controls": [str(final / "control2" / f"{first}_{i}.png") for i in (0, 1)],
                     "mask": str(final / "masks" / f"{first}.png"), "width": 64, "height": 64, "seed": 42},
    }


# ---------------------------------------------------------------------------------------------- drawing

def _write_item(data: Path, item: Item) -> None:
    control, _ = _scene(item, item.before)
    target, box = _scene(item, item.after)
    _save(target, data / "images" / f"{item.stem}.png")
    (data / "images" / f"{item.stem}.txt").write_text(item.caption + "\n", encoding="utf-8")
    _save(control, data / "control" / f"{item.stem}.png")
    _save(control, data / "control2" / f"{item.stem}_0.png")
    _save(_swatch(item.after), data / "control2" / f"{item.stem}_1.png")
    _save(_mask(item.size, box), data / "masks" / f"{item.stem}.png")


def _scene(item: Item, colour: str):
    """The item's picture with its changing shape in `colour`; returns (image, bounding box of that shape)."""
    w, h = item.size
    image = Image.new("RGB", item.size, COLOURS[item.background])
    draw = ImageDraw.Draw(image)
    m = min(w, h)
    box = _draw(draw, item.shape, (0.36 * w, 0.4 * h), 0.24 * m, COLOURS[colour])
    _draw(draw, item.other, (0.74 * w, 0.72 * h), 0.14 * m, COLOURS[item.other_colour])
    return image, box


def _draw(draw, shape: str, centre, radius: float, fill) -> tuple[int, int, int, int]:
    cx, cy = centre
    box = (round(cx - radius), round(cy - radius), round(cx + radius), round(cy + radius))
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=(0, 0, 0))
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=(0, 0, 0))
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill, outline=(0, 0, 0))
    return box


def _swatch(colour: str):
    image = Image.new("RGB", SWATCH_SIZE, (200, 200, 200))
    ImageDraw.Draw(image).ellipse((6, 6, SWATCH_SIZE[0] - 7, SWATCH_SIZE[1] - 7), fill=COLOURS[colour],
                                  outline=(0, 0, 0))
    return image


def _mask(size, box, margin: int = 3):
    """White = change (musubi's convention), a little larger than the shape."""
    mask = Image.new("L", size, 0)
    x0, y0, x1, y1 = box
    ImageDraw.Draw(mask).rectangle((x0 - margin, y0 - margin, x1 + margin, y1 + margin), fill=255)
    return mask


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ---------------------------------------------------------------------------------------------- configs

def _write_toml(path: Path, images: Path, control: Path | None, cache: Path) -> Path:
    dataset = {"image_directory": str(images), "cache_directory": str(cache), "num_repeats": 1}
    if control is not None:
        dataset["control_directory"] = str(control)
    doc = {"general": {"resolution": RESOLUTION, "caption_extension": ".txt", "batch_size": 1,
                       "enable_bucket": True, "bucket_no_upscale": False},
           "datasets": [dataset]}
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


def _write_prompts(tmp: Path, data: Path) -> dict[str, Path]:
    """musubi's per-line syntax: `prompt --w W --h H --s steps --d seed --l cfg [--ci control ...]`."""
    header = "# Demo sample prompts, one per line (musubi-tuner syntax).\n"
    t2i = [f"{ITEMS[0].caption} {SAMPLE_OPTIONS}", f"a red circle {SAMPLE_OPTIONS}",
           f"{ITEMS[6].caption} --w 80 --h 48 --s 4 --d 7 --l 4.0"]
    edit, edit2 = [], []
    for item in ITEMS[:2]:
        edit.append(f"{item.instruction} {SAMPLE_OPTIONS} --ci {data / 'control' / (item.stem + '.png')}")
        controls = " ".join(f"--ci {data / 'control2' / f'{item.stem}_{i}.png'}" for i in (0, 1))
        edit2.append(f"{item.instruction} like picture 2 {SAMPLE_OPTIONS} {controls}")
    files = {"sample_prompts.txt": t2i, "sample_prompts_edit.txt": edit, "sample_prompts_edit2.txt": edit2}
    for name, lines in files.items():
        (tmp / name).write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    return {"original": tmp / "sample_prompts.txt", "edit": tmp / "sample_prompts_edit.txt",
            "edit-2509": tmp / "sample_prompts_edit2.txt", "edit-2511": tmp / "sample_prompts_edit2.txt"}
