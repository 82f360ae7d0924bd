"""Caption dropout (`caption_dropout_rate` in the dataset TOML): which empty-caption embeddings the text-encoder
cache must hold, and the per-step draw.

A step that drops an item's caption trains it with the embedding of the empty caption, which
cache_text_encoder_outputs writes next to the captions' embeddings (through the same code, with caption ""):
- text-to-image: the empty caption's embedding is the same for every item, so it is cached once per dataset
  cache folder and model version: `_empty_caption_qi_te.safetensors`;
- edit versions: the text encoder sees the control images too (their vision tokens are part of the embedding,
  as in the edit pipelines' negative prompt), so the empty caption is cached per item, with that item's
  controls at the vision-encoder sizes of its caption: `<stem>_empty_caption_qie_te.safetensors`.
They are ordinary text-cache entries (pseudo items with caption ""): fingerprinted, checked for staleness,
listed by the Cache tab and refused by training when missing, like every other entry. Datasets whose rate is 0
need none and change nothing.

The draw is reproducible: it depends only on (seed, the batch's place in the run, the item's place in the batch),
so a resumed run drops the same captions as the uninterrupted one. Rate 1 always drops; rate 0 never draws.

Importable without torch.
"""

from __future__ import annotations

import dataclasses
import random

from engine.spec.dataset.plan import Plan, PlannedItem

EMPTY_STEM = "_empty_caption"              # the text-to-image file of a dataset
EMPTY_SUFFIX = "_empty_caption"            # appended to an item's stem (edit versions)


def needs_empty(plan: Plan) -> bool:
    return any(d.spec.caption_dropout_rate > 0 for d in plan.datasets)


def empty_caption_item(item: PlannedItem, edit: bool) -> PlannedItem:
    """The pseudo item whose text cache is the empty caption for `item` (shared by its dataset when not edit)."""
    stem = item.stem + EMPTY_SUFFIX if edit else EMPTY_STEM
    source = dataclasses.replace(item.item, stem=stem, caption="", caption_path=None,
                                 control_paths=list(item.item.control_paths) if edit else [])
    return dataclasses.replace(item, item=source, control_sizes=list(item.control_sizes) if edit else [],
                               control_buckets=list(item.control_buckets) if edit else [])


def empty_caption_items(plan: Plan, edit: bool) -> list[PlannedItem]:
    """Every empty-caption entry the datasets with a caption dropout need (none when every rate is 0)."""
    out = []
    for d in plan.datasets:
        if d.spec.caption_dropout_rate <= 0 or not d.items:
            continue
        out += [empty_caption_item(it, True) for it in d.items] if edit else [empty_caption_item(d.items[0], False)]
    return out


def dropped(seed: int, batch_index: int, rates: list[float]) -> list[bool]:
    """Per item of a batch: train it with the empty caption this step?"""
    if not any(rates):
        return [False] * len(rates)
    rng = random.Random(f"caption_dropout/{seed}/{batch_index}")
    return [rng.random() < rate for rate in rates]
