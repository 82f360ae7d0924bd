"""caption_dropout_rate (dataset TOML): the key's checks, the reproducible draw, the empty-caption caches (once per
dataset for text-to-image, per item with its controls for edit versions; stale/missing ones refused), and
training: rate 0 is exactly today's run, rate 1 is the run on the same images with empty captions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _train_util import losses, train
from engine.__main__ import main
from engine.spec.dataset import dropout
from engine.spec.dataset.cache_files import cache_status
from engine.spec.dataset.plan import build_plan
from engine.spec.dataset.schema import load_dataset_config
from engine.spec.errors import DatasetError


def write_toml(folder: Path, images: Path, extra: str = "", control: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    toml = folder / "dataset.toml"
    lines = ["[general]", "resolution = [64, 64]", "enable_bucket = true", "", "[[datasets]]",
             f"image_directory = {json.dumps(str(images))}", f"cache_directory = {json.dumps(str(folder / 'cache'))}"]
    if control:
        lines.append(f"control_directory = {json.dumps(str(control))}")
    toml.write_text("\n".join(lines + [extra]) + "\n", encoding="utf-8")
    return toml


def cache(manifest: dict, toml: Path, version: str = "original") -> None:
    common = ["--dataset_config", str(toml), "--device", "cpu", "--num_workers", "0", "--model_version", version,
              "--events_file", str(toml.parent / "cache_events.jsonl")]
    assert main(["cache_latents", *common, "--vae", manifest["vae"], "--skip_existing"]) == 0
    assert main(["cache_text_encoder_outputs", *common, "--text_encoder", manifest["text_encoder"], "--tokenizer",
                 manifest["tokenizer"], "--skip_existing"]) == 0


def test_rate_is_checked(tmp_path):
    toml = write_toml(tmp_path, tmp_path, "caption_dropout_rate = 1.5")
    with pytest.raises(DatasetError, match="caption_dropout_rate.*from 0 to 1"):
        load_dataset_config(toml)
    toml.write_text(toml.read_text().replace("[general]", "[general]\ncaption_dropout_rate = 0.25")
                    .replace("caption_dropout_rate = 1.5\n", ""))
    assert load_dataset_config(toml).datasets[0].caption_dropout_rate == 0.25


def test_draw_is_reproducible():
    assert dropout.dropped(7, 3, [0.0, 0.0]) == [False, False]
    assert dropout.dropped(7, 3, [1.0, 1.0, 1.0]) == [True] * 3
    draws = [dropout.dropped(7, i, [0.3])[0] for i in range(2000)]
    assert draws == [dropout.dropped(7, i, [0.3])[0] for i in range(2000)]
    assert draws != [dropout.dropped(8, i, [0.3])[0] for i in range(2000)]
    assert 0.25 < sum(draws) / len(draws) < 0.35


def test_edit_caches_one_empty_caption_per_item(demo_manifest, tmp_path):
    data = demo_manifest["dataset"]
    toml = write_toml(tmp_path, Path(data["images"]), "caption_dropout_rate = 0.5", Path(data["control"]))
    cache(demo_manifest, toml, "edit")
    plan = build_plan(toml, "edit")
    empties = sorted(p.name for p in (tmp_path / "cache").glob("*_empty_caption_qie_te.safetensors"))
    assert empties == sorted(f"{it.stem}_empty_caption_qie_te.safetensors" for it in plan.items())
    status = cache_status(plan, "edit", kinds=("text",))
    assert len(status) == 2 * len(plan.items()) and {s.state for s in status} == {"ok"}
    # the empty caption's embedding still holds the control image's vision tokens: it differs per item
    a, b = (load_file(tmp_path / "cache" / n) for n in empties[:2])
    assert next(iter(a.values())).shape[0] > 0 and not torch.equal(next(iter(a.values())), next(iter(b.values())))
    (tmp_path / "cache" / empties[0]).unlink()
    status = cache_status(plan, "edit", kinds=("text",))
    assert [s.path.name for s in status if s.state == "missing"] == [empties[0]]


@pytest.mark.slow
def test_rate_0_is_today_and_rate_1_is_the_empty_caption(demo_manifest, tmp_path):
    images = Path(demo_manifest["dataset"]["images"])
    blank = tmp_path / "blank_images"            # the same images, every caption empty
    shutil.copytree(images, blank)
    for caption in blank.glob("*.txt"):
        caption.write_text("", encoding="utf-8")
    tomls = {"plain": write_toml(tmp_path / "plain", images),
             "rate0": write_toml(tmp_path / "rate0", images, "caption_dropout_rate = 0"),
             "rate1": write_toml(tmp_path / "rate1", images, "caption_dropout_rate = 1.0"),
             "blank": write_toml(tmp_path / "blank", blank)}
    for toml in tomls.values():
        cache(demo_manifest, toml)
    assert [p.name for p in (tmp_path / "rate1" / "cache").glob("_empty*")] == ["_empty_caption_qi_te.safetensors"]
    assert not list((tmp_path / "rate0" / "cache").glob("_empty*"))
    runs = {}
    for name, toml in tomls.items():
        out = tmp_path / f"out_{name}"
        events = train("train_network", out, "--dit", demo_manifest["dit"]["original"], "--dataset_config", toml,
                       "--output_dir", out, "--output_name", "r", "--max_train_steps", 3, "--learning_rate", "5e-3",
                       "--seed", 7)
        runs[name] = (losses(events), load_file(out / "r.safetensors"))
    assert runs["rate0"][0] == runs["plain"][0]
    assert all(torch.equal(runs["rate0"][1][k], runs["plain"][1][k]) for k in runs["plain"][1])
    worst = max(abs(runs["rate1"][0][s] - runs["blank"][0][s]) for s in runs["blank"][0])
    print(f"rate 1 vs empty captions: max |loss diff| {worst:.2e}")
    assert worst < 1e-5 and runs["rate1"][0] != runs["plain"][0]
