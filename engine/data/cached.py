"""The training side of the caches: items grouped into buckets and batches, loaded as tensors.

Usage (training engine):

    from engine.data.cached import CachedDataset
    data = CachedDataset.open(cfg.dataset_config, model_version, vae=cfg.vae, text_encoder=cfg.text_encoder,
                              tokenizer=cfg.tokenizer)      # raises CacheError listing missing/stale entries
    for epoch in range(n):
        for batch in data.epoch_batches(epoch, seed):       # list[list[CachedItem]], shuffled with seed + epoch
            tensors = data.load_batch(batch)
            tensors["latents"]            # (B, 16, 1, h, w)   normalised VAE latents of the targets
            tensors["latents_control_0"]  # (B, 16, 1, hc, wc) one key per control image (edit versions)
            tensors["vl_embed"]           # list of B tensors (L_i, 3584): valid tokens only, lengths differ
            tensors["stems"]              # list of B item names

Batches never mix shapes: the bucket key is the target latent shape plus every control latent shape, so a batch
stacks cleanly (musubi's BucketBatchManager). `num_repeats` repeats items; each dataset uses its own batch size.
`data.status` is the staleness report (list of `cache_files.EntryStatus`) and `data.num_batches` the batches per
epoch. Pass `allow_stale=True` to train on what is there (missing entries are then left out, with a warning).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.models.safetensors_io import load_file
from engine.models.tokenizer import resolve_tokenizer_folder
from engine.spec.dataset import cache_files as CF
from engine.spec.dataset import dropout
from engine.spec.dataset.plan import PlannedItem, build_plan
from engine.spec.errors import CacheError
from engine.spec.safetensors_header import read_header
from engine.spec.variants import get_variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedItem:
    stem: str
    latent_path: Path
    text_path: Path
    key: tuple            # (target latent key, control latent keys...) without dtype: the bucket
    dataset_index: int
    caption_dropout_rate: float = 0.0
    empty_text_path: Path | None = None   # the empty caption's embedding (caption_dropout_rate > 0)


class CachedDataset:
    def __init__(self, items: list[CachedItem], batch_sizes: dict[int, int], repeats: dict[int, int],
                 status: list[CF.EntryStatus]):
        self.items = items
        self.batch_sizes = batch_sizes
        self.repeats = repeats
        self.status = status
        self._empty: dict[Path, torch.Tensor] = {}

    @classmethod
    def open(cls, dataset_config: str | Path, model_version: str, vae: str | None = None,
             text_encoder: str | None = None, tokenizer: str | None = None,
             allow_stale: bool = False) -> "CachedDataset":
        plan = build_plan(dataset_config, model_version)
        plan.raise_if_errors()
        arch, edit = get_variant(model_version).cache_arch, get_variant(model_version).is_edit
        tok = resolve_tokenizer_folder(tokenizer) if text_encoder else None
        status = CF.cache_status(plan, model_version, vae=vae, text_encoder=text_encoder, tokenizer=tok)
        bad = [s for s in status if s.state != "ok"]
        if bad and not allow_stale:
            listing = "\n".join(f"- {s.path.name}: {s.state} ({s.reason})" for s in bad[:20])
            more = f"\n... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise CacheError(f"{len(bad)} cache entr{'y is' if len(bad) == 1 else 'ies are'} missing or stale "
                             f"for {dataset_config} ({model_version}):\n{listing}{more}",
                             f"Run python -m engine cache_latents and cache_text_encoder_outputs with "
                             f"--model_version {model_version} --skip_existing.")
        missing = {s.path for s in bad if s.state == "missing"}
        for s in bad:
            log.warning("cache %s is %s: %s", s.path.name, s.state, s.reason)
        items = [_cached_item(it, arch, edit) for it in plan.items()
                 if CF.latent_cache_path(it, arch) not in missing and CF.text_cache_path(it, arch) not in missing]
        if not items:
            raise CacheError(f"no cached training items for {dataset_config}.",
                             "Run cache_latents and cache_text_encoder_outputs first.")
        return cls(items, {d.spec.index: d.spec.batch_size for d in plan.datasets},
                   {d.spec.index: d.spec.num_repeats for d in plan.datasets}, status)

    def epoch_batches(self, epoch: int, seed: int = 0) -> list[list[CachedItem]]:
        """All batches of one epoch: per dataset and bucket, repeated, shuffled, chunked; then shuffled."""
        rng = random.Random(seed + epoch)
        groups: dict[tuple, list[CachedItem]] = {}
        for item in self.items:
            groups.setdefault((item.dataset_index, item.key), []).extend([item] * self.repeats[item.dataset_index])
        batches = []
        for (index, _), group in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            group = list(group)
            rng.shuffle(group)
            size = self.batch_sizes[index]
            batches += [group[i:i + size] for i in range(0, len(group), size)]
        rng.shuffle(batches)
        return batches

    @property
    def num_batches(self) -> int:
        return len(self.epoch_batches(0))

    def load_batch(self, batch: list[CachedItem]) -> dict:
        per_key: dict[str, list[torch.Tensor]] = {}
        embeds = []
        for item in batch:
            for name, tensor in load_file(item.latent_path).items():
                per_key.setdefault(_batch_key(name), []).append(tensor)
            text = load_file(item.text_path)
            embeds.append(next(t for n, t in text.items() if n.startswith("varlen_vl_embed_")))
        out: dict = {k: torch.stack(v) for k, v in per_key.items()}
        out["vl_embed"] = embeds
        out["stems"] = [it.stem for it in batch]
        return out

    def load_empty_embed(self, item: CachedItem) -> torch.Tensor:
        """The empty caption's embedding for `item` (read once per file)."""
        if item.empty_text_path not in self._empty:
            text = load_file(item.empty_text_path)
            self._empty[item.empty_text_path] = next(t for n, t in text.items() if n.startswith("varlen_vl_embed_"))
        return self._empty[item.empty_text_path]


def _batch_key(name: str) -> str:
    """`latents_1x8x8_float32` → `latents`; `latents_control_0_1x8x6_bfloat16` → `latents_control_0`."""
    return name.rsplit("_", 2)[0]


def _cached_item(item: PlannedItem, arch: str, edit: bool) -> CachedItem:
    latent_path = CF.latent_cache_path(item, arch)
    names = sorted(read_header(latent_path).tensors)
    key = tuple(n.rsplit("_", 1)[0] for n in names)   # shapes without dtype
    rate = item.spec.caption_dropout_rate
    empty = CF.text_cache_path(dropout.empty_caption_item(item, edit), arch) if rate > 0 else None
    return CachedItem(item.stem, latent_path, CF.text_cache_path(item, arch), key, item.spec.index, rate, empty)
