"""Captions written by the model: which items get one, the review file of proposals, and accepting a proposal.

Torch-free, so the app's review list and the engine's `caption_images` share it.

- An item of a dataset with control images gets an **edit instruction** (the model sees the controls and the
  target); an item without gets a plain **caption**.
- Where a caption goes: `<image stem><caption_extension>` next to the image for a folder dataset; the item's
  line (its `"caption"` key) for a JSONL dataset.
- A **review file** is JSON lines, one proposal per item (`Proposal.as_dict`), rewritten atomically after each
  item, so a stopped run leaves a readable file and a rerun continues after the items it holds.
- **Accepting** writes the caption atomically; the file it replaces is first copied to a backup folder
  (`.caption_backups/` beside it unless a folder is given). Nothing else writes a user's caption.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.spec.config import atomic_write_text
from engine.spec.dataset.schema import DatasetConfig, DatasetSpec
from engine.spec.dataset.sources import Item, Problem, list_items
from engine.spec.errors import DatasetError

BACKUP_FOLDER = ".caption_backups"
REVIEW_FILE = "captions_review.jsonl"
VL_PIXELS_PER_TOKEN = 28 * 28     # Qwen2.5-VL: 14-px patches merged 2×2
VL_MIN_SIDE = 56                  # the image processor's min_pixels is 56×56
PENDING, ACCEPTED, REJECTED = "pending", "accepted", "rejected"


@dataclass
class CaptionTarget:
    """One item to caption: its images, where its caption lives and what it says now."""
    dataset: int
    stem: str
    image_path: Path
    control_paths: list[Path]
    current: str | None            # the caption on disk now (None: none)
    write_to: Path                 # the caption file, or the JSONL file holding the item's line
    in_jsonl: bool

    @property
    def kind(self) -> str:
        return "edit" if self.control_paths else "caption"


@dataclass
class Proposal:
    """One caption the model wrote, waiting for the person's decision (a line of the review file)."""
    dataset: int
    stem: str
    kind: str
    image_path: str
    control_paths: list[str]
    write_to: str
    in_jsonl: bool
    previous: str | None           # the caption on disk when the proposal was made
    caption: str
    status: str = PENDING
    backup: str | None = None      # where the replaced caption was kept, once accepted
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, data: dict) -> "Proposal":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @property
    def key(self) -> tuple[int, str]:
        return (self.dataset, self.stem)


# ------------------------------------------------------------------------------------------ instructions

STYLE_PROMPTS = {
    "short": "Write a one-sentence caption for this image, as a prompt for a text-to-image model: name the main "
             "subject, the setting and the style. Reply with the caption only.",
    "detailed": "Describe this image in one detailed paragraph, as a prompt for a text-to-image model: the subjects "
                "and their appearance, the setting, the composition, the lighting, the colours and the style. "
                "Reply with the description only.",
    "tags": "List tags for this image, as for a text-to-image dataset: comma-separated, most important first "
            "(subject, attributes, setting, style). Reply with the tags only.",
}

EDIT_PROMPT = (
    "The first {n_controls} image(s) are the input of an image edit; the last image is the result. Write the "
    "instruction that turns the input into the result, as one short imperative sentence (for example: Make the "
    "sky orange). Describe only what changes. Reply with the instruction only."
)


def instruction(kind: str, style: str, n_controls: int, custom: str | None = None) -> str:
    """The instruction for one item: the person's --caption_prompt, or the built-in one for its kind/style."""
    template = custom if (custom or "").strip() else (EDIT_PROMPT if kind == "edit" else STYLE_PROMPTS[style])
    return template.replace("{n_controls}", str(n_controls))


# ------------------------------------------------------------------------------------------ what to caption

def caption_targets(config: DatasetConfig) -> tuple[list[CaptionTarget], list[Problem]]:
    """Every item of every dataset in the config, with where its caption goes. Listing only (nothing opened)."""
    problems: list[Problem] = []
    out = []
    for spec in config.datasets:
        for item in list_items(spec, problems, controls=True):
            out.append(_target(spec, item))
    return out, problems


def _target(spec: DatasetSpec, item: Item) -> CaptionTarget:
    if spec.image_jsonl_file is not None:
        return CaptionTarget(spec.index, item.stem, item.image_path, list(item.control_paths), item.caption,
                             spec.image_jsonl_file, True)
    path = item.image_path.with_name(item.stem + spec.caption_extension)
    return CaptionTarget(spec.index, item.stem, item.image_path, list(item.control_paths), item.caption, path, False)


def has_caption(target: CaptionTarget) -> bool:
    return bool((target.current or "").strip())


