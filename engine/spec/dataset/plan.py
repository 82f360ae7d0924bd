"""The dataset plan: every item with its size, bucket and control sizes, plus every problem found.

`build_plan` is the one place that reads the dataset (config, folders, captions, image headers) before any model
loads. Caching refuses to start while the plan has errors; `check_dataset` prints it. Nothing is written.

Importable without torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.spec import imageio
from engine.spec.dataset.buckets import BucketSelector, control_size
from engine.spec.dataset.schema import DatasetConfig, DatasetSpec, load_dataset_config
from engine.spec.dataset.masks import attach_masks, check_mask
from engine.spec.dataset.sources import Item, Problem, list_items
from engine.spec.errors import DatasetError
from engine.spec.variants import get_variant

MIN_SIDE = 16


@dataclass
class PlannedItem:
    item: Item
    spec: DatasetSpec
    size: tuple[int, int]                  # original target size (W, H): part of the cache file name
    bucket: tuple[int, int]                # training size of the target
    control_sizes: list[tuple[int, int]] = field(default_factory=list)     # original control sizes
    control_buckets: list[tuple[int, int]] = field(default_factory=list)   # cached control sizes

    @property
    def stem(self) -> str:
        return self.item.stem


@dataclass
class DatasetPlan:
    spec: DatasetSpec
    items: list[PlannedItem]
    skipped: list[Item] = field(default_factory=list)   # no caption, allowed by allow_missing_captions


@dataclass
class Plan:
    config: DatasetConfig
    model_version: str | None      # None: not told; controls are checked when present but not required
    datasets: list[DatasetPlan]
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    def items(self) -> list[PlannedItem]:
        return [it for d in self.datasets for it in d.items]

    def histogram(self) -> dict[str, int]:
        """Bucket → number of items (with num_repeats), e.g. {"1024x1024": 12}."""
        counts: Counter = Counter()
        for d in self.datasets:
            for it in d.items:
                counts[f"{it.bucket[0]}x{it.bucket[1]}"] += d.spec.num_repeats
        return dict(sorted(counts.items()))

    def raise_if_errors(self) -> None:
        if self.errors:
            listing = "\n".join(f"- {p}" for p in self.errors[:20])
            more = f"\n... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
            raise DatasetError(f"the dataset has {len(self.errors)} problem(s):\n{listing}{more}",
                               "Fix them (python -m engine check_dataset shows the full report), then run again.")


def build_plan(dataset_config: str | Path, model_version: str | None = None) -> Plan:
    """Read and check everything; config-level errors raise DatasetError, item-level ones are collected."""
    config = load_dataset_config(dataset_config)
    problems = [Problem(str(config.path), w, "Update the dataset config.", level="warning")
                for w in config.warnings]
    edit = get_variant(model_version).is_edit if model_version else None
    datasets = [_plan_dataset(spec, edit, model_version, problems) for spec in config.datasets]
    return Plan(config, model_version, datasets, problems)


def _plan_dataset(spec: DatasetSpec, edit: bool | None, version: str | None, problems: list[Problem]) -> DatasetPlan:
    items = list_items(spec, problems, controls=edit is not False)
    if spec.mask_directory is not None:
        attach_masks(items, spec.mask_directory, problems)
    if edit is False and spec.control_directory is not None:
        problems.append(Problem(str(spec.control_directory), "control images are ignored for the text-to-image "
                                "model (--model_version original)", "Pass --model_version edit / edit-2509 / "
                                "edit-2511 to train an edit model.", level="warning"))
    selector = BucketSelector(spec.resolution, spec.enable_bucket, spec.bucket_no_upscale)
    plan = DatasetPlan(spec, [])
    for item in items:
        if item.caption is None:
            _missing_caption(item, spec, plan, problems)
            if not spec.allow_missing_captions:
                image_size(item.image_path, problems)     # a broken image is named now, not after its caption
            continue
        planned = _plan_item(item, spec, selector, edit, problems)
        if planned is not None:
            plan.items.append(planned)
    if edit and version == "edit":
        _warn_extra_controls(plan, problems)
    return plan


def _missing_caption(item: Item, spec: DatasetSpec, plan: DatasetPlan, problems: list[Problem]) -> None:
    expected = item.image_path.with_name(item.stem + spec.caption_extension)
    if not spec.image_jsonl_file and expected.is_file():
        return           # there but unreadable: its reader (sources._read_caption) reported it, once
    where = str(item.image_path) if spec.image_jsonl_file else str(expected)
    if spec.allow_missing_captions:
        plan.skipped.append(item)
        problems.append(Problem(where, "no caption; the image is skipped (allow_missing_captions = true)",
                                "Write the caption file to train on this image.", level="warning"))
    else:
        what = "has no \"caption\"" if spec.image_jsonl_file else "caption file is missing"
        problems.append(Problem(where, f"{what} for {item.image_path.name}",
                                f"Write the caption into {expected.name}, or set allow_missing_captions = true "
                                "in the dataset config to skip uncaptioned images (musubi skips them silently)."))


def _plan_item(item: Item, spec: DatasetSpec, selector: BucketSelector, edit: bool | None,
               problems: list[Problem]) -> PlannedItem | None:
    start = len(problems)
    size = image_size(item.image_path, problems)
    controls = [(p, image_size(p, problems)) for p in item.control_paths]
    if size is None or any(s is None for _, s in controls):
        return None
    if edit and not controls:
        where = spec.control_directory or spec.image_jsonl_file
        problems.append(Problem(str(item.image_path), f"no control image in {where}",
                                f"Add {item.stem}.png (or {item.stem}_0.png, {item.stem}_1.png, ...) to the control "
                                "folder, or control_path in the JSONL line."))
        return None
    check_mask(item, size, problems)
    bucket = selector.select(size)
    _check_size(item.image_path, size, bucket, spec, problems)
    buckets = [control_size(s, bucket, spec.control_resolution, spec.no_resize_control) for _, s in controls]
    for (path, s), b in zip(controls, buckets):
        _check_size(path, s, b, spec, problems, control=True)
    if any(p.level == "error" for p in problems[start:]):
        return None
    return PlannedItem(item, spec, size, bucket, [s for _, s in controls], buckets)


def image_size(path: Path, problems: list[Problem]) -> tuple[int, int] | None:
    """Fully decode the image once, so a truncated, corrupt or oversized file is one problem of that file now,
    not a failure mid-caching (engine/spec/imageio.py)."""
    try:
        return imageio.decoded_size(path)
    except imageio.ImageError as e:
        problems.append(Problem(str(path), e.message.removeprefix(f"{path}: ").rstrip("."), e.hint))
    return None


def _check_size(path: Path, size: tuple[int, int], bucket: tuple[int, int], spec: DatasetSpec,
                problems: list[Problem], control: bool = False) -> None:
    if min(size) < MIN_SIDE or min(bucket) < MIN_SIDE:
        problems.append(Problem(str(path), f"is {size[0]}x{size[1]}; the smallest usable side is {MIN_SIDE} px",
                                "Use a larger image."))
    elif size[0] < bucket[0] or size[1] < bucket[1]:
        kind = "control image" if control else "image"
        fix = ("Use a larger image, lower resolution, or set bucket_no_upscale = true to train at the image's "
               "own size." if not control else "Use a larger control image or set control_resolution / "
               "no_resize_control.")
        problems.append(Problem(str(path), f"{kind} is {size[0]}x{size[1]}, smaller than its bucket "
                                f"{bucket[0]}x{bucket[1]}; it will be upscaled", fix, level="warning"))


def _warn_extra_controls(plan: DatasetPlan, problems: list[Problem]) -> None:
    many = [it for it in plan.items if len(it.control_buckets) > 1]
    if many:
        problems.append(Problem(str(plan.spec.control_directory or plan.spec.image_jsonl_file),
                                f"{len(many)} target(s) have several control images; Qwen-Image-Edit (v1) gives "
                                "only the first to the text encoder (all are VAE-encoded)",
                                "Use --model_version edit-2509 or edit-2511 for multi-image editing.",
                                level="warning"))
