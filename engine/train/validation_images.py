"""Validation images (--validation_images): at each validation point every item of the held-out dataset is
rendered from its caption (and, for edit models, its control images) and shown beside them: one PNG per item,
`[control images | generated | target]` side by side at one height, in `<output_dir>/validation/`.

The rendering is the training samples' (engine/train/samples.py): the items become prompt lines (caption, the
target's bucket size as --w/--h, --seed as --d, each control as --ci), encoded once before the DiT loads, and
denoised with the model being trained, exactly as Generate would. The raw generated images stay in
`<output_dir>/validation/sample/`; the side-by-side pictures are what the `sample` events (`kind`: validation)
name, so the Train tab's gallery shows them.

API:
- `ValidationImages.prepare(cfg, variant, device, dtype) -> ValidationImages | None`
- `images.render(dit, step, events, modules) -> [paths]`
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from PIL import Image

from engine.spec.dataset.plan import PlannedItem, build_plan
from engine.train import samples

log = logging.getLogger(__name__)

FOLDER = "validation"


def prompt_line(item: PlannedItem, seed: int) -> str:
    """One sample-prompt line for a dataset item (the line grammar splits at " --", so the caption may not hold
    one)."""
    caption = " ".join((item.item.caption or "").split()).replace(" --", " -")
    w, h = item.bucket
    controls = "".join(f" --ci {p}" for p in item.item.control_paths)
    return f"{caption} --w {w} --h {h} --d {seed}{controls}"


class _NoSampleEvents:
    """The events of the sample renderer minus its `sample` events (the side-by-side pictures replace them)."""

    def __init__(self, events):
        self.events = events

    def sample(self, *args, **kwargs):
        return None

    def __getattr__(self, name):
        return getattr(self.events, name)


class ValidationImages:
    def __init__(self, prompts, items: list[PlannedItem], folder: Path, name: str):
        self.prompts, self.items, self.folder, self.name = prompts, items, folder, name

    @classmethod
    def prepare(cls, cfg, variant, device, dtype) -> "ValidationImages | None":
        if not cfg.validation_images:
            return None
        items = build_plan(cfg.validation_dataset_config, variant.name).items()
        folder = Path(cfg.output_dir) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        lines = folder / "prompts.txt"
        tmp = lines.with_name(f".{lines.name}.tmp")
        tmp.write_text("".join(prompt_line(it, cfg.seed) + "\n" for it in items), encoding="utf-8")
        os.replace(tmp, lines)
        run = dataclasses.replace(cfg, sample_prompts=str(lines), output_dir=str(folder))
        prompts = samples.SamplePrompts.prepare(run, variant, device, dtype, cfg.output_name)
        log.info("validation images: %d item(s) of %s, rendered at each validation point", len(items),
                 cfg.validation_dataset_config)
        return cls(prompts, items, folder, cfg.output_name)

    def render(self, dit, step: int, events, modules=()) -> list[str]:
        events.phase("sampling", step=step, what="validation images")
        generated = self.prompts.generate(dit, step, None, _NoSampleEvents(events), modules)
        out = []
        for index, (item, path) in enumerate(zip(self.items, generated)):
            pair = self.folder / f"{self.name}_{step:06d}_{index:02d}_{item.stem}.png"
            side_by_side([*item.item.control_paths, Path(path), item.item.image_path], pair)
            events.sample(str(pair), step=step, index=index, prompt=item.item.caption, kind="validation")
            out.append(str(pair))
        return out


def side_by_side(paths: list[Path], dest: Path, height: int = 256) -> Path:
    """The images in a row at one height (aspect kept), written atomically."""
    row = []
    for p in paths:
        with Image.open(p) as img:
            img = img.convert("RGB")
            row.append(img.resize((max(1, round(img.width * height / img.height)), height), Image.Resampling.LANCZOS))
    canvas = Image.new("RGB", (sum(i.width for i in row) + 4 * (len(row) - 1), height), (255, 255, 255))
    x = 0
    for img in row:
        canvas.paste(img, (x, 0))
        x += img.width + 4
    tmp = dest.with_name(f".{dest.name}.tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, dest)
    return dest
