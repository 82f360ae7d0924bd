"""Loss masks (mask_directory): the dataset checks, the mask on the latent grid in the latent cache (and its
staleness), the loss (a black region gives no gradient), and training: an all-white mask is plain training, an
all-black one trains nothing, the demo's masks train something else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _train_util import losses, train
from engine.__main__ import main
from engine.spec.dataset.cache_files import cache_status
from engine.spec.dataset.plan import build_plan
from engine.train.step import StepInputs, flow_loss


def write_toml(folder: Path, images: Path, masks: Path | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    toml = folder / "dataset.toml"
    lines = ["[general]", "resolution = [64, 64]", "enable_bucket = true", "", "[[datasets]]",
             f"image_directory = {json.dumps(str(images))}", f"cache_directory = {json.dumps(str(folder / 'cache'))}"]
    if masks:
        lines.append(f"mask_directory = {json.dumps(str(masks))}")
    toml.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return toml


def cache(manifest: dict, toml: Path) -> None:
    common = ["--dataset_config", str(toml), "--device", "cpu", "--num_workers", "0",
              "--events_file", str(toml.parent / "cache_events.jsonl")]
    assert main(["cache_latents", *common, "--vae", manifest["vae"], "--skip_existing"]) == 0
    assert main(["cache_text_encoder_outputs", *common, "--text_encoder", manifest["text_encoder"], "--tokenizer",
                 manifest["tokenizer"], "--skip_existing"]) == 0


def solid_masks(images: Path, folder: Path, value: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image in images.glob("*.png"):
        with Image.open(image) as im:
            Image.new("L", im.size, value).save(folder / image.name)
    return folder


def test_black_region_gives_no_gradient():
    torch.manual_seed(0)
    pred = torch.randn(1, 16, 64, requires_grad=True)          # 4×4 latents packed 2×2 → 4 tokens × 64
    mask = torch.ones(1, 1, 1, 4, 4)
    mask[..., :2, :] = 0                                          # the top half is black
    inputs = StepInputs(hidden=None, n_target=4, target=torch.randn(1, 16, 1, 4, 4), timestep=None, text=None,
                        text_mask=None, img_shapes=None, weights=None, pixel_hw=(32, 32), mask=mask)
    flow_loss(pred[:, :4], inputs).backward()
    grad = pred.grad[:, :4].reshape(1, 2, 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 4, 4)
    assert grad[:, :, :2].abs().max() == 0 and grad[:, :, 2:].abs().min() > 0
    white = StepInputs(**{**inputs.__dict__, "mask": torch.ones_like(mask)})
    plain = StepInputs(**{**inputs.__dict__, "mask": None})
    assert torch.equal(flow_loss(pred[:, :4], white), flow_loss(pred[:, :4], plain))


def test_mask_checks(demo_manifest, tmp_path):
    images = Path(demo_manifest["dataset"]["images"])
    masks = solid_masks(images, tmp_path / "masks", 255)
    first = sorted(masks.glob("*.png"))[0]
    Image.new("L", (10, 10), 255).save(first)
    (masks / "stray.png").write_bytes(first.read_bytes())
    plan = build_plan(write_toml(tmp_path, images, masks), "original")
    assert [p.file for p in plan.errors] == [str(first)] and "mask is 10x10" in plan.errors[0].message
    assert any("matches no target" in p.message for p in plan.warnings)
    missing = build_plan(write_toml(tmp_path, images, tmp_path / "nowhere"), "original")
    assert any("mask_directory does not exist" in p.message for p in missing.errors)


@pytest.mark.slow
def test_white_is_plain_black_trains_nothing(demo_manifest, tmp_path):
    images = Path(demo_manifest["dataset"]["images"])
    masks = {"plain": None, "white": solid_masks(images, tmp_path / "white_masks", 255),
             "black": solid_masks(images, tmp_path / "black_masks", 0), "demo": Path(demo_manifest["dataset"]["masks"])}
    runs = {}
    for name, folder in masks.items():
        toml = write_toml(tmp_path / name, images, folder)
        cache(demo_manifest, toml)
        out = tmp_path / f"out_{name}"
        events = train("train_network", out, "--dit", demo_manifest["dit"]["original"], "--dataset_config", toml,
                       "--output_dir", out, "--output_name", "r", "--max_train_steps", 3, "--learning_rate", "5e-3",
                       "--seed", 7)
        runs[name] = (losses(events), load_file(out / "r.safetensors"), toml)
    cached = load_file(next((tmp_path / "demo" / "cache").glob("*_qi.safetensors")))
    weights = next(v for k, v in cached.items() if k.startswith("mask_weights_"))
    assert weights.shape[:2] == (1, 1) and 0 < weights.mean() < 1        # the demo masks: the changed shape only
    assert runs["white"][0] == runs["plain"][0]
    assert all(torch.equal(runs["white"][1][k], runs["plain"][1][k]) for k in runs["plain"][1])
    assert set(runs["black"][0].values()) == {0.0}
    assert all(v.abs().max() == 0 for k, v in runs["black"][1].items() if "lora_up" in k)
    assert runs["demo"][0] != runs["plain"][0]
    # repainting a mask makes that entry's latent cache stale (and only that one)
    toml = runs["white"][2]
    first = sorted((tmp_path / "white_masks").glob("*.png"))[0]
    with Image.open(first) as im:
        Image.new("L", im.size, 128).save(first)
    stale = [s for s in cache_status(build_plan(toml, "original"), "original") if s.state != "ok"]
    assert [(s.kind, s.reason) for s in stale] == [("latents", f"loss mask {first.name} changed")]
