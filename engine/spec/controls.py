"""Control-image sizing for edit models: one place for inference and text-encoder caching
(docs/architecture.md, "Precise semantics").

Three modes (musubi's `--resize_control_to_*` flags):
- official (`--resize_control_to_official_size`): what diffusers' pipelines do. VAE image = ~1 MP
  (`calculate_dimensions`, multiples of 32); vision-encoder image = the same image for Edit (v1), a
  `variant.vl_area` (384²) image for Edit-2509/2511. Plain LANCZOS resize to the exact size, as
  `VaeImageProcessor.resize` does (no crop, so the aspect ratio moves by at most the 32-px rounding).
- image size (`--resize_control_to_image_size`): cover-resize + centre crop to the output size, both encoders.
- neither: musubi's bucket at the control's own area (16-px steps), both encoders.

Sizes are (width, height) tuples throughout, as PIL uses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from engine.spec import variants as V
from engine.spec.variants import Variant

BUCKET_STEP = 16


@dataclass(frozen=True)
class ControlSizes:
    vae: tuple[int, int]   # (width, height) of the image the VAE encodes
    vl: tuple[int, int]    # (width, height) of the image the vision encoder sees
    exact: bool            # True: plain resize (official); False: cover-resize + centre crop


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """diffusers' `calculate_dimensions`: (width, height) of ~target_area with width/height = ratio, each
    rounded to a multiple of 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def official_areas(variant: Variant) -> tuple[int, int]:
    """(VAE area, vision-encoder area). Read at call time so tests can shrink them."""
    vae_area = V.VAE_AREA
    return vae_area, (variant.vl_area if variant.vl_area is not None else vae_area)


def bucket_resolution(size: tuple[int, int], area: float, step: int = BUCKET_STEP) -> tuple[int, int]:
    """musubi's `calculate_bucket_resolution`: the step-multiple (w, h) of about `area` closest to size's aspect."""
    iw, ih = size
    ar = iw / ih
    w0 = _floor(int(math.sqrt(area * ar)), step)
    best, best_err = None, float("inf")
    for i in range(-2, 3):
        w = w0 + i * step
        if w <= 0:
            continue
        h = _floor(int(area // w), step)
        if h <= 0:
            continue
        err = abs(w / h - ar)
        if err < best_err:
            best, best_err = (w, h), err
    return best or (max(step, _floor(iw, step)), max(step, _floor(ih, step)))


def control_sizes(variant: Variant, size: tuple[int, int], output_size: tuple[int, int],
                  official: bool = False, to_image_size: bool = False) -> ControlSizes:
    """The sizes one control image of `size` (w, h) is resized to, for an output of `output_size` (w, h)."""
    if official and to_image_size:
        raise ValueError("resize to the official size and to the output size are exclusive")
    if official:
        vae_area, vl_area = official_areas(variant)
        ratio = size[0] / size[1]
        vae = calculate_dimensions(vae_area, ratio)
        vl = vae if variant.vl_area is None else calculate_dimensions(vl_area, ratio)
        return ControlSizes(vae, vl, exact=True)
    if to_image_size:
        return ControlSizes(tuple(output_size), tuple(output_size), exact=False)
    own = bucket_resolution(size, size[0] * size[1])
    return ControlSizes(own, own, exact=False)


def resize(image: Image.Image, size: tuple[int, int], exact: bool) -> Image.Image:
    """RGB image of `size` (w, h): plain LANCZOS resize when exact, else cover-resize + centre crop."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    if tuple(image.size) == tuple(size):
        return image
    if exact:
        return image.resize(size, resample=Image.LANCZOS)
    return cover_crop(image, size)


def cover_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale so the image covers `size`, then crop the centre (musubi's bucket resize).
    LANCZOS when enlarging; BOX (area averaging, like cv2.INTER_AREA) when shrinking."""
    bw, bh = size
    iw, ih = image.size
    scale = max(bw / iw, bh / ih)
    nw, nh = max(bw, round(iw * scale)), max(bh, round(ih * scale))
    resample = Image.LANCZOS if scale > 1 else Image.BOX
    image = image.resize((nw, nh), resample=resample)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


def prepare_control(variant: Variant, image: Image.Image, output_size: tuple[int, int], official: bool = False,
                    to_image_size: bool = False) -> tuple[Image.Image, Image.Image]:
    """(VAE image, vision-encoder image) for one control image."""
    sizes = control_sizes(variant, image.size, output_size, official, to_image_size)
    vae_img = resize(image, sizes.vae, sizes.exact)
    # diffusers resizes the VL image from the original, not from the VAE image
    vl_img = vae_img if sizes.vl == sizes.vae else resize(image, sizes.vl, sizes.exact)
    return vae_img, vl_img


def _floor(n: int, step: int) -> int:
    return n - n % step
