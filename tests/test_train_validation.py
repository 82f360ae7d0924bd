"""--validation_dataset_config: the validation loss is deterministic (the same weights give the same number, bit for
bit), is what the loss at fixed noise/timesteps of the model is, and runs during training as metric events
(before training, every N steps, at the end), for the raw and the EMA weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from _train_util import cached_dataset, train
from engine.__main__ import main
from engine.data.cached import CachedDataset
from engine.models.dit import load_dit
from engine.train.validation import Validation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(demo_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_validation")
    return dict(root=root, toml=cached_dataset(demo_manifest, root), dit=demo_manifest["dit"]["original"])


def val_points(events, key="val_loss"):
    return {e["step"]: e[key] for e in events if e["type"] == "metric" and key in e}


def test_same_weights_same_number(setup):
    dit = load_dit(setup["dit"], "original", "cpu", torch.float32)
    val = Validation(CachedDataset.open(setup["toml"], "original"), [100, 500, 900], seed=7, every=None)
    first = val.loss(dit, (), torch.device("cpu"), torch.float32)
    assert val.loss(dit, (), torch.device("cpu"), torch.float32) == first
    assert Validation(val.data, [100, 500, 900], seed=7, every=None).loss(dit, (), torch.device("cpu"),
                                                                          torch.float32) == first
    other = Validation(val.data, [100, 500, 901], seed=7, every=None).loss(dit, (), torch.device("cpu"), torch.float32)
    assert other != first
    with torch.no_grad():
        dit.proj_out.bias.add_(0.01)
    assert val.loss(dit, (), torch.device("cpu"), torch.float32) != first


def run(setup, name):
    out = setup["root"] / name
    return train("train_network", out, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir", out,
                 "--output_name", "v", "--max_train_steps", 5, "--learning_rate", "5e-3", "--seed", 7,
                 "--network_args", "rank_dropout=0.3", "--validation_dataset_config", setup["toml"],
                 "--validation_every_n_steps", 2, "--validation_timesteps", 200, 800, "--use_ema", "--ema_decay", "0.5",
                 "--ema_validation", "comparison")


def test_runs_during_training(setup):
    events = run(setup, "run")
    points = val_points(events)
    assert sorted(points) == [0, 2, 4, 5]
    ema = val_points(events, "val_loss_ema")
    assert sorted(ema) == [0, 2, 4, 5] and ema[0] == points[0] and ema[4] != points[4]
    # step 0: the LoRA's up weights start at zero, so this is the base DiT's validation loss
    dit = load_dit(setup["dit"], "original", "cpu", torch.float32)
    base = Validation(CachedDataset.open(setup["toml"], "original"), [200, 800], 7, None)
    assert points[0] == pytest.approx(base.loss(dit, (), torch.device("cpu"), torch.float32), rel=1e-6)
    assert points[5] < points[0]
    # a second run of the same training: the same curve (the validation is not disturbed by the rank dropout)
    assert val_points(run(setup, "run2")) == points


def test_edit_model_validation_with_controls(demo_manifest, tmp_path_factory):
    toml = cached_dataset(demo_manifest, tmp_path_factory.mktemp("validation_edit"), "edit")
    dit = load_dit(demo_manifest["dit"]["edit"], "edit", "cpu", torch.float32)
    val = Validation(CachedDataset.open(toml, "edit"), [500], seed=3, every=None)
    assert any(k.startswith("latents_control_") for k in val.batches[0])
    first = val.loss(dit, (), torch.device("cpu"), torch.float32)
    assert first == val.loss(dit, (), torch.device("cpu"), torch.float32) and 0 < first < 10


def test_validation_images_beside_controls(demo_manifest, tmp_path):
    """Edit model: each held-out item rendered from its control + caption, shown as [control | generated | target]."""
    data = demo_manifest["dataset"]
    held = tmp_path / "held"
    for sub in ("images", "control"):
        (held / sub).mkdir(parents=True)
    stems = sorted(p.stem for p in Path(data["images"]).glob("*.png"))[:2]
    for stem in stems:
        shutil.copy(Path(data["images"]) / f"{stem}.png", held / "images")
        shutil.copy(Path(data["images"]) / f"{stem}.txt", held / "images")
        shutil.copy(Path(data["control"]) / f"{stem}.png", held / "control")
    toml = held / "validation.toml"
    toml.write_text(f"[general]\nresolution = [64, 64]\nenable_bucket = true\n\n[[datasets]]\n"
                    f"image_directory = {json.dumps(str(held / 'images'))}\n"
                    f"control_directory = {json.dumps(str(held / 'control'))}\n"
                    f"cache_directory = {json.dumps(str(held / 'cache'))}\n", encoding="utf-8")
    common = ["--model_version", "edit", "--dataset_config", str(toml), "--device", "cpu", "--num_workers", "0"]
    assert main(["cache_latents", "--vae", demo_manifest["vae"], *common]) == 0
    assert main(["cache_text_encoder_outputs", "--text_encoder", demo_manifest["text_encoder"], "--tokenizer",
                 demo_manifest["tokenizer"], *common]) == 0
    out = tmp_path / "run"
    events = train("train_network", out, "--model_version", "edit", "--dit", demo_manifest["dit"]["edit"],
                   "--vae", demo_manifest["vae"], "--text_encoder", demo_manifest["text_encoder"], "--tokenizer",
                   demo_manifest["tokenizer"], "--dataset_config", toml, "--output_dir", out, "--output_name", "v",
                   "--max_train_steps", 1, "--learning_rate", "5e-3", "--seed", 7, "--validation_dataset_config", toml,
                   "--validation_images", "--validation_timesteps", 500)
    shown = [e for e in events if e["type"] == "sample" and e.get("kind") == "validation"]
    assert [(e["step"], e["index"]) for e in shown] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for e in shown:
        with Image.open(e["path"]) as pair:
            assert pair.height == 256 and pair.width == 3 * 256 + 2 * 4     # control | generated | target, square
    assert stems[0] in Path(shown[0]["path"]).name
    assert len(list((out / "validation" / "sample").glob("*.png"))) == 4
