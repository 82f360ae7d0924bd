"""Where training items come from: an image folder (+ caption files + control folder) or a JSONL file.

Listing never opens an image (that is validation's job) and never writes anything. Each problem found is
collected as a `Problem` (file, what is wrong, how to fix it) instead of stopping at the first one, so
`check_dataset` can show them all.

Control matching follows musubi-tuner: for a target `a.png` the controls are the files in control_directory
named `a.<ext>` or `a_<digits>.<ext>` (`a_0.png`, `a_1.png`, `a_0000.png`, any count, sizes may differ).
The exact `a.*` comes first, then by the integer suffix. Longer target stems claim their files first, so
target `a_1` takes `a_1.png` before target `a` could read it as control number 1 of `a`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.spec.dataset.schema import DatasetSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")


@dataclass
class Problem:
    file: str          # the file (or folder/config) the problem is about
    message: str       # what is wrong
    fix: str           # how to fix it
    level: str = "error"   # error | warning

    def as_dict(self) -> dict:
        return {"level": self.level, "file": self.file, "message": self.message, "fix": self.fix}

    def __str__(self) -> str:
        return f"{self.file}: {self.message}\n  fix: {self.fix}"


@dataclass
class Item:
    stem: str                      # cache key: the target's file name without extension
    image_path: Path
    caption: str | None            # None: no caption found
    caption_path: Path | None      # None for JSONL captions (they live in the JSONL file)
    control_paths: list[Path] = field(default_factory=list)
    mask_path: Path | None = None  # loss mask (mask_directory), None: the whole image trains


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_items(spec: DatasetSpec, problems: list[Problem], controls: bool = True) -> list[Item]:
    """All items of one dataset, with captions and (unless `controls` is false) control images attached."""
    if spec.image_jsonl_file:
        items = _jsonl_items(spec.image_jsonl_file, problems)
        if not controls:
            for item in items:
                item.control_paths = []
    else:
        items = _directory_items(spec, problems)
        if controls and spec.control_directory is not None:
            _attach_controls(items, spec.control_directory, problems)
    _check_duplicate_stems(items, spec, problems)
    return items


def _directory_items(spec: DatasetSpec, problems: list[Problem]) -> list[Item]:
    folder = spec.image_directory
    if not folder.is_dir():
        problems.append(Problem(str(folder), f"image_directory of {spec.label} does not exist"
                                if not folder.exists() else "image_directory is not a folder",
                                "Fix image_directory in the dataset config (relative paths start at the "
                                "folder you run the command from)."))
        return []
    items = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_image(p)):
        caption_path = path.with_name(path.stem + spec.caption_extension)
        caption = _read_caption(caption_path, problems) if caption_path.is_file() else None
        items.append(Item(path.stem, path, caption, caption_path if caption is not None else None))
    if not items:
        problems.append(Problem(str(folder), "no images found (looked for "
                                + ", ".join(IMAGE_EXTENSIONS) + ")", "Put the target images in this folder."))
    return items


def _read_caption(path: Path, problems: list[Problem]) -> str | None:
    """The caption text; a UTF-8 BOM (Notepad writes one) is dropped, not trained on. Unreadable: one problem
    (the plan then skips the item silently instead of also calling the caption missing)."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        problems.append(Problem(str(path), f"caption file is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                                f"position {e.start})", "Save it as UTF-8 text (in most editors: Save as → "
                                "Encoding: UTF-8)."))
    except OSError as e:
        problems.append(Problem(str(path), f"caption file cannot be read ({e.strerror or e})",
                                "Check the file's permissions."))
    return None


def _attach_controls(items: list[Item], control_dir: Path, problems: list[Problem]) -> None:
    if not control_dir.is_dir():
        problems.append(Problem(str(control_dir), "control_directory does not exist",
                                "Fix control_directory in the dataset config, or remove it for text-to-image."))
        return
    pool = {p.name: p for p in control_dir.iterdir() if p.is_file() and is_image(p)}
    for item in sorted(items, key=lambda it: len(it.stem), reverse=True):
        item.control_paths = _claim_controls(item.stem, pool, problems)
    for name in sorted(pool):
        problems.append(Problem(str(pool[name]), "control image matches no target image",
                                "Name it <target stem>.png or <target stem>_<number>.png, or remove it.",
                                level="warning"))


