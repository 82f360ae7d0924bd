"""What the two caching commands share: checks before any model loads, the skip/encode decision, progress,
atomic writes, leftover clean-up and the removal of cache files the dataset no longer produces.

Resumable: every cache file is written to a temp file in the same folder and renamed into place
(`save_file_atomic`), so a killed run leaves whole files only; the next run with --skip_existing encodes
just what is missing or stale. Temp files a killed run left behind are removed at the start.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from PIL import Image

from engine.spec import imageio, naming
from engine.spec.dataset.cache_files import EntryStatus, is_our_cache_file
from engine.spec.dataset.plan import Plan, PlannedItem, build_plan
from engine.spec.errors import OptionError
from engine.spec.variants import Variant, get_variant

log = logging.getLogger(__name__)

TEMP_MARK = ".safetensors.tmp-"   # save_file_atomic's temp names: .<name>.safetensors.tmp-<pid>


def prepare(cfg, model_option: str) -> tuple[Plan, Variant]:
    """Option and dataset checks; raises before any model is loaded."""
    if not cfg.dataset_config:
        raise OptionError("--dataset_config is required.", "Pass the dataset TOML (musubi-tuner schema).")
    if not getattr(cfg, model_option):
        raise OptionError(f"--{model_option} is required.", f"Pass the {model_option.replace('_', ' ')} weights "
                          "(see the download table: python -m engine inspect_model --help).")
    version = cfg.resolved_version()
    plan = build_plan(cfg.dataset_config, version)
    for p in plan.warnings:
        log.warning("%s: %s", p.file, p.message)
    plan.raise_if_errors()
    return plan, get_variant(version)


def remove_leftover_temps(plan: Plan, arch: str) -> None:
    for folder in _cache_dirs(plan):
        for path in folder.glob(f".*_{arch}*{TEMP_MARK}*"):
            log.info("removing the temp file of an interrupted run: %s", path)
            path.unlink(missing_ok=True)


def pending(items: list[PlannedItem], status: Callable[[PlannedItem], EntryStatus],
            skip_existing: bool) -> list[PlannedItem]:
    """Items to encode: all of them, or with --skip_existing only those missing or stale (reason logged)."""
    if not skip_existing:
        return list(items)
    todo = []
    for item in items:
        st = status(item)
        if st.state != "ok":
            if st.state == "stale":
                log.info("re-caching %s: %s", st.path.name, st.reason)
            todo.append(item)
    log.info("%d of %d entries up to date; %d to encode", len(items) - len(todo), len(items), len(todo))
    return todo


class Progress:
    def __init__(self, events, total: int, unit: str):
        self.events, self.total, self.unit = events, total, unit
        self.done, self.started = 0, time.time()

    def advance(self, n: int = 1) -> None:
        self.done += n
        elapsed = time.time() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        self.events.progress(self.done, self.total, unit=self.unit, eta_s=round(eta, 1) if eta is not None else None)


def remove_unused(plan: Plan, arch: str, produced: Iterable[Path], keep_cache: bool,
                  kind_filter: Callable[[Path], bool]) -> list[Path]:
    """Remove our cache files (only names matching our pattern for this arch and kind) that the current dataset
    does not produce. Never touches anything else in the folder."""
    if keep_cache:
        return []
    keep = {p.resolve() for p in produced}
    removed = []
    for folder in _cache_dirs(plan):
        for path in sorted(folder.glob(f"*_{arch}*.safetensors")):
            if is_our_cache_file(path, arch) and kind_filter(path) and path.resolve() not in keep:
                log.info("removing a cache file the dataset no longer produces: %s", path)
                path.unlink()
                removed.append(path)
    return removed


def is_text_file(path: Path) -> bool:
    return naming.is_text_cache_name(path.name)


def _cache_dirs(plan: Plan) -> list[Path]:
    return [d.spec.cache_directory for d in plan.datasets if d.spec.cache_directory.is_dir()]


def open_rgb(data: bytes, name: str | Path = "image") -> Image.Image:
    """Decode image bytes to 8-bit RGB (alpha dropped, palette/grey converted as musubi does for qi/qie; 16-bit
    and float images scaled by their range): engine/spec/imageio.py, the one image reader."""
    return imageio.rgb_from_bytes(data, name)


T = TypeVar("T")
R = TypeVar("R")


def prefetch(batches: list[T], load: Callable[[T], R], workers: int | None) -> Iterator[tuple[T, R]]:
    """Yield (batch, load(batch)) in order while up to `workers` later batches load in threads (image decoding
    and hashing overlap the encoder). Bounded, so a large dataset is never held in memory at once."""
    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue: deque = deque()
        it = iter(batches)
        for batch in it:
            queue.append((batch, pool.submit(load, batch)))
            if len(queue) > workers:
                done, future = queue.popleft()
                yield done, future.result()
        while queue:
            done, future = queue.popleft()
            yield done, future.result()


def batches_by_shape(items: list[PlannedItem], batch_size: int | None) -> list[list[PlannedItem]]:
    """Items of one dataset and bucket go together (one forward per batch); the dataset's batch size unless the
    command says otherwise."""
    groups: dict[tuple, list[PlannedItem]] = {}
    for item in items:
        groups.setdefault((item.spec.index, item.bucket), []).append(item)
    out = []
    for (_, _), group in groups.items():
        size = batch_size or group[0].spec.batch_size
        out += [group[i:i + size] for i in range(0, len(group), size)]
    return out
