"""Aspect-ratio buckets and resizing, exactly as musubi-tuner does for Qwen-Image (16-px steps).

All sizes are (width, height). `resize_to_bucket` scales to cover the bucket (LANCZOS when enlarging, area
averaging when shrinking — musubi uses OpenCV's INTER_AREA, PIL's BOX filter is the same box average) and
then crops the centre; it and `area_bucket` come from `engine.spec.controls`, shared with inference.

Importable without torch.
"""

from __future__ import annotations

import math

from PIL import Image

# One implementation of musubi's area bucket and cover-crop, shared with inference's control sizing.
from engine.spec.controls import bucket_resolution, cover_crop

STEP = 16   # RESOLUTION_STEPS for qi / qie


def floor_to(n: int, step: int = STEP) -> int:
    return n - n % step


def bucket_list(resolution: tuple[int, int], step: int = STEP) -> list[tuple[int, int]]:
    """All buckets of about the resolution's area: widths from sqrt(area)/2 up to sqrt(area), both orientations."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    low = floor_to(side // 2, step)
    buckets = set()
    for w in range(low, side + step, step):
        h = floor_to(area // w, step)
        buckets.add((w, h))
        buckets.add((h, w))
    return sorted(buckets)


class BucketSelector:
    """Chooses the training size of one target image (musubi's BucketSelector)."""

    def __init__(self, resolution: tuple[int, int], enable_bucket: bool, no_upscale: bool, step: int = STEP):
        self.resolution = tuple(resolution)
        self.area = resolution[0] * resolution[1]
        self.step = step
        self.no_upscale = enable_bucket and no_upscale
        self.buckets = bucket_list(resolution, step) if enable_bucket else [self.resolution]

    def select(self, size: tuple[int, int]) -> tuple[int, int]:
        w, h = size
        if self.no_upscale and w * h <= self.area:
            return floor_to(w, self.step), floor_to(h, self.step)
        aspect = w / h
        # First minimum in sorted order, as numpy's argmin picks.
        return min(self.buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def area_bucket(size: tuple[int, int], area_resolution: tuple[int, int]) -> tuple[int, int]:
    """musubi's calculate_bucket_resolution(size, resolution): `size`'s aspect at `resolution`'s area."""
    return bucket_resolution(size, area_resolution[0] * area_resolution[1], STEP)


def control_size(size: tuple[int, int], target_bucket: tuple[int, int],
                 control_resolution: tuple[int, int] | None, no_resize_control: bool) -> tuple[int, int]:
    """The size a control image is cached at (musubi-tuner's rules: its own size floored to 16 px, the target's
    bucket, or the bucket of control_resolution's area, as no_resize_control and control_resolution say)."""
    native = (floor_to(size[0]), floor_to(size[1]))
    if control_resolution is None:
        return native if no_resize_control else tuple(target_bucket)
    if not no_resize_control:
        return area_bucket(size, control_resolution)
    limit = control_resolution[0] * control_resolution[1]
    return native if size[0] * size[1] <= limit else area_bucket(size, control_resolution)


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Cover-resize then centre-crop to exactly `bucket` (RGB; alpha dropped as musubi does for qi/qie)."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    return image if image.size == tuple(bucket) else cover_crop(image, tuple(bucket))
