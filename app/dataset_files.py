"""What the Dataset and Cache tabs do to files, kept apart from the widgets so it reads (and is tested) as plain
Python. Torch-free: only the engine's dataset schema, listing and checking modules are used.

The rules this module keeps:
- The user's images, captions and control folders are only ever read, except for a caption the user edits and
  explicitly saves: that `.txt` is replaced atomically and its previous text is kept first under
  `<data_dir>/caption_backups/`. Everything else we write (dataset configs, thumbnails, merged control folders
  of links, drafts) goes under the Studio's data dir.
- A dataset config is handled as its TOML text, exactly as it will be (or was) written to disk; the engine's own
  reader (`engine.spec.dataset.schema.load_dataset_config`) checks it, through a draft file when it is not saved yet.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import tomli_w
from PIL import Image

from engine.spec import imageio
from engine.spec.config import atomic_write_text
from engine.spec.dataset.check import report
from engine.spec.dataset.plan import build_plan
from engine.spec.dataset.schema import DEFAULT_CAPTION_EXTENSION, DatasetConfig, load_dataset_config
from engine.spec.dataset.sources import IMAGE_EXTENSIONS, Item, Problem, is_image, list_items
from engine.spec.errors import DatasetError

# Folder names people use for targets and controls (musubi examples, SimpleTuner's paired datasets, our demo).
TARGET_NAMES = ("images", "image", "targets", "target", "edited", "output")
CONTROL_PREFIXES = ("control", "conditioning", "reference", "source", "input")
THUMB_SIDE = 256
PREVIEW_SIDE = 768


# ------------------------------------------------------------------------------------------ folder layouts

def has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() and is_image(p) for p in folder.iterdir())


def detect_layout(folder: Path) -> tuple[Path, list[Path], list[str]]:
    """(image folder, control folders, notes) for a folder a user picks.

    Either the folder holds the targets (+ captions) itself, or it is a dataset root with a target subfolder
    (`images/`, `targets/` ...). Control folders are sub- or sibling folders named control*, conditioning*,
    reference* ... that hold images. Nothing is decided silently: each guess is returned as a note."""
    folder = folder.expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found.", "Give the folder that holds the training images.")
    notes = []
    image_dir = folder
    if not has_images(folder):
        sub = next((folder / n for n in TARGET_NAMES if has_images(folder / n)), None)
        if sub is None:
            raise DatasetError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, and in the "
                               f"subfolders {', '.join(TARGET_NAMES)}).", "Pick the folder with the target images.")
        image_dir = sub
        notes.append(f"target images: `{sub}`")
    candidates = [p for base in dict.fromkeys([image_dir, image_dir.parent]) for p in sorted(base.iterdir())
                  if p.is_dir() and p != image_dir and p.name.lower().startswith(CONTROL_PREFIXES) and has_images(p)]
    if candidates:
        notes.append("control folders found: " + ", ".join(f"`{p}`" for p in candidates)
                     + " (keep the one(s) you train with)")
    return image_dir, candidates, notes


def merged_control_folder(control_dirs: list[Path], stems: list[str], dest: Path) -> tuple[Path, list[str]]:
    """SimpleTuner's layout (one folder per control image, the same file name as the target in each) as
    musubi's (`<stem>_0.png`, `<stem>_1.png` in one folder): a folder of symbolic links under our data dir.
    The user's files are not copied or touched."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    missing = []
    for n, folder in enumerate(control_dirs):
        by_stem = {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and is_image(p)}
        for stem in stems:
            src = by_stem.get(stem)
            if src is None:
                missing.append(f"{folder}: no control image for '{stem}'")
                continue
            try:
                os.symlink(src.resolve(), tmp / f"{stem}_{n}{src.suffix.lower()}")
            except OSError as e:     # e.g. Windows without the right to make links
                shutil.rmtree(tmp, ignore_errors=True)
                raise DatasetError(f"{tmp}: cannot link the control images ({e}).",
                                   f"Put the control images in one folder as {stem}_0.png, {stem}_1.png ... and give "
                                   "only that folder.") from None
    if dest.exists():
        shutil.rmtree(dest)        # ours: a previous import's links
    os.replace(tmp, dest)
    return dest, missing


def safe_name(text: str, fallback: str = "dataset") -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return name or fallback


# ------------------------------------------------------------------------------------------ TOML text

def config_text(general: dict, dataset: dict) -> str:
    """musubi-tuner's dataset config as people write it: a `[general]` table and one `[[datasets]]` table (None
    values left out). tomli_w escapes the strings; sizes stay on one line (`resolution = [1024, 1024]`)."""
    sections = [("[general]", general), ("[[datasets]]", dataset)]
    text = "\n".join(header + "\n" + "".join(_toml_line(k, v) for k, v in values.items() if v is not None)
                     for header, values in sections)
    if tomllib.loads(text) != {"general": _clean(general), "datasets": [_clean(dataset)]}:
        raise ValueError(f"the dataset config text does not read back as written:\n{text}")   # a bug here
    return text


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _toml_line(key: str, value) -> str:
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return f"{key} = [{', '.join(str(v) for v in value)}]\n"
    return tomli_w.dumps({key: value})


