"""Prompt → Qwen2.5-VL embeddings, exactly as diffusers' Qwen-Image pipelines build them.

Shared by inference (`engine/infer`) and text-encoder caching. One call:

    encode_prompts(text_encoder, tokenizer, processor, prompts, images_per_prompt, variant)
        -> list of (L_i, hidden) tensors, one per prompt: the valid tokens only, template prefix dropped.

What it reproduces (diffusers 0.42.1 `_get_qwen_prompt_embeds` of QwenImagePipeline / QwenImageEditPipeline /
QwenImageEditPlusPipeline): the variant's template, `hidden_states[-1]`, padding removed by the attention mask,
the first `variant.drop_idx` tokens dropped. Text-to-image tokenizes with `max_length = 1024 + drop_idx` and
truncation (musubi's and diffusers' tokenizer call; diffusers' later 512-token cut of `max_sequence_length` is
not applied, as in musubi); edit variants go through the vision processor with no truncation.

One deliberate difference from diffusers 0.42.1 (issue huggingface/diffusers#14194, PR #14189): with
transformers >= 5 Qwen2.5-VL needs the processor's `mm_token_type_ids` to give image tokens their 3-D (mrope)
positions, and diffusers' edit pipelines do not forward it, so their image tokens get plain text positions.
Qwen-Image-Edit was trained with the 3-D positions (transformers 4.x computed them from the input ids), so we
forward `mm_token_type_ids` (computing it from the ids when a processor does not return it).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from transformers import ProcessorMixin

from engine.spec.variants import Variant, get_variant

log = logging.getLogger(__name__)

TOKENIZER_MAX_LENGTH = 1024   # diffusers' tokenizer_max_length; the template prefix comes on top
IMAGE_TOKEN = "<|image_pad|>"


def encode_prompts(text_encoder, tokenizer, processor, prompts: Sequence[str],
                   images_per_prompt: Sequence[Sequence] | None = None, variant: Variant | str = "original",
                   batch_size: int | None = None) -> list[torch.Tensor]:
    """Embeddings for each prompt: a list of (L_i, hidden) tensors in the text encoder's dtype, on its device.

    images_per_prompt: for edit variants, one list of PIL images per prompt, already sized for the vision
    encoder (see `engine.spec.controls`). Edit (v1) uses only the first image of each list (its template has
    one image slot); Edit-2509/2511 use all of them ("Picture N:" prefixes). Ignored for text-to-image.
    processor: `engine.models.tokenizer.VisionProcessor` or a transformers Qwen2VLProcessor; only edit needs it.
    batch_size: prompts per forward pass (default: all at once, as diffusers does for a list of prompts).
    """
    variant = get_variant(variant) if isinstance(variant, str) else variant
    prompts = list(prompts)
    if images_per_prompt is None:
        images_per_prompt = [[] for _ in prompts]
    if len(images_per_prompt) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images_per_prompt)} image lists; give one per prompt")
    step = batch_size or max(len(prompts), 1)
    if getattr(tokenizer, "padding_side", "right") != "right":
        step = 1    # left padding would shift the valid tokens' positions; one prompt per pass is always exact
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), step):
        chunk = prompts[start:start + step]
        images = images_per_prompt[start:start + step]
        out += _encode_batch(text_encoder, tokenizer, processor, chunk, images, variant)
    return out


def _encode_batch(text_encoder, tokenizer, processor, prompts, images_per_prompt, variant: Variant):
    if variant.is_edit:
        images_per_prompt = [_vl_images(variant, imgs) for imgs in images_per_prompt]
        texts = [variant.prompt_text(p, len(imgs)) for p, imgs in zip(prompts, images_per_prompt)]
        flat = [im for imgs in images_per_prompt for im in imgs]
        inputs = run_processor(processor, tokenizer, texts, flat)
    else:
        texts = [variant.prompt_text(p, 0) for p in prompts]
        max_length = TOKENIZER_MAX_LENGTH + variant.drop_idx
        enc = tokenizer(texts, max_length=max_length, padding=True, truncation=True, return_tensors="pt")
        _warn_truncated(tokenizer, texts, max_length, variant.drop_idx)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    hidden, mask = _forward(text_encoder, inputs)
    return [h[m.bool()][variant.drop_idx:] for h, m in zip(hidden, mask)]


def _vl_images(variant: Variant, images) -> list:
    images = [im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im for im in images or []]
    if not variant.multi_image and len(images) > 1:
        log.warning("%s takes one control image in the prompt; the vision encoder sees only the first of %d",
                    variant.title, len(images))
        images = images[:1]
    if not variant.multi_image and not images:
        raise ValueError(f"{variant.title} needs a control image for every prompt (its template has an image slot)")
    return images


def run_processor(processor, tokenizer, texts: list[str], images: list) -> dict:
    """Text + images → model inputs, for our VisionProcessor or a transformers processor alike."""
    if processor is None:
        raise ValueError("edit models need the vision processor (engine.models.tokenizer.VisionProcessor)")
    try:
        is_hf = isinstance(processor, ProcessorMixin)
    except ImportError:  # pragma: no cover - transformers is a hard requirement
        is_hf = False
    if is_hf:
        inputs = dict(processor(text=texts, images=images or None, padding=True, return_tensors="pt"))
    else:
        inputs = dict(processor(texts, images=images or None))
    if images and "mm_token_type_ids" not in inputs:
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_id).to(torch.long)
    return inputs


@torch.no_grad()
def _forward(text_encoder, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    device = _device_of(text_encoder)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    kwargs = {k: inputs[k].to(device) for k in keys if inputs.get(k) is not None}
    if "pixel_values" in kwargs:
        kwargs["pixel_values"] = kwargs["pixel_values"].to(_dtype_of(text_encoder))
    # logits_to_keep=1: the LM head's (B, L, 152064) logits are never used; computing one position saves time and
    # memory without touching the hidden states
    outputs = text_encoder(**kwargs, output_hidden_states=True, logits_to_keep=1)
    return outputs.hidden_states[-1], kwargs["attention_mask"]


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


def _dtype_of(module) -> torch.dtype:
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _warn_truncated(tokenizer, texts: list[str], max_length: int, drop_idx: int) -> None:
    for text in texts:
        n = len(tokenizer(text, truncation=False)["input_ids"])
        if n > max_length:
            log.warning("prompt is %d tokens with its template; only the first %d are used (%d of text)",
                        n, max_length, max_length - drop_idx)


def pad_embeddings(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack (L_i, D) tensors to (B, L, D) with zero padding, plus a (B, L) mask (None when nothing is padded,
    which lets non-SDPA attention kernels run, as the pipelines do)."""
    longest = max(e.shape[0] for e in embeds)
    stacked = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
    if all(e.shape[0] == longest for e in embeds):
        return stacked, None
    mask = torch.stack([torch.arange(longest) < e.shape[0] for e in embeds]).to(torch.long)
    return stacked, mask.to(stacked.device)