def vl_size(size: tuple[int, int], area: int) -> tuple[int, int]:
    """(W, H) an image is resized to before the vision encoder: at most `area` pixels (never enlarged beyond its
    own size except up to the encoder's minimum), both sides multiples of 28, so it becomes exactly
    W·H / 784 vision tokens (the processor then leaves it as it is)."""
    w, h = size
    scale = min(1.0, math.sqrt(area / max(w * h, 1)))
    side = int(math.sqrt(VL_PIXELS_PER_TOKEN))

    def snap(n: float) -> int:
        return max(VL_MIN_SIDE, int(n / side + 1e-6) * side)     # the epsilon: 83.99999 pixels are 84

    return snap(w * scale), snap(h * scale)


def vl_tokens(size: tuple[int, int]) -> int:
    return size[0] * size[1] // VL_PIXELS_PER_TOKEN


# ------------------------------------------------------------------------------------------ review file

def read_review(path: str | os.PathLike) -> list[Proposal]:
    """The proposals of a review file ([] when it does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(Proposal.of(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise DatasetError(f"{path}:{n}: not a caption proposal ({e}).",
                               "This file is written by caption_images; run it again with a new review file.") from e
    return out


def write_review(path: str | os.PathLike, proposals: list[Proposal]) -> None:
    text = "".join(json.dumps(p.as_dict(), ensure_ascii=False) + "\n" for p in proposals)
    atomic_write_text(path, text)


def add_proposal(path: str | os.PathLike, proposal: Proposal) -> None:
    """Append one proposal. The file is read again first: the person may have accepted or rejected proposals in
    the app while the run goes on, and those decisions must survive the engine's next write."""
    write_review(path, [*read_review(path), proposal])


# ------------------------------------------------------------------------------------------ writing captions

def backup_file(path: Path, backup_dir: str | os.PathLike | None = None, per_folder: bool = False) -> Path:
    """Copy `path` into the backup folder (default `.caption_backups/` beside it) under a unique name.
    per_folder: one subfolder of backup_dir per caption folder (named after it), so the app can keep the copies of
    every dataset in its own data dir without mixing files of the same name."""
    folder = Path(backup_dir) if backup_dir else path.parent / BACKUP_FOLDER
    if backup_dir and per_folder:
        parent = path.parent.resolve()
        folder = folder / f"{parent.name or 'root'}-{hashlib.sha1(str(parent).encode()).hexdigest()[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
    dest = folder / f"{path.name}.{stamp}.bak"
    shutil.copy2(path, dest)
    return dest


def write_caption(write_to: str | os.PathLike, image_path: str | os.PathLike, text: str, in_jsonl: bool,
                  backup_dir: str | os.PathLike | None = None, per_folder: bool = False) -> Path | None:
    """Write one caption atomically; the file it replaces is backed up first. Returns the backup (None when no
    file with other content was replaced)."""
    path, text = Path(write_to), text.strip()
    if in_jsonl:
        return _write_jsonl_caption(path, str(image_path), text, backup_dir, per_folder)
    old = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    if old is not None and old.strip() == text:
        return None
    backup = backup_file(path, backup_dir, per_folder) if old is not None else None
    atomic_write_text(path, text + "\n")
    return backup


def _write_jsonl_caption(path: Path, image_path: str, text: str, backup_dir, per_folder: bool) -> Path | None:
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue                      # a broken line stays as it is; check_dataset reports it
        if isinstance(obj, dict) and isinstance(obj.get("image_path"), str) and \
                Path(obj["image_path"]) == Path(image_path):
            if (obj.get("caption") or "").strip() == text:
                return None
            obj["caption"] = text
            lines[i] = json.dumps(obj, ensure_ascii=False)
            backup = backup_file(path, backup_dir, per_folder)
            atomic_write_text(path, "\n".join(lines) + "\n")
            return backup
    raise DatasetError(f"{path}: no line with image_path {image_path!r} any more.",
                       "The JSONL file changed since the captions were made; caption it again.")


def accept(review_path: str | os.PathLike, decisions: dict[tuple[int, str], str | None],
           backup_dir: str | os.PathLike | None = None, per_folder: bool = False) -> list[Proposal]:
    """Apply the person's decisions to a review file: key → the caption text to write (accept, possibly edited)
    or None (reject). Each accepted caption is written (with a backup of what it replaces), then the review file
    records the decision. Returns the proposals that changed (a proposal is decided once)."""
    changed = []
    for key, text in decisions.items():
        decided = _decide(review_path, key, text, backup_dir, per_folder)
        if decided is not None:
            changed.append(decided)
    return changed


def _decide(review_path, key: tuple[int, str], text: str | None, backup_dir, per_folder: bool) -> Proposal | None:
    # read, change one proposal, write: a run still adding proposals to the file loses nothing
    proposals = read_review(review_path)
    p = next((p for p in proposals if p.key == key and p.status == PENDING), None)
    if p is None:
        return None
    if text is None:
        p.status = REJECTED
    else:
        backup = write_caption(p.write_to, p.image_path, text, p.in_jsonl, backup_dir, per_folder)
        p.caption, p.status, p.backup = text.strip(), ACCEPTED, str(backup) if backup else None
    write_review(review_path, proposals)       # after the caption: the file never claims what is not on disk
    return p
