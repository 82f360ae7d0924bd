"""The demo set (docs/architecture.md, "The demo"): tiny random models with the real architectures, in the real file layouts, plus
a small edit dataset, so every button of the app works on a laptop with no downloads and no GPU.

`make_demo(dir)` builds it once, in seconds on CPU, with fixed seeds. The build happens in a hidden sibling
folder that is renamed into place at the end, so a killed build never leaves a half demo: `dir/demo.json`
(the manifest the app pre-fills its forms from) exists only in a complete one.

The builders (`build_tokenizer`, `build_text_encoder`, `build_dit`, `build_vae`, `save_*_comfy`) are also the
tests' source of tiny models, so the tests load exactly what users of `--demo` load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from engine import demo_data
from engine.models.safetensors_io import save_file_atomic
from engine.spec.config import atomic_write_text
from engine.spec.demo_manifest import DEMO_VERSION, MANIFEST, load_manifest
from engine.spec.errors import EngineError, OptionError
from engine.spec.variants import VARIANTS

log = logging.getLogger(__name__)


# Qwen2.5-VL's added tokens in id order. The real ids are 151643 + index; the demo tokenizer gives them ids
# 0..21, so the offsets between them match the real ones.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
TOKENIZER_VOCAB_SIZE = 1000

DIT_FILES = {
    "original": "qwen_image_demo_bf16.safetensors",
    "edit": "qwen_image_edit_demo_bf16.safetensors",
    "edit-2509": "qwen_image_edit_2509_demo_bf16.safetensors",
    "edit-2511": "qwen_image_edit_2511_demo_bf16.safetensors",
}
TE_FILE = "qwen_2.5_vl_7b_demo.safetensors"
VAE_FILE = "qwen_image_vae_demo.safetensors"
COMFY_DIT_PREFIX = "model.diffusion_model."
MARKER_2511 = "__index_timestep_zero__"
SEEDS = {"text_encoder": 1, "vae": 2, "original": 10, "edit": 11, "edit-2509": 12, "edit-2511": 13}

# The real channel layout and VAE scale (64 packed latent channels, 16 latent channels, 8× VAE), 92K parameters.
TINY_DIT = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 4, 4))
# latents_mean/std are left at diffusers' defaults, which are the real Qwen-Image VAE's.
TINY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True])
# mrope sections sum to head_dim / 2 = 8; lm_head is separate, as in Qwen2.5-VL-7B.
TINY_TE_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False,
                    rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default"})
TINY_TE_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])


# ---------------------------------------------------------------------------------------------- entry points

def run(cfg, events) -> list[str]:
    manifest = make_demo(cfg.dir, force=cfg.force, events=events)
    return [str(Path(manifest["root"]) / MANIFEST)]


def make_demo(dir: str | os.PathLike, force: bool = False, events=None) -> dict:
    """Build the demo into `dir` (once) and return its manifest."""
    root = Path(dir).expanduser().resolve()
    if not force and (manifest := load_manifest(root)) is not None:
        log.info("demo already complete in %s", root)
        return manifest
    _check_replaceable(root)
    _remove_stale_builds(root)
    tmp = root.parent / f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.time()
    try:
        manifest = _build(tmp, root, events)
        manifest["build_seconds"] = round(time.time() - started, 2)
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # written last: "complete"
        _fsync_tree(tmp)
        return _install(tmp, root, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(root: Path) -> None:
    # Only an empty folder or an earlier demo may be replaced: never delete a user's unrelated folder.
    if root.is_file():
        raise OptionError(f"demo folder {root} is a file.", "Pass a folder path (it is created if missing).")
    if root.is_dir() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise OptionError(f"demo folder {root} already holds other files and no {MANIFEST}; refusing to replace it.",
                          "Pass a new or empty folder for the demo.")


def _remove_stale_builds(root: Path) -> None:
    """Hidden build/old folders left by killed builds (their process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(root.name)}\.(building|old)-(\d+)-[0-9a-f]+$")
    if not root.parent.is_dir():
        return
    for p in root.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(tmp: Path, root: Path, force: bool) -> dict:
    """Rename the finished build into place; the old demo (if any) is moved aside first, then deleted."""
    if not force and (manifest := load_manifest(root)) is not None:
        return manifest  # another process finished first: keep its demo
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(root, old)
    try:
        os.replace(tmp, root)
    except OSError:
        # A concurrent build put its folder there between our check and our rename: use it if complete.
        if (manifest := load_manifest(root)) is None:
            raise
        return manifest
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if (manifest := load_manifest(root)) is None:
        raise EngineError(f"the demo built in {root} does not check out as complete ({MANIFEST} or a file is "
                          "missing).", "Run `python -m engine make_demo DIR --force` again; if it repeats, "
                          "this is a bug.")
    return manifest


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------- the build

