"""The Cache tab against a running Studio (gradio_client): status from the cache files, both caching steps as real
jobs on the demo models, status missing -> fresh, and stale after a caption edit."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from _app_util import studio  # noqa: F401  (studio is a fixture)

from app.tabs.cache import LATENT_ONLY, SHARED, TEXT_ONLY
from engine.spec.config import CacheLatentsConfig, CacheTextEncoderConfig, option_fields

STEMS = ("shapes_00", "shapes_06", "shapes_07")      # three buckets: 64x64, 80x48, 48x80


def client_for(studio):
    from gradio_client import Client
    return Client(studio["url"], headers=studio["headers"], verbose=False)


@pytest.fixture
def dataset(tmp_path, demo_manifest) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for stem in STEMS:
        for ext in (".png", ".txt"):
            shutil.copy(Path(demo_manifest["dataset"]["images"]) / f"{stem}{ext}", images)
    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\nresolution = [64, 64]\nenable_bucket = true\n\n[[datasets]]\n'
                      f'image_directory = "{images}"\ncache_directory = "{tmp_path / "cache"}"\n', encoding="utf-8")
    return config


def form_values(cls, names, values: dict) -> list:
    """Widget values in the order the tab's form lists them (the config's field order)."""
    return [values.get(f.name) for f in option_fields(cls) if f.name in names]


def cache_inputs(studio, dataset, **overrides) -> list:
    m = studio["manifest"]
    values = {"model_version": "original", "device": "cpu", "batch_size": "2", "num_workers": "1",
              "skip_existing": True, "keep_cache": False, "vae": m["vae"], "text_encoder": m["text_encoder"],
              "tokenizer": m["tokenizer"], "fp8_vl": False, **overrides}
    return [str(dataset), *form_values(CacheLatentsConfig, SHARED, values),
            *form_values(CacheLatentsConfig, LATENT_ONLY, values),
            *form_values(CacheTextEncoderConfig, TEXT_ONLY, values)]


def status(client, studio, dataset):
    m = studio["manifest"]
    summary, table = client.predict(str(dataset), "original", m["vae"], m["text_encoder"], m["tokenizer"],
                                    api_name="/cache_status")
    return summary, {(r[1], r[2]): (r[3], r[4]) for r in table["data"]}


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.iterdir())}


def test_cache_jobs_make_the_status_go_from_missing_to_fresh(studio, dataset):
    images = dataset.parent / "images"
    before = snapshot(images)
    client = client_for(studio)
    summary, rows = status(client, studio, dataset)
    assert "latents: **3 missing** of 3" in summary and "text encoder outputs: **3 missing** of 3" in summary
    assert set(rows.values()) == {("missing", "no cache file")} and len(rows) == 6

    command, message, _timer = client.predict(*cache_inputs(studio, dataset), api_name="/cache_both")
    latents_cmd, text_cmd = command.splitlines()
    assert " cache_latents --batch_size 2 --num_workers 1 --skip_existing " in latents_cmd
    assert f"--dataset_config {dataset} --vae {studio['manifest']['vae']} --model_version original " \
           "--device cpu" in latents_cmd
    assert " cache_text_encoder_outputs --batch_size 2 --num_workers 1 --skip_existing " in text_cmd
    assert "Started" in message

    deadline = time.monotonic() + 300
    while True:            # what the page's timer does once a second
        m = studio["manifest"]
        progress, log, _timer, summary, table = client.predict(str(dataset), "original", m["vae"], m["text_encoder"],
                                                       m["tokenizer"], api_name="/cache_poll")
        if progress.count("**done**") == 2 or "**failed**" in progress or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert progress.count("**done**") == 2, progress + log
    # The poll that saw the last job end read the status again.
    assert "latents: **cache complete** (3)" in summary and "text encoder outputs: **cache complete** (3)" in summary
    assert {r[3] for r in table["data"]} == {"fresh"}
    written = sorted(p.name for p in (dataset.parent / "cache").iterdir())
    assert written == ["shapes_00_0064x0064_qi.safetensors", "shapes_00_qi_te.safetensors",
                       "shapes_06_0080x0048_qi.safetensors", "shapes_06_qi_te.safetensors",
                       "shapes_07_0048x0080_qi.safetensors", "shapes_07_qi_te.safetensors"]
    assert snapshot(images) == before            # caching only read the user's images and captions

    (dataset.parent / "images" / "shapes_06.txt").write_text("a different caption", encoding="utf-8")
    summary, rows = status(client, studio, dataset)
    assert rows[("shapes_06", "text")] == ("stale", "caption changed")
    assert rows[("shapes_06", "latents")][0] == "fresh"
    assert "text encoder outputs: **1 stale** of 3" in summary


def test_status_names_a_missing_dataset_config(studio, tmp_path):
    client = client_for(studio)
    summary, rows = status(client, studio, tmp_path / "nope.toml")
    assert "nope.toml: dataset config not found" in summary and rows == {}


def test_empty_boxes_are_left_out_and_the_engine_error_is_shown(studio, dataset):
    client = client_for(studio)
    wrong = studio["manifest"]["dit"]["original"]            # a DiT in the VAE box: only the engine can tell
    command, message, _timer = client.predict(*cache_inputs(studio, dataset, batch_size="", num_workers="",
                                                            vae=wrong), api_name="/cache_latents")
    assert "--batch_size" not in command and "--num_workers" not in command and f"--vae {wrong}" in command
    deadline = time.monotonic() + 120
    while True:
        progress, *_ = client.predict(str(dataset), "original", "", "", "", api_name="/cache_poll")
        if "**failed**" in progress or "**done**" in progress or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "**failed**" in progress and "not the Qwen-Image VAE" in progress      # the engine's error, shown here


def test_an_empty_model_box_uses_the_models_tab(studio, dataset):
    client = client_for(studio)
    command, *_ = client.predict(*cache_inputs(studio, dataset, vae=""), api_name="/cache_latents")
    assert f"--vae {studio['manifest']['vae']}" in command
