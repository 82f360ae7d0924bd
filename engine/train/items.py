"""Training items held in RAM after their first load (engine.data.cached reads them from the cache files)."""

from __future__ import annotations

import torch

from engine.spec.dataset.dropout import dropped


class ItemCache:
    """Cached items held in RAM after their first load, up to `budget` bytes (a LoRA dataset of a few hundred
    1024² images fits in 1 GiB): later epochs read no files. Batches are assembled per item, so a batch size > 1
    with a new composition every epoch still hits."""

    def __init__(self, data, budget: int = 1 << 30):
        self.data, self.budget, self.used = data, budget, 0
        self.loaded: dict = {}

    def load(self, batch) -> dict:
        parts = [self._item(item) for item in batch]
        out = {k: torch.cat([p[k] for p in parts]) for k, v in parts[0].items() if isinstance(v, torch.Tensor)}
        out["vl_embed"] = [e for p in parts for e in p["vl_embed"]]
        out["stems"] = [s for p in parts for s in p["stems"]]
        return out

    def _item(self, item) -> dict:
        hit = self.loaded.get(item)
        if hit is None:
            hit = self.data.load_batch([item])
            size = sum(t.numel() * t.element_size() for t in [*hit["vl_embed"], *(
                v for v in hit.values() if isinstance(v, torch.Tensor))])
            if self.used + size <= self.budget:
                self.loaded[item] = hit
                self.used += size
        return hit


def drop_captions(tensors: dict, batch, data, seed: int, batch_index: int) -> dict:
    """Caption dropout (the dataset's caption_dropout_rate): the chosen items get the empty caption's embedding.
    `tensors["vl_embed"]` is a fresh list per load, so the RAM cache keeps the real embeddings."""
    for i, drop in enumerate(dropped(seed, batch_index, [item.caption_dropout_rate for item in batch])):
        if drop:
            tensors["vl_embed"][i] = data.load_empty_embed(batch[i])
    return tensors
