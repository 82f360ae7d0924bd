"""The one way images are read: every dataset check, cache run, control image, mask and import goes through here.

- 16-bit and float images are scaled to 8 bits by their real range: Pillow's `convert("RGB")` clips a 16-bit
  grayscale PNG (`I;16`, or `I` once loaded) at 255, so nearly every pixel would become white, and a float
  (`F`) image in 0..1 would become black. Here `I;16*` divides by 257 (65535 → 255), `I` by 257 when its values
  exceed 8 bits, and `F` maps 0..1 (or 0..255 when its values are larger) onto 0..255.
- An image larger than MAX_PIXELS (a decompression bomb: a few KB that decode to gigabytes) is refused from
  its header, before decoding, with the limit stated. The dataset check and the import report it as a problem
  of that one file; nothing else stops.
- Every failure is one `ImageError` naming the file, the cause and the fix.

API: `read_rgb(path)`, `open_image(path)`, `rgb_from_bytes(data, name)`, `image_size(path)`, `decoded_size(path)`,
`to_rgb(image)`, `MAX_PIXELS`.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.spec.errors import EngineError

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485   # Pillow's own bomb threshold (~9459² px); images are resized
                                                   # to ~1 MP for training and editing anyway
READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
FIX = "Re-export the image as an 8-bit PNG or JPEG, or remove it."


class ImageError(EngineError):
    kind = "image"


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the header only; refuses a missing, unreadable or oversized image."""
    with open_image(path) as img:
        return img.size


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """The whole image decoded and converted to 8-bit RGB."""
    with open_image(path) as img:
        return _decode(img, path)


def decoded_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after decoding every pixel once, so a truncated or corrupt file is caught now."""
    with open_image(path) as img:
        try:
            img.load()
        except READ_ERRORS as e:
            raise ImageError(f"{path}: cannot be read as an image ({type(e).__name__}: {e}).", FIX) from None
        return img.size


def rgb_from_bytes(data: bytes, name: str | os.PathLike) -> Image.Image:
    """The same from bytes already read (the caching prefetch reads files in threads); `name` is for messages."""
    with open_image(io.BytesIO(data), name) as img:
        return _decode(img, name)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. High bit-depth and float modes are scaled by their range (not clipped); other modes go through
    Pillow's convert (alpha dropped, palette and grey expanded), as musubi-tuner does."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    return img.convert("RGB") if mode != "RGB" else img.copy()


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.float64)
    if mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
    elif mode.startswith("I;16"):
        scale = 1 / 257
    else:                                          # "I": 32-bit ints; 16-bit PNGs open as I in some Pillow versions
        top = a.max() if a.size else 0
        scale = 1.0 if top <= 255 else 1 / 257 if top <= 65535 else 255.0 / top
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


def open_image(source, name=None) -> Image.Image:
    """The opened (not yet decoded) image, its size checked against MAX_PIXELS; for callers that only read a
    part (thumbnails) — everything else uses read_rgb."""
    name = name if name is not None else source
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise ImageError(f"{name}: image file not found.", "Fix the path, or remove the entry.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our own limit follows
            img = Image.open(source)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {_bomb_text(e)}", FIX) from None
    except READ_ERRORS as e:
        raise ImageError(f"{name}: cannot be read as an image ({type(e).__name__}: {e}).", FIX) from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise ImageError(f"{name}: is {w}x{h} = {w * h:,} pixels, above the limit of {MAX_PIXELS:,} pixels "
                         "(a decompression bomb, or far larger than training or editing needs).",
                         "Downscale it (any image is resized to about 1 megapixel anyway), or remove it.")
    return img


def _bomb_text(e: Exception) -> str:
    return (f"is too large to decode safely ({e}); the limit is {MAX_PIXELS:,} pixels (decompression-bomb "
            "protection).")


def _decode(img: Image.Image, name) -> Image.Image:
    try:
        img.load()
        return to_rgb(img)
    except READ_ERRORS as e:
        raise ImageError(f"{name}: cannot be read as an image ({type(e).__name__}: {e}).", FIX) from None
