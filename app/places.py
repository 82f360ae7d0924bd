"""Which places on disk the app reads from or serves for a request: the data dir, the demo set, the folders of the
dataset configs the person saved or opened from the app, and folders the person listed in settings.json
(`"allowed_folders": [...]`). A request naming any other file is refused with one error naming the path and the
way to allow it, so no web request can read a file such as ~/.ssh/id_rsa or /etc/passwd through the app.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.spec.errors import EngineError

MAX_CONFIG_BYTES = 1 << 20        # a dataset config is a few KiB; anything larger is not one


class PlaceError(EngineError):
    kind = "place"


def allowed_roots(ctx) -> list[Path]:
    roots = [ctx.data_dir]
    if ctx.demo_dir is not None:
        roots.append(ctx.demo_dir)
    roots += [Path(p).parent for p in ctx.settings.get("dataset_configs", []) if p]
    roots += [Path(p).expanduser() for p in ctx.settings.get("allowed_folders", []) if p]
    return [_real(r) for r in roots]


def is_allowed(path: str | os.PathLike, roots: list[Path]) -> bool:
    """True when the real path (symlinks resolved, so a link cannot point outside) lies under one of the roots."""
    real = _real(Path(path).expanduser())
    return any(real == r or real.is_relative_to(r) for r in roots)


def dataset_config_file(ctx, path: str) -> Path:
    """The dataset config a person asked to open, or a PlaceError: a .toml file of at most 1 MiB in an allowed
    place."""
    text = (path or "").strip()
    if not text:
        raise PlaceError("no dataset config given.", "Type the path of a dataset .toml file.")
    target = Path(text).expanduser()
    if target.suffix.lower() != ".toml":
        raise PlaceError(f"{target}: a dataset config is a .toml file.", "Open a .toml file.")
    if not is_allowed(target, allowed_roots(ctx)):
        raise PlaceError(f"{target}: the app opens dataset configs only from its data folder ({ctx.data_dir}) and "
                         "the folders of configs saved from the Dataset tab.",
                         f"Copy it into {ctx.data_dir / 'datasets'}, or add its folder to \"allowed_folders\" in "
                         f"{ctx.data_dir / 'settings.json'}.")
    if not target.is_file():
        raise PlaceError(f"{target}: no such file.", "Check the path.")
    size = target.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise PlaceError(f"{target}: {size} bytes is too large for a dataset config (at most {MAX_CONFIG_BYTES}).",
                         "Open the dataset's .toml file.")
    return target


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()
