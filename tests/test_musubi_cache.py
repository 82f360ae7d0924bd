"""Caches in musubi-tuner's layout (its tensor keys and metadata only: architecture, format_version, width/height or
caption1; no fingerprints) are used after their shapes, keys and file times are checked
(engine/spec/dataset/foreign_cache.py), and the Cache tab says which entries came from another tool."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _train_util import cached_dataset, train
from engine.spec.dataset import cache_files as CF

VERSION = "edit"


@pytest.fixture(scope="module")
def ours(demo_manifest, tmp_path_factory) -> Path:
    return cached_dataset(demo_manifest, tmp_path_factory.mktemp("musubi_src"), VERSION)


def _musubi_file(src: Path, dst: Path) -> None:
    """Rewrite one of our cache files as musubi writes it: bf16 tensors (the dtype in the key), its metadata."""
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    out = {re.sub(r"_[a-z0-9]+$", "_bfloat16", k): t.to(torch.bfloat16) for k, t in tensors.items()}
    keep = ("width", "height") if meta["qis_kind"] == "latents" else ("caption1",)
    save_file(out, str(dst), {"architecture": "qwen_image", "format_version": "1.0.1",
                              **{k: meta[k] for k in keep}})


@pytest.fixture
def musubi(ours, tmp_path) -> Path:
    """A copy of the demo edit dataset config whose cache folder holds musubi-layout files only."""
    text = ours.read_text(encoding="utf-8")
    src = Path(re.search(r'cache_directory = "(.*)"', text).group(1))
    cache = tmp_path / "cache"
    cache.mkdir()
    for f in src.glob("*.safetensors"):
        _musubi_file(f, cache / f.name)
    toml = tmp_path / "dataset.toml"
    toml.write_text(text.replace(str(src), str(cache)), encoding="utf-8")
    return toml


def _report(toml: Path, manifest: dict) -> dict:
    return CF.staleness_report(toml, VERSION, vae=manifest["vae"], text_encoder=manifest["text_encoder"])


def _cache_dir(toml: Path) -> Path:
    return Path(re.search(r'cache_directory = "(.*)"', toml.read_text()).group(1))


def test_musubi_cache_is_accepted_and_marked(musubi, demo_manifest):
    rep = _report(musubi, demo_manifest)
    assert rep["latents"]["ok"] == rep["text"]["ok"] == len(rep["entries"]) // 2 > 0
    assert {e["origin"] for e in rep["entries"]} == {"musubi-tuner"}
    assert all("musubi-tuner" in e["reason"] for e in rep["entries"])
    text = next(e for e in rep["entries"] if e["kind"] == "text")
    assert "not recorded" in text["reason"]            # edit versions cannot be told apart: said, not hidden


def test_training_runs_on_a_musubi_cache(musubi, demo_manifest, tmp_path):
    out = tmp_path / "run"
    events = train("train_network", out, "--dit", demo_manifest["dit"][VERSION], "--model_version", VERSION,
                   "--dataset_config", musubi, "--output_dir", out, "--output_name", "m", "--max_train_steps", 2)
    assert any(e["type"] == "done" for e in events)
    assert (out / "m.safetensors").is_file()


def test_wrong_shape_is_stale_and_refused(musubi, demo_manifest, tmp_path):
    path = sorted(p for p in _cache_dir(musubi).glob("*_qie.safetensors"))[0]
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.startswith("latents_1x"))
    lat = tensors.pop(key)
    f_, h, w = lat.shape[1:]
    tensors[f"latents_1x{h}x{w + 1}_bfloat16"] = torch.zeros(16, 1, h, w + 1, dtype=torch.bfloat16)
    save_file(tensors, str(path), meta)
    entry = next(e for e in _report(musubi, demo_manifest)["entries"] if e["path"] == str(path))
    assert entry["state"] == "stale" and "shape" in entry["reason"] and entry["origin"] == "musubi-tuner"
    out = tmp_path / "run"
    events = train("train_network", out, "--dit", demo_manifest["dit"][VERSION], "--model_version", VERSION,
                   "--dataset_config", musubi, "--output_dir", out, "--max_train_steps", 1, expect_rc=2)
    error = next(e for e in events if e["type"] == "error")
    assert path.name in error["message"] and "shape" in error["message"]


def test_missing_control_latent_is_stale(musubi, demo_manifest):
    path = sorted(_cache_dir(musubi).glob("*_qie.safetensors"))[0]
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("latents_control")}
    save_file(tensors, str(path), meta)
    entry = next(e for e in _report(musubi, demo_manifest)["entries"] if e["path"] == str(path))
    assert entry["state"] == "stale" and "latents_control_0" in entry["reason"]


def test_staleness_by_file_times(musubi, demo_manifest):
    """A source modified after the cache was written makes it stale (the cache's time is moved back, so the
    demo's images stay untouched)."""
    cache = _cache_dir(musubi)
    latent = sorted(cache.glob("*_qie.safetensors"))[0]
    text = sorted(cache.glob("*_qie_te.safetensors"))[0]
    for p in (latent, text):
        os.utime(p, (1_000_000, 1_000_000))
    by_path = {e["path"]: e for e in _report(musubi, demo_manifest)["entries"]}
    assert by_path[str(latent)]["state"] == "stale" and "file times" in by_path[str(latent)]["reason"]
    assert by_path[str(text)]["state"] == "stale" and "file times" in by_path[str(text)]["reason"]


def test_caption_and_width_are_checked(musubi, demo_manifest):
    text = sorted(_cache_dir(musubi).glob("*_qie_te.safetensors"))[0]
    with safe_open(str(text), "pt") as f:
        meta, (key,) = f.metadata(), list(f.keys())
        emb = f.get_tensor(key)
    save_file({key: emb}, str(text), {**meta, "caption1": "something else"})
    entry = next(e for e in _report(musubi, demo_manifest)["entries"] if e["path"] == str(text))
    assert entry["state"] == "stale" and "caption" in entry["reason"]
    save_file({key: torch.zeros(emb.shape[0], emb.shape[1] + 3, dtype=emb.dtype)}, str(text), meta)
    entry = next(e for e in _report(musubi, demo_manifest)["entries"] if e["path"] == str(text))
    assert entry["state"] == "stale" and f"{emb.shape[1] + 3} wide" in entry["reason"]


def test_cache_tab_names_the_other_tool(musubi, demo_manifest):
    from app.tabs.cache import STATUS_HEADERS, summary_text, table_rows
    from engine.spec.dataset.schema import load_dataset_config

    rep = _report(musubi, demo_manifest)
    config = load_dataset_config(musubi)
    labels = {str(s.cache_directory): f"datasets[{s.index}]" for s in config.datasets}
    rows = table_rows(rep, labels)
    made_by = STATUS_HEADERS.index("made by")
    assert {r[made_by] for r in rows} == {"musubi-tuner"}
    assert "came from another tool (musubi-tuner)" in summary_text(rep, config, labels)


def test_our_own_cache_still_says_this_app(ours, demo_manifest):
    from app.tabs.cache import STATUS_HEADERS, table_rows

    rep = _report(ours, demo_manifest)
    assert {e["origin"] for e in rep["entries"]} == {"qis"} and rep["latents"]["stale"] == 0
    assert {r[STATUS_HEADERS.index("made by")] for r in table_rows(rep, {})} == {"this app"}