def _build(tmp: Path, root: Path, events) -> dict:
    """Everything lands in `tmp`; paths written into files and the manifest point at the final `root`."""
    steps = ("tokenizer", "text encoder", "DiTs", "VAE", "dataset")
    say = _Progress(events, steps)
    (tmp / "models").mkdir(parents=True)
    say("tokenizer")
    tokenizer = build_tokenizer(corpus=demo_data.corpus())
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    write_slow_tokenizer_files(tokenizer, tmp / "tokenizer")
    say("text encoder")
    te = build_text_encoder(len(tokenizer), qwen_token_ids(tokenizer), seed=SEEDS["text_encoder"])
    save_text_encoder_comfy(te, tmp / "models" / TE_FILE)
    say("DiTs")
    for version, name in DIT_FILES.items():
        save_dit_comfy(build_dit(version, seed=SEEDS[version]), tmp / "models" / name)
    say("VAE")
    save_vae(build_vae(seed=SEEDS["vae"]), tmp / "models" / VAE_FILE)
    say("dataset")
    data = demo_data.write_dataset(tmp, root)
    say.done()
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return {
        "version": DEMO_VERSION,
        "root": str(root),
        "dit": {v: str(root / "models" / n) for v, n in DIT_FILES.items()},
        "text_encoder": str(root / "models" / TE_FILE),
        "vae": str(root / "models" / VAE_FILE),
        "tokenizer": str(root / "tokenizer"),
        **data,
        "seeds": dict(SEEDS),
        "files": files,
    }


class _Progress:
    def __init__(self, events, steps):
        self.events, self.steps, self.i = events, steps, 0
        if events is not None:
            events.phase("building", what="demo models and dataset")

    def __call__(self, name: str) -> None:
        log.info("demo: building the %s", name)
        if self.events is not None:
            self.events.progress(self.i, len(self.steps), unit="part", name=name)
        self.i += 1

    def done(self) -> None:
        if self.events is not None:
            self.events.progress(len(self.steps), len(self.steps), unit="part", name="done")


# ---------------------------------------------------------------------------------------------- tokenizer

