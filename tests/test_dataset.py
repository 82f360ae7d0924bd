"""Dataset config, control matching, JSONL, buckets and validation (no model needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.spec.dataset import buckets as B
from engine.spec.dataset.check import report
from engine.spec.dataset.plan import build_plan
from engine.spec.dataset.schema import load_dataset_config
from engine.spec.errors import DatasetError

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, size=(64, 48), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _dataset(tmp: Path, general: str = "", dataset: str = "", controls: bool = True) -> Path:
    lines = ["[general]", "resolution = 64", 'caption_extension = ".txt"', general, "[[datasets]]",
             f'image_directory = "{tmp / "img"}"', f'cache_directory = "{tmp / "cache"}"']
    if controls:
        lines.append(f'control_directory = "{tmp / "ctl"}"')
    lines.append(dataset)
    return _toml(tmp / "dataset.toml", "\n".join(lines) + "\n")


def _problems(plan, level=None):
    return [(Path(p.file).name, p.message) for p in plan.problems if level is None or p.level == level]


# ------------------------------------------------------------------------------------------ control matching

def test_control_matching_prefixes_suffixes_and_mixed_sizes(tmp_path):
    for stem in ("a", "ab", "a_1", "b"):
        _png(tmp_path / "img" / f"{stem}.png")
        (tmp_path / "img" / f"{stem}.txt").write_text(f"caption {stem}")
    ctl = tmp_path / "ctl"
    # a: exact + numbered (0000 style, out of order); ab must not take a's files nor a take ab's
    for name, size in [("a_0002.png", (40, 40)), ("a.png", (32, 48)), ("a_0000.png", (80, 64)),
                       ("ab.png", (48, 48)), ("ab_1.jpg", (64, 32)), ("a_1.png", (64, 64)),
                       ("b_0.png", (64, 48)), ("b_10.png", (64, 48)), ("b_2.png", (64, 48))]:
        _png(ctl / name, size)
    plan = build_plan(_dataset(tmp_path), "edit-2509")
    assert not plan.errors, plan.errors
    got = {it.stem: [p.name for p in it.item.control_paths] for it in plan.items()}
    assert got == {"a": ["a.png", "a_0000.png", "a_0002.png"], "ab": ["ab.png", "ab_1.jpg"],
                   "a_1": ["a_1.png"], "b": ["b_0.png", "b_2.png", "b_10.png"]}
    sizes = {it.stem: it.control_sizes for it in plan.items()}
    assert sizes["a"] == [(32, 48), (80, 64), (40, 40)]


def test_control_problems_name_the_file(tmp_path):
    for stem in ("a", "c"):
        _png(tmp_path / "img" / f"{stem}.png")
        (tmp_path / "img" / f"{stem}.txt").write_text("x")
    _png(tmp_path / "ctl" / "a_x.png")
    _png(tmp_path / "ctl" / "zzz.png")
    plan = build_plan(_dataset(tmp_path), "edit")
    errors = _problems(plan, "error")
    assert ("a_x.png", "control image for 'a' has a non-numeric suffix 'x'") in errors
    assert any(f == "a.png" and "no control image" in m for f, m in errors)
    assert any(f == "c.png" and "no control image" in m for f, m in errors)
    assert ("zzz.png", "control image matches no target image") in _problems(plan, "warning")
    # without a model version controls are checked but not required; t2i ignores them with a warning
    assert all("no control image" not in m for _, m in _problems(build_plan(_dataset(tmp_path), None)))
    t2i = build_plan(_dataset(tmp_path), "original")
    assert not t2i.errors and all(not it.item.control_paths for it in t2i.items())
    assert any("ignored for the text-to-image" in m for _, m in _problems(t2i, "warning"))


# ------------------------------------------------------------------------------------------ JSONL

def test_jsonl_controls_sorted_and_renumbered(tmp_path):
    for name in ("t1.png", "t2.png", "c0.png", "c1.png", "c2.png"):
        _png(tmp_path / name)
    lines = [
        {"image_path": str(tmp_path / "t1.png"), "caption": " one ", "control_path": str(tmp_path / "c0.png")},
        {"image_path": str(tmp_path / "t2.png"), "caption": "two", "control_path_0002": str(tmp_path / "c2.png"),
         "control_path_0000": str(tmp_path / "c0.png"), "control_path_1": str(tmp_path / "c1.png")},
    ]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    cfg = _toml(tmp_path / "d.toml", f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = '
                                     f'"{tmp_path / "cache"}"\nresolution = [64, 48]\n')
    plan = build_plan(cfg, "edit-2511")
    assert not plan.errors
    items = {it.stem: it for it in plan.items()}
    assert items["t1"].item.caption == "one"
    assert [p.name for p in items["t1"].item.control_paths] == ["c0.png"]
    assert [p.name for p in items["t2"].item.control_paths] == ["c0.png", "c1.png", "c2.png"]
    assert items["t2"].bucket == (64, 48)


def test_jsonl_problems(tmp_path):
    _png(tmp_path / "t1.png")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"image_path": "%s"}\nnot json\n{"image_path": "%s", "caption": "x", "extra": 1}\n'
                     % (tmp_path / "t1.png", tmp_path / "gone.png"))
    cfg = _toml(tmp_path / "d.toml", f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = "c"\n')
    problems = build_plan(cfg, "original").problems
    by_file = {(p.file, p.level): p.message for p in problems}
    assert "caption" in by_file[(str(tmp_path / "t1.png"), "error")]
    assert "not valid JSON" in by_file[(f"{jsonl}:2", "error")]
    assert "unknown key 'extra'" in by_file[(f"{jsonl}:3", "warning")]
    assert by_file[(str(tmp_path / "gone.png"), "error")] == "image file not found"
    # JSONL needs a cache_directory (musubi's rule)
    bad = _toml(tmp_path / "e.toml", f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\n')
    with pytest.raises(DatasetError, match="no cache_directory"):
        load_dataset_config(bad)


# ------------------------------------------------------------------------------------------ buckets

def test_bucket_list_and_selection_match_musubi():
    buckets = B.bucket_list((1024, 1024))
    # musubi's buckets: widths from floor16(1024 // 2) to 1024, h = floor16(area // w), both orientations
    assert (512, 2048) in buckets and (2048, 512) in buckets and (1024, 1024) in buckets
    assert (1168, 896) in buckets and (896, 1168) in buckets
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets) and buckets == sorted(set(buckets))
    sel = B.BucketSelector((1024, 1024), enable_bucket=True, no_upscale=False)
    assert sel.select((1024, 1024)) == (1024, 1024)
    assert sel.select((800, 600)) == (1184, 880)           # closest aspect to 4:3
    assert sel.select((600, 800)) == (880, 1184)
    assert sel.select((100, 1000)) == (512, 2048)          # extreme aspect → the narrowest bucket
    no_up = B.BucketSelector((1024, 1024), enable_bucket=True, no_upscale=True)
    assert no_up.select((500, 333)) == (496, 320)          # small image: its own size floored to 16
    assert no_up.select((2000, 1500)) == (1184, 880)       # larger than the area: normal bucket
    off = B.BucketSelector((960, 544), enable_bucket=False, no_upscale=True)
    assert off.buckets == [(960, 544)] and off.select((500, 500)) == (960, 544)


def test_control_size_rules():
    target = (64, 48)
    assert B.control_size((100, 70), target, None, False) == target             # default: target's bucket
    assert B.control_size((100, 70), target, None, True) == (96, 64)            # native, floored to 16
    assert B.control_size((1000, 500), target, (64, 64), False) == B.area_bucket((1000, 500), (64, 64))
    assert B.control_size((40, 40), target, (64, 64), True) == (32, 32)         # smaller: native
    assert B.control_size((400, 200), target, (64, 64), True) == B.area_bucket((400, 200), (64, 64))
    assert B.area_bucket((800, 600), (1024, 1024)) == (1184, 880)


def test_resize_to_bucket_covers_and_crops():
    img = Image.new("RGB", (100, 50))
    img.paste((255, 0, 0), (0, 0, 25, 50))     # red left quarter is cropped away for a square bucket
    out = B.resize_to_bucket(img, (32, 32))
    assert out.size == (32, 32) and out.getpixel((0, 16)) == (0, 0, 0)
    assert B.resize_to_bucket(Image.new("RGBA", (16, 16)), (16, 16)).mode == "RGB"


# ------------------------------------------------------------------------------------------ schema

def test_precedence_defaults_and_deprecated_keys(tmp_path):
    (tmp_path / "i1").mkdir(), (tmp_path / "i2").mkdir()
    cfg = _toml(tmp_path / "d.toml", f"""
