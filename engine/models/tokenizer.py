"""The Qwen2 tokenizer and the edit models' vision processor.

`load_tokenizer` takes a local folder or a hub id (default: the `tokenizer` subfolder of Qwen/Qwen-Image, downloaded
once into the Hugging Face cache). `VisionProcessor` is built locally from that tokenizer plus the published
image-processor settings of Qwen-Image-Edit, so edit models need no second download and no torchvision
(transformers 5's Qwen2VLProcessor insists on a torchvision video processor; we only ever feed images).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from transformers import Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from engine.spec.errors import ModelFileError

log = logging.getLogger(__name__)

HUB_REPO = "Qwen/Qwen-Image"
HUB_SUBFOLDER = "tokenizer"
# The files of Qwen/Qwen-Image/tokenizer that a manual download needs (the rest are optional extras).
HUB_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")
# Either layout is loadable: the fast-tokenizer file alone, or the slow files with the config that registers the
# special tokens (vocab + merges alone would split `<|im_start|>` into pieces).
FAST_FILES = ("tokenizer.json",)
SLOW_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
# Tokens the prompt templates rely on; each must be one id, or the folder is not a Qwen2 tokenizer.
REQUIRED_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
IMAGE_TOKEN = "<|image_pad|>"

# Qwen/Qwen-Image-Edit processor/preprocessor_config.json (Qwen2.5-VL defaults).
IMAGE_PROCESSOR_SETTINGS = dict(
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    min_pixels=56 * 56,            # 3136
    max_pixels=28 * 28 * 16384,    # 12845056
    image_mean=[0.48145466, 0.4578275, 0.40821073],   # OpenAI CLIP
    image_std=[0.26862954, 0.26130258, 0.27577711],
)


def load_tokenizer(path_or_id: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None):
    """A transformers `Qwen2Tokenizer` from a local folder or a hub id (None = Qwen/Qwen-Image's tokenizer)."""
    folder = resolve_tokenizer_folder(path_or_id, cache_dir)
    check_tokenizer_folder(folder)

    try:
        tokenizer = Qwen2Tokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as exc:   # a damaged or foreign tokenizer file
        raise ModelFileError(f"tokenizer folder {folder}: its files cannot be read as a Qwen2 tokenizer "
                             f"({type(exc).__name__}: {exc})",
                             f"download the files again from https://huggingface.co/{HUB_REPO}/tree/main/"
                             f"{HUB_SUBFOLDER}") from exc
    _check_special_tokens(tokenizer, folder)
    return tokenizer


def resolve_tokenizer_folder(path_or_id=None, cache_dir=None) -> Path:
    """The local folder holding the tokenizer files, downloading from the hub only when given an id."""
    if path_or_id is None or str(path_or_id) == "":
        return _download(HUB_REPO, cache_dir)
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelFileError(f"--tokenizer {text}: this is a file, not a folder",
                             f"pass the folder that contains {', '.join(SLOW_FILES)} (or tokenizer.json)")
    if _looks_like_hub_id(text):
        return _download(text, cache_dir)
    raise ModelFileError(f"--tokenizer {text}: no such folder",
                         "pass an existing folder with the Qwen2 tokenizer files, or a hub id such as "
                         f"{HUB_REPO}")


def check_tokenizer_folder(folder: Path) -> None:
    """Refuse a folder that cannot give a Qwen2 tokenizer, listing the files it lacks."""
    present = {p.name for p in Path(folder).iterdir()}
    if all(f in present for f in FAST_FILES) or all(f in present for f in SLOW_FILES):
        return
    missing = [f for f in SLOW_FILES if f not in present]
    raise ModelFileError(
        f"tokenizer folder {folder} is incomplete: missing {', '.join(missing)} "
        f"(found: {', '.join(sorted(present)) or 'nothing'})",
        f"put {', '.join(SLOW_FILES)} (or a tokenizer.json) in that folder; they are in "
        f"https://huggingface.co/{HUB_REPO}/tree/main/{HUB_SUBFOLDER}")


def _looks_like_hub_id(text: str) -> bool:
    # "owner/name": one slash, no path-like start. Anything else was meant as a local path.
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _download(repo_id: str, cache_dir) -> Path:
    """snapshot_download of the tokenizer files only (cached after the first call; works offline once cached)."""
    patterns = [f"{HUB_SUBFOLDER}/*", *FAST_FILES, *HUB_FILES]
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
    except (OSError, HfHubHTTPError, ValueError) as exc:   # LocalEntryNotFoundError is an OSError
        raise ModelFileError(
            f"cannot get the tokenizer of {repo_id} from the Hugging Face hub and it is not in the local cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            f"on a machine with internet, download {', '.join(HUB_FILES)} from "
            f"https://huggingface.co/{repo_id}/tree/main/{HUB_SUBFOLDER} into one folder, copy it here and pass "
            "--tokenizer FOLDER") from exc
    sub = root / HUB_SUBFOLDER
    folder = sub if sub.is_dir() else root
    log.info("tokenizer: using %s (from %s)", folder, repo_id)
    return folder


def _check_special_tokens(tokenizer, folder) -> None:
    broken = [t for t in REQUIRED_SPECIAL_TOKENS if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if broken:
        raise ModelFileError(
            f"tokenizer folder {folder} is not a Qwen2 tokenizer with the Qwen2.5-VL special tokens: "
            f"{', '.join(broken)} is not a single token",
            f"use the tokenizer of {HUB_REPO} (https://huggingface.co/{HUB_REPO}/tree/main/{HUB_SUBFOLDER}); "
            "a tokenizer_config.json with added_tokens_decoder (or tokenizer.json) is needed")


class VisionProcessor:
    """Text + images → model inputs, like transformers' Qwen2VLProcessor(padding=True, return_tensors="pt").

    Each `<|image_pad|>` in the texts (in order across the batch) is expanded to grid_t·grid_h·grid_w / merge²
    copies for the matching image, then the texts are tokenized with padding.
    """

    def __init__(self, tokenizer, **overrides):
        self.tokenizer = tokenizer
        self.settings = {**IMAGE_PROCESSOR_SETTINGS, **overrides}
        # BICUBIC resampling and rescale 1/255 + normalise are the class defaults, as in the published config.
        self.image_processor = Qwen2VLImageProcessorPil(**self.settings)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.merge_size = self.settings["merge_size"]

    def __call__(self, texts: list[str] | str, images=None) -> dict:
        texts = [texts] if isinstance(texts, str) else list(texts)
        images = [] if images is None else list(images)
        n_pads = sum(t.count(IMAGE_TOKEN) for t in texts)
        if n_pads != len(images):
            raise ValueError(f"the texts hold {n_pads} {IMAGE_TOKEN} placeholders but {len(images)} images "
                             "were given; they must match one to one")
        out = {}
        if images:
            # Non-RGB images are converted by the image processor as transformers does (RGBA: composited on white).
            vision = self.image_processor(images, return_tensors="pt")
            out["pixel_values"] = vision["pixel_values"]
            out["image_grid_thw"] = vision["image_grid_thw"]
            texts = self._expand_image_pads(texts, out["image_grid_thw"])
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **out}
        # transformers' processor also returns this; Qwen2.5-VL needs it to give image tokens 3-D (mrope) positions.
        out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).to(torch.long)
        return out

    def _expand_image_pads(self, texts: list[str], grid_thw) -> list[str]:
        counts = iter(int(g.prod()) // self.merge_size ** 2 for g in grid_thw)
        expanded = []
        for text in texts:
            parts = text.split(IMAGE_TOKEN)
            pieces = [parts[0]]
            for part in parts[1:]:
                pieces += [IMAGE_TOKEN * next(counts), part]
            expanded.append("".join(pieces))
        return expanded
