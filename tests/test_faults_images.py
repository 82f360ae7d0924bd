"""Fault suite: images and captions. High bit-depth images are scaled (not clipped to white), oversized images
are one problem of that file with the limit stated, captions lose their BOM, and an unreadable caption or image
is one clear problem; nothing the person owns is changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from _fault_util import ok, one_clear_error, png_header_only, run_engine, run_engine_captured, tree_digest
from app.dataset_files import picture
from engine.spec import imageio
from engine.spec.dataset.plan import build_plan

pytestmark = pytest.mark.fault("images")
SIDE = 64


def dataset(tmp_path: Path, images: dict[str, bytes | Image.Image], captions: dict[str, bytes] | None = None,
            extension: str = ".txt") -> Path:
    """A folder of images (PIL images or raw bytes) with captions, and its dataset TOML."""
    folder = tmp_path / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in images.items():
        if isinstance(content, Image.Image):
            content.save(folder / name)
        else:
            (folder / name).write_bytes(content)
        stem = Path(name).stem
        (folder / f"{stem}.txt").write_bytes((captions or {}).get(stem, f"a photo of {stem}".encode()))
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [{SIDE}, {SIDE}]\ncaption_extension = {json.dumps(extension)}\n'
                    f'batch_size = 1\n\n[[datasets]]\nimage_directory = {json.dumps(str(folder))}\n'
                    f'cache_directory = {json.dumps(str(tmp_path / "cache"))}\n', encoding="utf-8")
    return toml


def rgb(value: int = 128) -> Image.Image:
    return Image.new("RGB", (SIDE, SIDE), (value, value, value))


def gray16(value: int) -> Image.Image:
    return Image.fromarray(np.full((SIDE, SIDE), value, dtype=np.uint16))     # mode I;16


def problems_of(toml: Path) -> list:
    return build_plan(toml, "original").problems


# ---------------------------------------------------------------------------------------------- bit depth

@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_is_scaled_not_clipped(mode, tmp_path):
    if mode == "I;16":
        img, expect = gray16(32896), 128                         # 0x8080: mid grey in 16 bits
    elif mode == "I":                                              # 32-bit ints holding 16-bit data
        img, expect = Image.fromarray(np.full((8, 8), 32896, dtype=np.int32), "I"), 128
    else:
        img, expect = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F"), 128
    path = tmp_path / ("x.png" if mode == "I;16" else "x.tiff")
    img.save(path)
    got = np.asarray(imageio.read_rgb(path))
    assert got.shape[-1] == 3 and abs(int(got.mean()) - expect) <= 1, f"{mode} read as {got.mean():.1f}"


def test_16_bit_grey_png_caches_like_its_8_bit_twin(demo_manifest, tmp_path):
    """The bug this guards: a 16-bit grayscale PNG was cached as almost pure white, silently."""
    toml16 = dataset(tmp_path / "a", {"g.png": gray16(32896)})
    toml8 = dataset(tmp_path / "b", {"g.png": Image.new("L", (SIDE, SIDE), 128)})
    for toml in (toml16, toml8):
        ok(*run_engine(["cache_latents", "--vae", demo_manifest["vae"], "--dataset_config", toml, "--device", "cpu"],
                       toml.parent / "ev.jsonl"))
    (a,), (b,) = (list((t.parent / "cache").glob("*_qi.safetensors")) for t in (toml16, toml8))
    ta, tb = load_file(a), load_file(b)
    assert all(np.allclose(ta[k].numpy(), tb[k].numpy(), atol=1e-5) for k in ta)


# ---------------------------------------------------------------------------------------------- bombs

def test_oversized_image_is_one_problem_of_that_file(tmp_path):
    bomb = png_header_only(20_000, 20_000)                     # 400 MP claimed by a 100-byte file
    toml = dataset(tmp_path, {"bomb.png": bomb, "fine.png": rgb()})
    problems = problems_of(toml)
    mine = [p for p in problems if p.file.endswith("bomb.png")]
    assert len(mine) == 1 and f"{imageio.MAX_PIXELS:,}" in mine[0].message and mine[0].level == "error"
    assert not [p for p in problems if p.file.endswith("fine.png")]


def test_oversized_image_in_the_check_command(tmp_path):
    toml = dataset(tmp_path, {"bomb.png": png_header_only(30_000, 30_000), "fine.png": rgb()})
    rc, events, stdout = run_engine_captured(["check_dataset", "--dataset_config", toml, "--json"])
    assert rc != 1 and not [e for e in events if e["type"] == "error" and e["kind"] == "internal"], \
        f"INTERNAL: the check aborted: {events}"
    report = json.loads(stdout)
    text = json.dumps(report)
    assert "bomb.png" in text and f"{imageio.MAX_PIXELS:,}" in text


def test_oversized_image_in_the_import_thumbnails(tmp_path):
    toml = dataset(tmp_path, {"bomb.png": png_header_only(25_000, 25_000), "fine.png": rgb()})
    before = tree_digest(tmp_path / "images")
    assert picture(tmp_path / "images" / "bomb.png", tmp_path / "thumbs") is None       # no thumbnail, no abort
    assert picture(tmp_path / "images" / "fine.png", tmp_path / "thumbs") is not None
    assert tree_digest(tmp_path / "images") == before and toml.is_file()


def test_oversized_control_image_for_generation(demo_manifest, tmp_path):
    bomb = tmp_path / "control.png"
    bomb.write_bytes(png_header_only(40_000, 40_000))
    m = demo_manifest
    rc, events = run_engine(["generate_image", "--dit", m["dit"]["edit"], "--vae", m["vae"], "--text_encoder",
                             m["text_encoder"], "--tokenizer", m["tokenizer"], "--model_version", "edit",
                             "--device", "cpu", "--prompt", "x",
                             "--control_image_path", bomb, "--image_size", "32", "32", "--save_path",
                             tmp_path / "out"], tmp_path / "ev.jsonl")
    one_clear_error(rc, events, str(bomb), f"{imageio.MAX_PIXELS:,}")


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40],
                         ids=["text_named_png", "truncated_png"])
def test_unreadable_image_is_one_problem(content, tmp_path):
    toml = dataset(tmp_path, {"bad.png": content, "fine.png": rgb()})
    mine = [p for p in problems_of(toml) if p.file.endswith("bad.png")]
    assert len(mine) == 1 and "cannot be read as an image" in mine[0].message


def test_truncated_mask_for_generation(demo_manifest, tmp_path):
    good = tmp_path / "mask_src.png"
    rgb(255).save(good)
    mask = tmp_path / "mask.png"
    mask.write_bytes(good.read_bytes()[:60])
    control = tmp_path / "control.png"
    rgb().save(control)
    m = demo_manifest
    rc, events = run_engine(["generate_image", "--dit", m["dit"]["edit"], "--vae", m["vae"], "--text_encoder",
                             m["text_encoder"], "--tokenizer", m["tokenizer"], "--model_version", "edit",
                             "--device", "cpu", "--prompt", "x",
                             "--control_image_path", control, "--mask_path", mask, "--image_size", "32", "32",
                             "--resize_control_to_image_size", "--save_path", tmp_path / "out"], tmp_path / "ev.jsonl")
    one_clear_error(rc, events, str(mask))


# ---------------------------------------------------------------------------------------------- captions

def test_caption_bom_is_stripped(tmp_path):
    toml = dataset(tmp_path, {"a.png": rgb()}, {"a": "\ufeffa cat on a sofa".encode("utf-8")})
    plan = build_plan(toml, "original")
    assert [it.item.caption for it in plan.items()] == ["a cat on a sofa"]


def test_caption_not_utf8_is_one_problem(tmp_path):
    toml = dataset(tmp_path, {"a.png": rgb(), "b.png": rgb()}, {"a": "café crème".encode("cp1252")})
    before = tree_digest(tmp_path / "images")
    problems = [p for p in problems_of(toml) if p.level == "error"]
    assert len(problems) == 1, f"UNCLEAR: {len(problems)} problems for one caption: {problems}"
    assert problems[0].file.endswith("a.txt") and "UTF-8" in problems[0].message
    assert tree_digest(tmp_path / "images") == before


def test_jsonl_not_utf8_is_one_problem(tmp_path):
    img = tmp_path / "a.png"
    rgb().save(img)
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_bytes(json.dumps({"image_path": str(img), "caption": "x"}).encode() + b"\n\xff\xfe broken\n")
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [{SIDE}, {SIDE}]\n\n[[datasets]]\nimage_jsonl_file = '
                    f'{json.dumps(str(jsonl))}\ncache_directory = {json.dumps(str(tmp_path / "cache"))}\n')
    problems = [p for p in problems_of(toml) if p.level == "error"]
    assert len(problems) == 1 and "UTF-8" in problems[0].message


def test_dataset_config_and_jsonl_with_bom(tmp_path):
    img = tmp_path / "a.png"
    rgb().save(img)
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_bytes("\ufeff".encode() + json.dumps({"image_path": str(img), "caption": "x"}).encode() + b"\n")
    toml = tmp_path / "dataset.toml"
    toml.write_bytes("\ufeff".encode() + (f'[general]\nresolution = [{SIDE}, {SIDE}]\n\n[[datasets]]\n'
                     f'image_jsonl_file = {json.dumps(str(jsonl))}\ncache_directory = '
                     f'{json.dumps(str(tmp_path / "cache"))}\n').encode())
    plan = build_plan(toml, "original")
    assert len(plan.items()) == 1 and not [p for p in plan.problems if p.level == "error"]


@pytest.mark.parametrize("extension", ["/../../etc/passwd", "..txt", "sub/caption.txt", "C:\\captions\\x.txt"])
def test_caption_extension_with_a_path_is_refused(extension, tmp_path):
    toml = dataset(tmp_path, {"a.png": rgb()}, extension=extension)
    rc, events, _ = run_engine_captured(["check_dataset", "--dataset_config", toml])
    one_clear_error(rc, events, "caption_extension", kind="dataset")