[general]
resolution = [1024, 768]
batch_size = 2
enable_bucket = true
bucket_no_upscale = true

[[datasets]]
image_directory = "{tmp_path / 'i1'}"
batch_size = 4
qwen_image_edit_control_resolution = 512
qwen_image_edit_no_resize_control = true

[[datasets]]
image_directory = "{tmp_path / 'i2'}"
resolution = 512
enable_bucket = false
""")
    config = load_dataset_config(cfg)
    d1, d2 = config.datasets
    assert (d1.resolution, d1.batch_size, d1.enable_bucket, d1.bucket_no_upscale) == ((1024, 768), 4, True, True)
    assert (d1.control_resolution, d1.no_resize_control, d1.caption_extension) == ((512, 512), True, ".txt")
    assert d1.cache_directory == tmp_path / "i1"                      # cache dir defaults to the image dir
    assert (d2.resolution, d2.batch_size, d2.num_repeats) == ((512, 512), 2, 1)
    assert d2.bucket_no_upscale is False                               # forced off without buckets (musubi)
    assert any("deprecated key 'qwen_image_edit_control_resolution'" in w and "d.toml:11" in w
               for w in config.warnings)
    defaults = load_dataset_config(_toml(tmp_path / "e.toml", f'[[datasets]]\nimage_directory = "{tmp_path}"\n'))
    assert defaults.datasets[0].resolution == (960, 544) and not defaults.datasets[0].enable_bucket


@pytest.mark.parametrize("text,match", [
    ('[general]\ncaption_extention = ".txt"\n[[datasets]]\nimage_directory = "x"\n',
     r"d.toml:2: unknown key 'caption_extention' in \[general\].*Did you mean 'caption_extension'"),
    ('[[datasets]]\nimage_directory = "x"\nnum_repeat = 2\n', r"d.toml:3: unknown key 'num_repeat'.*num_repeats"),
    ('[[datasets]]\nimage_directory = "x"\nbatch_size = 2\n\n[[datasets]]\nimage_directory = "y"\nbatch_size = 0\n',
     r"d.toml:7: 'batch_size' must be at least 1"),
    ('[general]\nimage_directory = "x"\n[[datasets]]\nimage_directory = "x"\n', r"belongs in \[\[datasets\]\]"),
    ('[[datasets]]\nimage_directory = "x\nresolution = 5\n', r"not valid TOML.*line 2"),
    ('[[datasets]]\nimage_directory = "x"\nresolution = [64]\n', r"d.toml:3: 'resolution' must be"),
    ('[[datasets]]\nimage_directory = "x"\nbatch_size = "2"\n', r"'batch_size' must be int"),
    ('[[datasets]]\ncaption_extension = ".txt"\n', r"exactly one of image_directory or image_jsonl_file"),
    ('[[datasets]]\nimage_directory = "x"\n[[datasets]]\nimage_directory = "x"\n', r"share the cache folder"),
    ('[[datasets]]\nvideo_directory = "x"\n', r"video dataset"),
    ('[general]\nresolution = 64\n', r"no \[\[datasets\]\]"),
])
def test_bad_config_names_line_and_key(tmp_path, text, match):
    with pytest.raises(DatasetError, match="(?s)" + match):
        load_dataset_config(_toml(tmp_path / "d.toml", text))


# ------------------------------------------------------------------------------------------ validation

def test_every_validation_problem_names_its_file(tmp_path):
    img = tmp_path / "img"
    _png(img / "ok.png"), (img / "ok.txt").write_text("fine")
    _png(img / "nocap.png")
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (img / "broken.txt").write_text("x")
    (img / "broken_uncaptioned.png").write_bytes(b"not an image")        # both of its problems, at once
    _png(img / "small.png", (40, 30)), (img / "small.txt").write_text("x")
    _png(img / "tiny.png", (8, 8)), (img / "tiny.txt").write_text("x")
    for stem in ("ok", "broken", "small", "tiny", "nocap"):
        _png(tmp_path / "ctl" / f"{stem}.png")
    plan = build_plan(_dataset(tmp_path), "edit")
    errors = dict(_problems(plan, "error"))
    assert "caption file is missing" in errors["nocap.txt"]
    assert "cannot be read as an image" in errors["broken.png"]
    assert "caption file is missing" in errors["broken_uncaptioned.txt"]
    assert "cannot be read as an image" in errors["broken_uncaptioned.png"]
    assert "smallest usable side" in errors["tiny.png"]
    assert "will be upscaled" in dict(_problems(plan, "warning"))["small.png"]
    assert [it.stem for it in plan.items()] == ["ok", "small"]
    with pytest.raises(DatasetError, match="5 problem"):
        plan.raise_if_errors()
    # allow_missing_captions turns the missing caption into a listed skip
    allowed = build_plan(_dataset(tmp_path, general="allow_missing_captions = true"), "edit")
    assert "nocap.txt" not in dict(_problems(allowed, "error"))
    assert "skipped" in dict(_problems(allowed, "warning"))["nocap.txt"]
    assert [it.image_path.name for it in allowed.datasets[0].skipped] == ["broken_uncaptioned.png", "nocap.png"]


def test_missing_directories_and_duplicate_stems(tmp_path):
    plan = build_plan(_dataset(tmp_path), "edit")
    assert [(f, m.split(" of ")[0]) for f, m in _problems(plan, "error")] == [
        ("img", "image_directory"), ("ctl", "control_directory does not exist")]
    _png(tmp_path / "img" / "a.png"), _png(tmp_path / "img" / "a.jpg")
    (tmp_path / "img" / "a.txt").write_text("x")
    plan = build_plan(_dataset(tmp_path), "edit")
    msgs = _problems(plan, "error")
    assert ("ctl", "control_directory does not exist") in msgs
    assert any(f == "a.png" and "cache files would collide" in m for f, m in msgs)


def test_check_dataset_cli_json_and_histogram(tmp_path):
    for stem, size in (("w", (128, 64)), ("s", (64, 64)), ("s2", (64, 64))):
        _png(tmp_path / "img" / f"{stem}.png", size), (tmp_path / "img" / f"{stem}.txt").write_text("x")
    cfg = _dataset(tmp_path, general="enable_bucket = true\nnum_repeats = 2", controls=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine", "check_dataset", "--dataset_config", str(cfg), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rep = next(json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"dataset_config"'))
    assert rep["ok"] and rep["datasets"][0]["items"] == 3
    assert rep["buckets"] == {"64x64": 4, "80x48": 2}
    assert rep == report(build_plan(cfg, None))
    (tmp_path / "img" / "w.txt").unlink()
    proc = subprocess.run([sys.executable, "-m", "engine", "check_dataset", "--dataset_config", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "w.txt: caption file is missing" in proc.stdout


def test_checking_loads_no_model_library(tmp_path):
    _png(tmp_path / "img" / "a.png"), (tmp_path / "img" / "a.txt").write_text("x")
    cfg = _dataset(tmp_path, controls=False)
    code = (f"import sys; from engine.spec.dataset.plan import build_plan; from engine.spec.dataset.check import report; "
            f"report(build_plan({str(cfg)!r}, 'original')); "
            f"print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_musubi_documentation_example_loads_unchanged(tmp_path):
    """musubi-tuner's dataset config documentation (its Qwen-Image-Edit section), keys and values as published."""
    for name in ("images", "controls"):
        (tmp_path / name).mkdir()
    _png(tmp_path / "images" / "image1.png", (1328, 1024)), (tmp_path / "images" / "image1.txt").write_text("x")
    _png(tmp_path / "controls" / "image1_0.png", (800, 600)), _png(tmp_path / "controls" / "image1_1.png", (512, 512))
    cfg = _toml(tmp_path / "musubi.toml", f"""
# general configurations
[general]
resolution = [1024, 1024]
caption_extension = ".txt"
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_directory = "{tmp_path / 'images'}"
control_directory = "{tmp_path / 'controls'}"
cache_directory = "{tmp_path / 'cache'}"
control_resolution = [1024, 1024]
no_resize_control = false
num_repeats = 1
""")
    plan = build_plan(cfg, "edit-2509")
    assert not plan.errors
    assert {Path(p.file).name for p in plan.warnings} == {"image1_0.png", "image1_1.png"}   # upscaled to ~1 MP
    item = plan.items()[0]
    assert item.bucket == B.BucketSelector((1024, 1024), True, False).select((1328, 1024))
    assert item.control_buckets == [B.area_bucket((800, 600), (1024, 1024)), (1024, 1024)]
