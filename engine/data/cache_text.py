"""`python -m engine cache_text_encoder_outputs`: Qwen2.5-VL embeddings of every caption.

Per item one file `<stem>_<qi|qie>_te.safetensors` with `varlen_vl_embed_{dtype}`: (L, 3584), the valid tokens
only, template prefix dropped — computed by `engine.models.textenc.encode_prompts`, the same code inference uses, with
the template of --model_version (t2i: drop 34; Edit: image inline, drop 64; Edit-2509/2511: "Picture N:",
drop 64). Edit versions give the vision encoder each control image at the size inference gives it
(docs/architecture.md, `engine.spec.controls` official sizes: ~1 MP for Edit, 384² area for Edit-2509/2511), made
from the original control file. fp8 outputs (--fp8_vl) are stored as bfloat16 (musubi PR #440).
"""

from __future__ import annotations

import functools
import logging

import torch

from engine.data.caching import (Progress, batches_by_shape, is_text_file, open_rgb, pending, prefetch, prepare,
                                 remove_leftover_temps, remove_unused)
from engine.models.runtime import resolve_device
from engine.models.safetensors_io import save_file_atomic
from engine.models.text_encoder import load_text_encoder
from engine.models.textenc import encode_prompts
from engine.models.tokenizer import VisionProcessor, load_tokenizer, resolve_tokenizer_folder
from engine.spec import controls
from engine.spec.dataset import foreign_cache
from engine.spec.dataset import cache_files as CF
from engine.spec.dataset import dropout
from engine.spec.dataset.plan import PlannedItem
from engine.spec.variants import Variant

log = logging.getLogger(__name__)


def run(cfg, events) -> list[str]:
    events.phase("checking")
    plan, variant = prepare(cfg, "text_encoder")
    device = resolve_device(cfg.device)
    tokenizer_folder = resolve_tokenizer_folder(cfg.tokenizer)
    encoder = CF.encoder_identity([cfg.text_encoder, tokenizer_folder])
    events.phase("loading")
    tokenizer = load_tokenizer(tokenizer_folder)
    processor = VisionProcessor(tokenizer) if variant.is_edit else None
    te = load_text_encoder(cfg.text_encoder, device=device, fp8_vl=cfg.fp8_vl)
    dtype = _stored_dtype(te)
    te_width = foreign_cache.text_encoder_width(cfg.text_encoder)     # checks a musubi-tuner cache's width
    items = plan.items() + dropout.empty_caption_items(plan, variant.is_edit)     # caption_dropout_rate > 0

    def status(item):
        expected = CF.Expected("text", variant.name, text_settings(item, variant, cfg.fp8_vl, dtype), encoder,
                               te_width)
        return CF.entry_status(item, CF.text_cache_path(item, variant.cache_arch), expected, variant.is_edit)

    remove_leftover_temps(plan, variant.cache_arch)
    todo = pending(items, status, cfg.skip_existing)
    events.phase("caching", total=len(todo))
    progress = Progress(events, len(todo), "caption")
    written = []
    load = functools.partial(load_batch, variant=variant)
    for batch, (sources, images) in prefetch(batches_by_shape(todo, cfg.batch_size), load, cfg.num_workers):
        captions = [it.item.caption for it in batch]
        embeds = encode_prompts(te, tokenizer, processor, captions, images, variant)
        for item, source, emb in zip(batch, sources, embeds):
            emb = emb.detach().to("cpu", dtype=_dtype(dtype))
            meta = CF.make_metadata("text", variant.name, source, text_settings(item, variant, cfg.fp8_vl, dtype),
                                    encoder, {"caption1": item.item.caption})
            path = CF.text_cache_path(item, variant.cache_arch)
            written.append(save_file_atomic({f"varlen_vl_embed_{dtype}": emb}, path, meta))
        progress.advance(len(batch))
    produced = [CF.text_cache_path(it, variant.cache_arch) for it in items]
    removed = remove_unused(plan, variant.cache_arch, produced, cfg.keep_cache, is_text_file)
    log.info("text embeddings: %d written, %d up to date, %d old files removed", len(written),
             len(items) - len(todo), len(removed))
    return [str(p) for p in written]


def vl_sizes(item: PlannedItem, variant: Variant) -> list[tuple[int, int]]:
    """The vision-encoder size of each control image: what inference with the official sizes uses."""
    return [controls.control_sizes(variant, size, size, official=True).vl for size in item.control_sizes]


def load_batch(batch: list[PlannedItem], variant: Variant) -> tuple[list[dict], list[list] | None]:
    """(source fingerprints, vision-encoder images per item or None for text-to-image). The control images are
    fingerprinted from exactly the bytes they are decoded from."""
    sources, images = [], []
    for item in batch:
        source = CF.text_source(item, edit=False)
        if variant.is_edit:
            source["controls"], imgs = [], []
            for path, size in zip(item.item.control_paths, vl_sizes(item, variant)):
                fp, data = CF.read_with_fingerprint(path)
                source["controls"].append(fp)
                imgs.append(controls.resize(open_rgb(data, path), size, exact=True))
            images.append(imgs)
        sources.append(source)
    return sources, images if variant.is_edit else None


def text_settings(item: PlannedItem, variant: Variant, fp8_vl: bool, dtype: str) -> dict:
    return {"vl_sizes": [list(s) for s in vl_sizes(item, variant)] if variant.is_edit else [],
            "drop_idx": variant.drop_idx, "template_sha256": CF.sha256_text(variant.template),
            "fp8_vl": bool(fp8_vl), "dtype": dtype}


def _stored_dtype(te) -> str:
    """The text encoder's compute dtype; fp8 never reaches the cache (stored as bfloat16)."""
    dtype = next(p.dtype for p in te.parameters() if p.is_floating_point() and p.dtype.itemsize > 1)
    return str(dtype).split(".")[-1]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)