@contextmanager
def draft_file(text: str, work_dir: Path):
    """The text as a file the engine's reader can open (unique per call; removed afterwards)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="draft-", suffix=".toml", dir=work_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def parse_config(text: str, work_dir: Path, shown_as: str) -> DatasetConfig:
    """The engine's reading of the text; errors name `shown_as` (the file it will be saved as), not the draft."""
    with draft_file(text, work_dir) as path:
        try:
            return load_dataset_config(path)
        except DatasetError as e:
            raise DatasetError(str(e.message).replace(str(path), shown_as), e.hint) from None


def check_report(text: str, version: str | None, work_dir: Path, shown_as: str) -> dict:
    """`engine.spec.dataset.check.report` of the text (what `check_dataset --json` prints), file names as the user sees them."""
    with draft_file(text, work_dir) as path:
        try:
            rep = report(build_plan(path, version or None))
        except DatasetError as e:
            raise DatasetError(str(e.message).replace(str(path), shown_as), e.hint) from None
    rep["dataset_config"] = shown_as
    for p in rep["problems"]:
        p["file"] = p["file"].replace(str(path), shown_as)
    return rep


def relative_path_note(config: DatasetConfig) -> str:
    """musubi resolves relative paths against the folder a command runs in; say which one that is here."""
    rel = [str(p) for s in config.datasets for p in (s.image_directory, s.image_jsonl_file, s.control_directory,
                                                     s.cache_directory) if p is not None and not p.is_absolute()]
    if not rel:
        return ""
    return (f"Relative paths ({', '.join(rel)}) are read from `{Path.cwd()}`, the folder the engine runs in. "
            "Absolute paths avoid surprises.")


def save_config(path: Path, text: str, backup_dir: Path) -> str | None:
    """Write the config atomically. An existing file with other content is kept under backup_dir first;
    returns the backup's path (None when there was nothing to keep)."""
    backup = None
    if path.is_file() and path.read_text(encoding="utf-8", errors="replace") != text:
        backup = _backup(path, backup_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return backup


# ------------------------------------------------------------------------------------------ items and captions

def dataset_items(config: DatasetConfig, index: int) -> tuple[list[Item], list[Problem]]:
    """The items of datasets[index] as listed from disk (captions and controls attached; nothing opened)."""
    spec = config.datasets[index]
    problems: list[Problem] = []
    return list_items(spec, problems, controls=True), problems


def find_item(config: DatasetConfig, index: int, stem: str) -> Item:
    if not 0 <= index < len(config.datasets):
        raise DatasetError(f"there is no datasets[{index}] in the config.", "Pick one of the listed datasets.")
    items, _ = dataset_items(config, index)
    for item in items:
        if item.stem == stem:
            return item
    raise DatasetError(f"datasets[{index}] has no image named '{stem}'.", "Pick an image from the gallery.")


def save_caption(config: DatasetConfig, index: int, stem: str, caption: str, backup_dir: Path) -> str:
    """Replace (atomically) the caption file of one listed item; the previous caption is kept first.
    Only caption files of the dataset's own images can be written: the path comes from the listing, not the
    caller. Returns a sentence for the user."""
    spec = config.datasets[index] if 0 <= index < len(config.datasets) else None
    if spec is not None and spec.image_jsonl_file is not None:
        raise DatasetError(f"{spec.image_jsonl_file}: captions of a JSONL dataset live in the JSONL file.",
                           "Edit the \"caption\" of that line in the JSONL file.")
    item = find_item(config, index, stem)
    path = item.image_path.with_name(item.stem + (spec.caption_extension or DEFAULT_CAPTION_EXTENSION))
    text = caption.strip()
    old = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    if old is not None and old.strip() == text:
        return f"`{path.name}` already says this; nothing written."
    backup = _backup(path, backup_dir) if old is not None else None
    atomic_write_text(path, text + "\n")
    kept = f" The previous caption is kept in `{backup}`." if backup else " (It had no caption file before.)"
    return f"Saved `{path}`.{kept}"


def _backup(path: Path, backup_dir: Path) -> str:
    """A copy of `path` under backup_dir, named so that several files of the same name never collide."""
    digest = hashlib.sha1(str(path.parent.resolve()).encode()).hexdigest()[:8]
    folder = backup_dir / f"{safe_name(path.parent.name)}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
    dest = folder / f"{path.name}.{stamp}.bak"
    shutil.copy2(path, dest)
    return str(dest)


# ------------------------------------------------------------------------------------------ pictures

def picture(path: Path, cache_dir: Path, max_side: int = THUMB_SIDE, min_side: int = 0) -> str | None:
    """A downscaled copy of an image in our cache (Gradio only serves files from folders it is allowed to;
    the user's folder is not one, and a full-size copy of every image would be slow). None when unreadable.
    `min_side`: tiny images are enlarged by a whole factor (nearest pixel) so they can be looked at."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{max_side}|{min_side}".encode()).hexdigest()
    dest = cache_dir / f"{key}.png"
    if dest.is_file():
        return str(dest)
    try:
        with imageio.open_image(path) as img:
            img.load()
            img = img.convert("RGBA") if "A" in img.getbands() else imageio.to_rgb(img)
            img.thumbnail((max_side, max_side))
            if max(img.size) < min_side:
                factor = -(-min_side // max(img.size))
                img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            img.save(tmp, format="PNG")
            os.replace(tmp, dest)
    except (imageio.ImageError, *imageio.READ_ERRORS):
        return None
    return str(dest)