def build_tokenizer(corpus: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """A byte-level BPE trained offline with the Qwen2 normaliser and pre-tokenizer, wrapped as `Qwen2Tokenizer`.

    Trained on a corpus holding the prompt templates, it splits their prefixes into exactly the real tokens
    (34 for text-to-image, 64 for edit), which is what the pipelines' drop index counts.
    """
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Special tokens are cut out of the corpus so no merges are spent on their characters.
    special = re.compile("|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS))
    pieces = [p for text in corpus for p in special.split(text) if p]
    bpe.train_from_iterator(pieces, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # The real tokenizer_config's special tokens: eos <|im_end|>, pad <|endoftext|>, no unk, no bos.
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", errors="replace", model_max_length=131072)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS],
                         special_tokens=True)
    return tokenizer


def write_slow_tokenizer_files(tokenizer, folder: Path) -> None:
    """vocab.json + merges.txt and the added-token table, as in Qwen/Qwen-Image's tokenizer folder, so the
    folder also loads from the classic files (older transformers, other tools), not only from tokenizer.json."""
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {
        str(tokenizer.convert_tokens_to_ids(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                                      single_word=False, special=True)
        for t in QWEN_SPECIAL_TOKENS}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def qwen_token_ids(tokenizer) -> dict[str, int]:
    """The token ids a Qwen2.5-VL config needs, taken from `tokenizer` (demo or real)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                vision_token_id=ids["<|vision_pad|>"])


# ---------------------------------------------------------------------------------------------- models

@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch for one build without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bf16_exact(model):
    """Round the weights to bf16 values (kept in fp32) so the bf16 file and the in-memory model are identical."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return model.eval()


def text_encoder_config(vocab_size: int, token_ids: dict[str, int]):
    text = dict(TINY_TE_TEXT, vocab_size=vocab_size, bos_token_id=token_ids["bos_token_id"],
                eos_token_id=token_ids["eos_token_id"])
    ids = {k: v for k, v in token_ids.items() if k not in ("bos_token_id", "eos_token_id")}
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(TINY_TE_VISION), tie_word_embeddings=False,
                            architectures=["Qwen2_5_VLForConditionalGeneration"], **ids)


def build_text_encoder(vocab_size: int, token_ids: dict[str, int], seed: int = SEEDS["text_encoder"]):
    """A tiny `Qwen2_5_VLForConditionalGeneration` (hidden 32) with bf16-exact random weights."""
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(text_encoder_config(vocab_size, token_ids))
    return _bf16_exact(model)


def comfy_text_encoder_key(key: str) -> str:
    """transformers-5 key → ComfyUI `qwen_2.5_vl_7b.safetensors` key (the transformers-4 layout)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def save_text_encoder_comfy(model, path: str | os.PathLike) -> Path:
    tensors = {comfy_text_encoder_key(k): v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    config["dtype"] = "bfloat16"
    return save_file_atomic(tensors, path, metadata={"format": "pt", "config": json.dumps(config)})


def dit_config(version: str) -> dict:
    return dict(TINY_DIT, zero_cond_t=VARIANTS[version].zero_cond_t)


def build_dit(version: str = "original", seed: int | None = None):
    """A tiny `QwenImageTransformer2DModel` for `version` (Edit-2511 gets zero_cond_t) with bf16-exact weights."""
    with _seeded(SEEDS[version] if seed is None else seed):
        model = QwenImageTransformer2DModel(**dit_config(version))
    return _bf16_exact(model)


def save_dit_comfy(model, path: str | os.PathLike) -> Path:
    """ComfyUI layout: `model.diffusion_model.` keys, bf16, the diffusers config in metadata; Edit-2511 files
    carry ComfyUI's `__index_timestep_zero__` marker (an empty tensor: ComfyUI registers `torch.tensor([])`)."""
    tensors = {COMFY_DIT_PREFIX + k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    if model.config.zero_cond_t:
        tensors[COMFY_DIT_PREFIX + MARKER_2511] = torch.zeros(0, dtype=torch.bfloat16)
    return save_file_atomic(tensors, path, metadata={"format": "pt", "config": model.to_json_string()})


def build_vae(seed: int = SEEDS["vae"]):
    """A tiny `AutoencoderKLQwenImage` (vae scale 8, 16 latent channels, the real latents_mean/std)."""
    with _seeded(seed):
        model = AutoencoderKLQwenImage(**TINY_VAE)
    return _bf16_exact(model)


def save_vae(model, path: str | os.PathLike) -> Path:
    """diffusers layout (the keys of `AutoencoderKLQwenImage.state_dict()`), bf16, config in metadata."""
    tensors = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    return save_file_atomic(tensors, path, metadata={"format": "pt", "config": model.to_json_string()})
