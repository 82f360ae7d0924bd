"""Loss masks (`mask_directory` in a `[[datasets]]` entry): one greyscale image per target, white = train here,
black = ignore, grey = a weight in between.

A target `a.png` takes the mask named `a.<ext>` (any image extension) from the mask folder. Targets without a mask
train exactly as without the key (their cache holds no mask). A mask must have its image's size (it is cropped
and resized with the image, so any other size would put it in the wrong place). cache_latents resizes it like
the image to the bucket, then averages it down to the latent grid (8×8 pixels per latent) and stores it in the
latent cache as `mask_weights_1x{h}x{w}_float32` (engine/data/cache_latents.py); the training loss of every
latent is multiplied by its weight (engine/train/step.py). The mask file's fingerprint is part of the cache's
source, so a repainted mask makes the cache stale.

Importable without torch.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from engine.spec.controls import cover_crop
from engine.spec.dataset.sources import Item, Problem, is_image

MASK_KEY = "mask_weights"


def attach_masks(items: list[Item], mask_dir: Path, problems: list[Problem]) -> None:
    if not mask_dir.is_dir():
        problems.append(Problem(str(mask_dir), "mask_directory does not exist",
                                "Fix mask_directory in the dataset config (the Dataset tab paints masks into it), "
                                "or remove the key."))
        return
    pool = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.is_file() and is_image(p)}
    stems = {it.stem for it in items}
    for item in items:
        item.mask_path = pool.get(item.stem)
    for stem in sorted(set(pool) - stems):
        problems.append(Problem(str(pool[stem]), "mask matches no target image",
                                "Name the mask like its image (a.png for a.jpg), or remove it.", level="warning"))
    unmasked = [it.stem for it in items if it.mask_path is None]
    if unmasked and len(unmasked) < len(items):
        problems.append(Problem(str(mask_dir), f"{len(unmasked)} image(s) have no mask and train on the whole "
                                f"image: {', '.join(unmasked[:5])}{' ...' if len(unmasked) > 5 else ''}",
                                "Paint or import their masks in the Dataset tab if that is not intended.",
                                level="warning"))


def check_mask(item: Item, size: tuple[int, int], problems: list[Problem]) -> None:
    """The mask must be a readable image of the target's size."""
    if item.mask_path is None:
        return
    try:
        with Image.open(item.mask_path) as img:
            img.load()
            mask_size = img.size
    except (OSError, SyntaxError, ValueError) as e:
        problems.append(Problem(str(item.mask_path), f"cannot be read as an image ({type(e).__name__}: {e})",
                                "Save the mask as a PNG (white = train here, black = ignore)."))
        return
    if mask_size != tuple(size):
        problems.append(Problem(str(item.mask_path), f"mask is {mask_size[0]}x{mask_size[1]}, its image "
                                f"{item.image_path.name} is {size[0]}x{size[1]}",
                                "Paint the mask on the image itself (Dataset tab), or resize it to the image's size."))


def mask_pixels(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """The mask as greyscale, cropped and resized exactly as its image is for `bucket`."""
    grey = image.convert("L")
    return grey if grey.size == tuple(bucket) else cover_crop(grey, tuple(bucket))
