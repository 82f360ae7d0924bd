"""The caching commands end to end on tiny real-class models: contents equal diffusers', never stale, resumable,
the user's files untouched."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.__main__ import main
from engine.spec.dataset import cache_files as CF
from engine.spec.dataset.buckets import resize_to_bucket
from engine.spec.dataset.plan import build_plan
from engine.models.safetensors_io import load_file
from engine.spec.safetensors_header import read_header
from test_generate_parity import reference_processor, same_areas

CAPTIONS = {"a": "a red square on grass", "b": "two blue circles"}


@pytest.fixture(scope="module")
def models(demo_manifest, real_tokenizer_dir, tiny_te_for_real_tokenizer_file):
    return dict(vae=demo_manifest["vae"], te=str(tiny_te_for_real_tokenizer_file), tok=str(real_tokenizer_dir))


def _image(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Two targets (one non-square) with captions; `a` has two controls of different sizes, `b` one."""
    src = tmp_path / "src"
    _image(src / "img" / "a.png", 32, 32, 1)
    _image(src / "img" / "b.png", 48, 32, 2)
    for stem, text in CAPTIONS.items():
        (src / "img" / f"{stem}.txt").write_text(text, encoding="utf-8")
    _image(src / "ctl" / "a_0.png", 32, 32, 3)
    _image(src / "ctl" / "a_1.png", 40, 24, 4)
    _image(src / "ctl" / "b.png", 32, 48, 5)
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(f'[general]\nresolution = [48, 32]\nenable_bucket = true\ncaption_extension = ".txt"\n'
                   f'[[datasets]]\nimage_directory = "{src / "img"}"\ncontrol_directory = "{src / "ctl"}"\n'
                   f'cache_directory = "{tmp_path / "cache"}"\n', encoding="utf-8")
    return cfg


def run(command: str, *argv: str, tmp: Path) -> tuple[int, list[dict]]:
    """The command in this process (monkeypatches apply); (exit code, events)."""
    events = tmp / f"events_{command}_{len(list(tmp.glob('events_*')))}.jsonl"
    rc = main([command, *argv, "--device", "cpu", "--events_file", str(events)])
    return rc, [json.loads(x) for x in events.read_text().splitlines()]


def cache_latents(models, cfg, version, *extra):
    return run("cache_latents", "--dataset_config", str(cfg), "--model_version", version, "--vae", models["vae"],
               *extra, tmp=cfg.parent)


def cache_text(models, cfg, version, *extra):
    return run("cache_text_encoder_outputs", "--dataset_config", str(cfg), "--model_version", version,
               "--text_encoder", models["te"], "--tokenizer", models["tok"], *extra, tmp=cfg.parent)


def outputs(events) -> list[str]:
    return next(e for e in events if e["type"] == "done")["outputs"]


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ contents

def test_latents_equal_diffusers_encode(models, dataset):
    from engine.demo import SEEDS, build_vae

    rc, events = cache_latents(models, dataset, "edit-2509")
    assert rc == 0, events[-1]
    cache = dataset.parent / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["a_0032x0032_qie.safetensors", "b_0048x0032_qie.safetensors"]
    vae = build_vae(SEEDS["vae"])                     # diffusers' AutoencoderKLQwenImage, not our loader
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)

    def reference(path: Path, size) -> torch.Tensor:
        arr = np.asarray(resize_to_bucket(Image.open(path), size), dtype=np.float32)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None, :, None] / 127.5 - 1
        with torch.no_grad():
            return ((vae.encode(x).latent_dist.mode() - mean) / std)[0]

    src = dataset.parent / "src"
    plan = {it.stem: it for it in build_plan(dataset, "edit-2509").items()}
    assert plan["a"].bucket == (32, 48) and plan["b"].bucket == (48, 32)     # bucket rules: test_dataset.py

    def key(name, size):
        return f"{name}_1x{size[1] // 8}x{size[0] // 8}_float32"

    expect = {stem: {key("latents", it.bucket): (it.item.image_path, it.bucket),
                     **{key(f"latents_control_{i}", b): (p, b)
                        for i, (p, b) in enumerate(zip(it.item.control_paths, it.control_buckets))}}
              for stem, it in plan.items()}
    assert sorted(expect["a"]) == ["latents_1x6x4_float32", "latents_control_0_1x6x4_float32",
                                   "latents_control_1_1x6x4_float32"]
    for stem, keys in expect.items():
        path = next(cache.glob(f"{stem}_*"))
        tensors = load_file(path)
        assert sorted(tensors) == sorted(keys)
        for key, (image, size) in keys.items():
            torch.testing.assert_close(tensors[key], reference(image, size), rtol=0, atol=1e-5)
        meta = read_header(path).metadata
        assert meta["architecture"] == "qwen_image" and meta["format_version"] == "1.0.1"
        assert (meta["width"], meta["height"]) == (("32", "32") if stem == "a" else ("48", "32"))


