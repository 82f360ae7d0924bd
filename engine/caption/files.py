"""Which items a run captions, and their images as the vision encoder sees them."""

from __future__ import annotations

import logging

from PIL import Image

from engine.spec.dataset.captions import CaptionTarget, has_caption, vl_size
from engine.spec.dataset.sources import Problem
from engine.spec.errors import DatasetError

log = logging.getLogger(__name__)


def check_listing(problems: list[Problem], targets: list[CaptionTarget], config_path) -> None:
    """Refuse a dataset whose listing has errors (a missing folder, an ambiguous control image ...) before any model
    loads: captioning the wrong pairs would waste the run. Warnings are logged."""
    errors = [p for p in problems if p.level == "error"]
    for p in problems:
        if p not in errors:
            log.warning("%s", p)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DatasetError(f"{config_path}: {errors[0].file}: {errors[0].message}{more}.", errors[0].fix)
    if not targets:
        raise DatasetError(f"{config_path}: the dataset has no images to caption.",
                           "Point image_directory (or image_jsonl_file) at the training images.")


def select(targets: list[CaptionTarget], overwrite: bool, done: set[tuple[int, str]]) -> list[CaptionTarget]:
    """The items this run captions: not already in the review file, and without a caption unless `overwrite`."""
    return [t for t in targets if (t.dataset, t.stem) not in done and (overwrite or not has_caption(t))]


def open_images(target: CaptionTarget, area: int) -> list[Image.Image]:
    """The item's images for the model, controls first and the target last, each RGB at `vl_size` (a whole number
    of vision tokens). An unreadable image names its file."""
    out = []
    for path in [*target.control_paths, target.image_path]:
        try:
            with Image.open(path) as img:
                img.load()
                rgb = _rgb(img)
        except (OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"{path}: cannot be read as an image ({e}).",
                               "Replace or remove the file, then run check_dataset.") from e
        out.append(rgb.resize(vl_size(rgb.size, area), Image.Resampling.BICUBIC))
    return out


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        base = Image.new("RGB", img.size, (255, 255, 255))      # transparent parts on white, as the processor does
        base.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return base
    return img.convert("RGB")
