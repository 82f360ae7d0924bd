"""`python -m engine generate_image` end to end (files in the real layouts → PNG) against diffusers' pipelines built
from the same tiny weights, with the REAL Qwen2 tokenizer. CPU float32; the bar is 1/255 mean absolute pixel
difference, the tests print how far below it we are."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from _generate_util import inject_mm_token_type_ids, qwen_scheduler
from engine.__main__ import main

STEPS, GUIDANCE, SEED = 3, 2.5, 1234


@pytest.fixture(scope="module")
def models(demo_dir, demo_manifest, real_tokenizer_dir, tiny_te_for_real_tokenizer_file):
    return dict(dit=demo_manifest["dit"], vae=demo_manifest["vae"], te=str(tiny_te_for_real_tokenizer_file),
                tok=str(real_tokenizer_dir))


@pytest.fixture(scope="module")
def reference(models, real_tokenizer, tiny_te_for_real_tokenizer):
    """diffusers objects for the same weights, built by the demo's builders (not by our loaders)."""
    from engine.demo import SEEDS, build_dit, build_vae

    return dict(vae=build_vae(SEEDS["vae"]), te=tiny_te_for_real_tokenizer, tok=real_tokenizer,
                dit={v: build_dit(v) for v in ("original", "edit", "edit-2509", "edit-2511")})


def reference_processor(tokenizer):
    """transformers' Qwen2VLProcessor with the published Qwen-Image-Edit image settings (as our VisionProcessor)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from engine.models.tokenizer import IMAGE_PROCESSOR_SETTINGS

    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR_SETTINGS), tokenizer=tokenizer)


def same_areas(monkeypatch, areas):
    """Give our engine the control areas the fixture gave diffusers' edit pipelines."""
    from engine.spec import variants

    monkeypatch.setattr(variants, "VAE_AREA", areas.vae_area)
    for name in ("edit-2509", "edit-2511"):
        monkeypatch.setitem(variants.VARIANTS, name,
                            dataclasses.replace(variants.VARIANTS[name], vl_area=areas.vl_area))


def generate(models, tmp_path, version, *extra, name="out"):
    save = tmp_path / name
    events = tmp_path / f"{name}.jsonl"
    argv = ["generate_image", "--dit", models["dit"][version], "--vae", models["vae"], "--text_encoder",
            models["te"], "--tokenizer", models["tok"], "--model_version", version, "--device", "cpu",
            "--infer_steps", str(STEPS), "--guidance_scale", str(GUIDANCE), "--seed", str(SEED),
            "--save_path", str(save), "--events_file", str(events), *extra]
    rc = main(argv)
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    assert rc == 0, [e for e in lines if e["type"] in ("error", "log")][-3:]
    outputs = next(e for e in lines if e["type"] == "done")["outputs"]
    pngs = [p for p in outputs if p.endswith(".png")]
    return (np.asarray(Image.open(pngs[0]), dtype=np.float32) if pngs else None), lines, outputs


def assert_close_pixels(ours, ref, what):
    ref = np.asarray(ref, dtype=np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    mad = np.abs(ours - ref).mean()
    print(f"{what}: mean |diff| = {mad:.4f} / 255, max {np.abs(ours - ref).max():.0f} / 255")
    assert mad < 1.0, f"{what}: mean absolute pixel difference {mad:.3f}/255"


def test_t2i_matches_qwen_image_pipeline(models, reference, tmp_path):
    from diffusers import QwenImagePipeline

    ours, events, _ = generate(models, tmp_path, "original", "--prompt", "a red fox in the snow",
                               "--negative_prompt", "blurry", "--image_size", "64", "48")
    pipe = QwenImagePipeline(scheduler=qwen_scheduler(), vae=reference["vae"], text_encoder=reference["te"],
                             tokenizer=reference["tok"], transformer=reference["dit"]["original"])
    ref = pipe(prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=GUIDANCE, height=64,
               width=48, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED)).images[0]
    assert_close_pixels(ours, ref, "t2i")
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, STEPS + 1))
    assert {e["name"] for e in events if e["type"] == "phase"} >= {"loading", "encoding", "sampling", "saving"}
    assert sum(e["type"] == "image" for e in events) == 1


def _control(tmp_path, w, h, seed, name):
    rng = np.random.default_rng(seed)
    path = tmp_path / f"{name}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_edit_matches_qwen_image_edit_pipeline(models, reference, tmp_path, monkeypatch, patch_edit_pipeline_area):
    from diffusers import QwenImageEditPipeline

    same_areas(monkeypatch, patch_edit_pipeline_area)
    control = _control(tmp_path, 80, 60, 1, "cat")
    # the area 64² at 4:3 gives a 64x64 (multiples of 32) control; the output is that size, as diffusers' default
    ours, _, _ = generate(models, tmp_path, "edit", "--prompt", "make it blue", "--negative_prompt", " ",
                          "--control_image_path", str(control), "--resize_control_to_official_size",
                          "--image_size", "64", "64")
    pipe = QwenImageEditPipeline(scheduler=qwen_scheduler(), vae=reference["vae"], text_encoder=reference["te"],
                                 tokenizer=reference["tok"], processor=reference_processor(reference["tok"]),
                                 transformer=reference["dit"]["edit"])
    with inject_mm_token_type_ids(reference["te"], reference["tok"]):
        ref = pipe(image=Image.open(control), prompt="make it blue", negative_prompt=" ", true_cfg_scale=GUIDANCE,
                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED)).images[0]
    assert ref.size == (64, 64)
    assert_close_pixels(ours, ref, "edit")


@pytest.mark.parametrize("version", ["edit-2509", "edit-2511"])
def test_edit_plus_two_controls_match_pipeline(models, reference, tmp_path, monkeypatch, patch_edit_pipeline_area,
                                               version):
    from diffusers import QwenImageEditPlusPipeline

    same_areas(monkeypatch, patch_edit_pipeline_area)
    controls = [_control(tmp_path, 96, 64, 2, "a"), _control(tmp_path, 48, 80, 3, "b")]
    ours, _, _ = generate(models, tmp_path, version, "--prompt", "put the cat on the sofa", "--negative_prompt",
                          " ", "--control_image_path", *map(str, controls), "--resize_control_to_official_size",
                          "--image_size", "48", "64")
    pipe = QwenImageEditPlusPipeline(scheduler=qwen_scheduler(), vae=reference["vae"], text_encoder=reference["te"],
                                     tokenizer=reference["tok"], processor=reference_processor(reference["tok"]),
                                     transformer=reference["dit"][version])
    with inject_mm_token_type_ids(reference["te"], reference["tok"]):
        ref = pipe(image=[Image.open(p) for p in controls], prompt="put the cat on the sofa", negative_prompt=" ",
                   true_cfg_scale=GUIDANCE, height=48, width=64, num_inference_steps=STEPS,
                   generator=torch.Generator().manual_seed(SEED)).images[0]
    assert_close_pixels(ours, ref, version)