def _diffusers_t2i(te, tok, caption):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=tok, transformer=None)
    embeds, _ = pipe.encode_prompt(prompt=caption, device=torch.device("cpu"))
    return embeds[0]


def test_text_embeddings_equal_diffusers_t2i(models, dataset, real_tokenizer, tiny_te_for_real_tokenizer):
    rc, events = cache_text(models, dataset, "original")
    assert rc == 0, events[-1]
    for stem, caption in CAPTIONS.items():
        path = dataset.parent / "cache" / f"{stem}_qi_te.safetensors"
        tensors = load_file(path)
        assert list(tensors) == ["varlen_vl_embed_float32"]
        ref = _diffusers_t2i(tiny_te_for_real_tokenizer, real_tokenizer, caption)
        torch.testing.assert_close(tensors["varlen_vl_embed_float32"], ref, rtol=0, atol=1e-5)
        assert read_header(path).metadata["caption1"] == caption


def test_text_embeddings_equal_diffusers_edit_plus_two_images(models, dataset, real_tokenizer,
                                                              tiny_te_for_real_tokenizer, monkeypatch,
                                                              patch_edit_pipeline_area):
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from _generate_util import inject_mm_token_type_ids

    same_areas(monkeypatch, patch_edit_pipeline_area)
    rc, events = cache_text(models, dataset, "edit-2509")
    assert rc == 0, events[-1]
    pipe = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=tiny_te_for_real_tokenizer,
                                     tokenizer=real_tokenizer, processor=reference_processor(real_tokenizer),
                                     transformer=None)
    src = dataset.parent / "src" / "ctl"
    for stem, controls in (("a", ["a_0.png", "a_1.png"]), ("b", ["b.png"])):
        images = []
        for name in controls:   # what the pipeline's __call__ does before encode_prompt
            img = Image.open(src / name).convert("RGB")
            w, h = plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, img.width / img.height)
            images.append(pipe.image_processor.resize(img, h, w))
        with inject_mm_token_type_ids(tiny_te_for_real_tokenizer, real_tokenizer):   # diffusers#14194 fix
            ref, _ = pipe.encode_prompt(prompt=CAPTIONS[stem], image=images, device=torch.device("cpu"))
        ours = load_file(dataset.parent / "cache" / f"{stem}_qie_te.safetensors")["varlen_vl_embed_float32"]
        torch.testing.assert_close(ours, ref[0], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ never stale

def _states(cfg, version, models, kinds=("latents", "text")):
    plan = build_plan(cfg, version)
    return {(s.stem, s.kind): (s.state, s.reason) for s in
            CF.cache_status(plan, version, kinds, vae=models["vae"], text_encoder=models["te"],
                            tokenizer=models["tok"])}


def test_stale_detection_and_skip_existing(models, dataset, tmp_path):
    src = tmp_path / "src"
    before = tree_hash(src)
    assert cache_latents(models, dataset, "edit-2509")[0] == 0
    assert cache_text(models, dataset, "edit-2509")[0] == 0
    assert set(_states(dataset, "edit-2509", models).values()) == {("ok", "")}
    assert tree_hash(src) == before                                  # caching never writes into the sources

    # a touch alone is not a change; an edited caption is (text only); a replaced image is (latents only)
    os.utime(src / "img" / "b.png", ns=(1, 1))
    (src / "img" / "b.txt").write_text("two green circles", encoding="utf-8")
    _image(src / "ctl" / "a_1.png", 40, 24, 99)
    states = _states(dataset, "edit-2509", models)
    assert states[("a", "latents")] == ("stale", "a control image changed")
    assert states[("a", "text")] == ("stale", "a control image changed")
    assert states[("b", "latents")] == ("ok", "")
    assert states[("b", "text")] == ("stale", "caption changed")
    # switching the edit version makes the text caches stale (not the latents)
    other = _states(dataset, "edit-2511", models)
    assert other[("b", "text")] == ("stale", "made for --model_version edit-2509, now edit-2511")
    assert other[("b", "latents")] == ("ok", "")
    rep = CF.staleness_report(dataset, "edit-2511", vae=models["vae"])     # the Cache tab's JSON view
    assert rep["text"] == {"ok": 0, "missing": 0, "stale": 2} and rep["latents"] == {"ok": 1, "missing": 0, "stale": 1}

    # --skip_existing re-encodes exactly the stale entries
    rc, events = cache_latents(models, dataset, "edit-2509", "--skip_existing")
    assert rc == 0 and [Path(p).name for p in outputs(events)] == ["a_0032x0032_qie.safetensors"]
    rc, events = cache_text(models, dataset, "edit-2509", "--skip_existing")
    assert rc == 0 and sorted(Path(p).name for p in outputs(events)) == ["a_qie_te.safetensors", "b_qie_te.safetensors"]
    assert set(_states(dataset, "edit-2509", models).values()) == {("ok", "")}
    # other weights are stale too
    plan = build_plan(dataset, "edit-2509")
    got = CF.cache_status(plan, "edit-2509", ("text",), text_encoder=models["vae"])
    assert all(s.state == "stale" and "different model weights" in s.reason for s in got)
    # a changed resize setting is stale too
    dataset.write_text(dataset.read_text().replace("resolution = [48, 32]", "resolution = 48"))
    states = _states(dataset, "edit-2509", models, ("latents",))
    assert states[("a", "latents")][0] == "stale" and "settings changed" in states[("a", "latents")][1]


def test_unused_cache_files_removed_only_ours(models, dataset, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    ours_old = [cache / "gone_0032x0032_qie.safetensors", cache / "gone_qie_te.safetensors"]
    for p in ours_old:
        p.write_bytes(b"old")
    keep = [cache / "notes.txt", cache / "gone.png", cache / "model.safetensors",
            cache / "gone_0032x0032_qi.safetensors"]
    for p in keep:
        p.write_bytes(b"user file")
    assert cache_latents(models, dataset, "edit-2509", "--keep_cache")[0] == 0
    assert all(p.exists() for p in ours_old + keep)
    assert cache_latents(models, dataset, "edit-2509", "--skip_existing")[0] == 0
    assert not ours_old[0].exists() and ours_old[1].exists()        # latents run removes latent files only
    assert cache_text(models, dataset, "edit-2509")[0] == 0
    assert not ours_old[1].exists()
    assert all(p.read_bytes() == b"user file" for p in keep)


# ------------------------------------------------------------------------------------------ failures

def test_validation_problem_leaves_no_cache(models, dataset, tmp_path):
    (tmp_path / "src" / "img" / "b.png").write_bytes(b"\x89PNG broken")
    before = tree_hash(tmp_path / "src")
    rc, events = cache_latents(models, dataset, "edit-2509")
    err = next(e for e in events if e["type"] == "error")
    assert rc == 2 and err["kind"] == "dataset" and str(tmp_path / "src" / "img" / "b.png") in err["message"]
    assert not any(e["type"] == "phase" and e["name"] == "loading" for e in events)   # before any model loads
    assert not (tmp_path / "cache").exists()
    rc, events = cache_text(models, dataset, "edit-2509")
    assert rc == 2 and not (tmp_path / "cache").exists()
    assert tree_hash(tmp_path / "src") == before


def test_killed_run_resumes_to_identical_files(models, dataset, tmp_path, monkeypatch):
    import safetensors.torch

    # an uninterrupted run into another folder
    clean = tmp_path / "clean.toml"
    clean.write_text(dataset.read_text().replace(str(tmp_path / "cache"), str(tmp_path / "cache_clean")))
    assert cache_latents(models, clean, "edit-2509")[0] == 0

    # a run "killed" while writing its second file: the half-written temp file stays behind, as after SIGKILL
    real_save, calls = safetensors.torch.save_file, []

    def dying_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a file")
            raise SystemExit(137)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    monkeypatch.setattr("engine.models.safetensors_io.Path.unlink", lambda self, missing_ok=False: None)
    with pytest.raises(SystemExit):
        cache_latents(models, dataset, "edit-2509")
    monkeypatch.undo()
    cache = tmp_path / "cache"
    names = sorted(p.name for p in cache.iterdir())
    assert names[0].startswith(".") and names[1:] == ["a_0032x0032_qie.safetensors"]   # no half-written cache file
    assert _states(dataset, "edit-2509", models, ("latents",))[("b", "latents")][0] == "missing"

    rc, events = cache_latents(models, dataset, "edit-2509", "--skip_existing")
    assert rc == 0 and [Path(p).name for p in outputs(events)] == ["b_0048x0032_qie.safetensors"]
    assert cache_contents(cache) == cache_contents(tmp_path / "cache_clean")


def cache_contents(folder: Path) -> dict:
    """name → (metadata, tensor bytes). Not the raw file bytes: safetensors writes metadata keys in hash-map order."""
    return {p.name: (read_header(p).metadata, {k: t.numpy().tobytes() for k, t in load_file(p).items()})
            for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ training API

def test_cached_dataset_batches_and_staleness(models, dataset, tmp_path):
    from engine.data.cached import CachedDataset
    from engine.spec.errors import CacheError

    dataset.write_text(dataset.read_text().replace("enable_bucket = true", "enable_bucket = true\nnum_repeats = 2"))
    assert cache_latents(models, dataset, "edit-2509")[0] == 0
    with pytest.raises(CacheError, match="(?s)a_qie_te.safetensors: missing.*cache_text_encoder_outputs"):
        CachedDataset.open(dataset, "edit-2509")
    assert cache_text(models, dataset, "edit-2509")[0] == 0
    data = CachedDataset.open(dataset, "edit-2509", vae=models["vae"], text_encoder=models["te"],
                              tokenizer=models["tok"])
    batches = data.epoch_batches(epoch=0, seed=1)
    assert sorted(len(b) for b in batches) == [1, 1, 1, 1] and data.num_batches == 4
    assert batches == data.epoch_batches(epoch=0, seed=1) and sorted(it.stem for b in batches for it in b) == \
        ["a", "a", "b", "b"]
    a = data.load_batch([it for b in batches for it in b if it.stem == "a"])
    assert a["latents"].shape == (2, 16, 1, 6, 4) and a["latents_control_1"].shape == (2, 16, 1, 6, 4)
    assert len(a["vl_embed"]) == 2 and a["vl_embed"][0].shape[1] == 32 and a["stems"] == ["a", "a"]
    b = data.load_batch([next(it for bt in batches for it in bt if it.stem == "b")])
    assert b["latents"].shape == (1, 16, 1, 4, 6) and "latents_control_1" not in b
    (tmp_path / "src" / "img" / "a.txt").write_text("changed")
    with pytest.raises(CacheError, match="caption changed"):
        CachedDataset.open(dataset, "edit-2509")