def _claim_controls(stem: str, pool: dict[str, Path], problems: list[Problem]) -> list[Path]:
    """Take the files for `stem` out of the pool, ordered: `stem.*` first, then by numeric suffix."""
    ordered: list[tuple[int, Path]] = []
    for name in list(pool):
        path = pool[name]
        if path.stem == stem:
            ordered.append((-1, path))
        elif name.startswith(stem + "_"):
            suffix = path.stem[len(stem) + 1:]
            if not suffix.isdigit():
                problems.append(Problem(str(path), f"control image for '{stem}' has a non-numeric suffix "
                                        f"'{suffix}'", f"Rename it {stem}_0{path.suffix}, {stem}_1{path.suffix}, ..."))
            else:
                ordered.append((int(suffix), path))
        else:
            continue
        del pool[name]
    ordered.sort(key=lambda t: t[0])
    _check_duplicate_suffixes(stem, ordered, problems)
    return [p for _, p in ordered]


def _check_duplicate_suffixes(stem: str, ordered: list[tuple[int, Path]], problems: list[Problem]) -> None:
    seen: dict[int, Path] = {}
    for number, path in ordered:
        if number in seen:
            problems.append(Problem(str(path), f"control image for '{stem}' has the same number as "
                                    f"{seen[number].name}, so their order is ambiguous",
                                    "Give each control image of a target its own number."))
        seen[number] = path


_CONTROL_KEY = re.compile(r"^control_path(?:_(\d+))?$")


def _jsonl_items(path: Path, problems: list[Problem]) -> list[Item]:
    if not path.is_file():
        problems.append(Problem(str(path), "image_jsonl_file does not exist", "Fix image_jsonl_file."))
        return []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        problems.append(Problem(str(path), f"image_jsonl_file is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                                f"position {e.start})", "Save it as UTF-8 text."))
        return []
    except OSError as e:
        problems.append(Problem(str(path), f"image_jsonl_file cannot be read ({e.strerror or e})",
                                "Check the file's permissions."))
        return []
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item = _jsonl_item(f"{path}:{n}", line, problems)
        if item is not None:
            items.append(item)
    return items


def _jsonl_item(where: str, line: str, problems: list[Problem]) -> Item | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        problems.append(Problem(where, f"not valid JSON ({e.msg})",
                                'Each line is one object: {"image_path": "...", "caption": "..."}.'))
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("image_path"), str):
        problems.append(Problem(where, "no image_path", 'Add "image_path": "path/to/image.png".'))
        return None
    controls: list[tuple[int, str]] = []
    for key, value in obj.items():
        m = _CONTROL_KEY.match(key)
        if m:
            controls.append((int(m.group(1)) if m.group(1) else -1, value))  # control_path == control_path_0
        elif key not in ("image_path", "caption"):
            problems.append(Problem(where, f"unknown key '{key}'", "Use image_path, caption, control_path or "
                                    "control_path_<N>.", level="warning"))
    controls.sort(key=lambda t: t[0])
    caption = obj.get("caption")
    image = Path(obj["image_path"])
    return Item(image.stem, image, caption.strip() if isinstance(caption, str) else None, None,
                [Path(c) for _, c in controls])


def _check_duplicate_stems(items: list[Item], spec: DatasetSpec, problems: list[Problem]) -> None:
    """Cache files are named after the stem: two targets `a.png` and `a.jpg` would overwrite each other."""
    seen: dict[str, Item] = {}
    for item in items:
        if item.stem in seen:
            problems.append(Problem(str(item.image_path), f"has the same name stem as {seen[item.stem].image_path}"
                                    f" in {spec.label}; their cache files would collide",
                                    "Rename one of them."))
        seen.setdefault(item.stem, item)
