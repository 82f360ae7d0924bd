"""The demo set (engine/demo.py): complete, built once, in the real file layouts, and read correctly by the
diffusers/transformers classes themselves (not only by our loaders); plus the shared conftest fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine import demo, demo_data
from engine.spec.errors import OptionError
from engine.spec.events import parse_line
from engine.spec.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------------- build, idempotence

def test_demo_is_complete(demo_dir, demo_manifest):
    m = demo_manifest
    assert m["version"] == demo.DEMO_VERSION and m["root"] == str(demo_dir.resolve())
    paths = [*m["dit"].values(), m["text_encoder"], m["vae"], *m["dataset_config"].values(),
             *m["dataset_configs"].values(), *m["sample_prompts"].values(), m["examples"]["control"],
             *m["examples"]["controls"], m["examples"]["mask"]]
    assert set(m["dit"]) == set(VARIANTS)
    for p in paths:
        assert Path(p).is_absolute() and Path(p).is_file(), p
    assert (Path(m["tokenizer"]) / "tokenizer.json").is_file()
    assert all((demo_dir / f).is_file() for f in m["files"])
    assert demo.load_manifest(demo_dir) == m
    assert not list(demo_dir.parent.glob(".demo.*")), "the temporary build folder was left behind"


def test_second_call_returns_the_demo_without_rebuilding(demo_dir, demo_manifest):
    before = snapshot(demo_dir)
    inode = demo_dir.stat().st_ino
    assert demo.make_demo(demo_dir) == demo_manifest
    assert snapshot(demo_dir) == before
    assert demo_dir.stat().st_ino == inode


def test_dataset_pairs_captions_controls_and_masks(demo_manifest):
    from PIL import Image

    ds = {k: Path(v) for k, v in demo_manifest["dataset"].items() if k not in ("count", "cache")}
    targets = sorted(ds["images"].glob("*.png"))
    assert len(targets) == len(demo_data.ITEMS) == demo_manifest["dataset"]["count"]
    sizes = set()
    for target in targets:
        image = Image.open(target)
        sizes.add(image.size)
        assert target.with_suffix(".txt").read_text(encoding="utf-8").strip()
        control = Image.open(ds["control"] / target.name)
        assert control.size == image.size
        pair = sorted(p.name for p in ds["control2"].glob(f"{target.stem}_*"))
        assert pair == [f"{target.stem}_0.png", f"{target.stem}_1.png"]
        mask = Image.open(ds["masks"] / target.name)
        assert mask.mode == "L" and mask.size == control.size
        # White = change: the pixels that differ between control and target lie inside the mask.
        changed = (np.asarray(image) != np.asarray(control)).any(axis=-1)
        white = np.asarray(mask) == 255
        assert changed.any() and white[changed].all()
        assert white.mean() < 0.5
    assert {(64, 64), (80, 48), (48, 80)} <= sizes


def test_dataset_tomls_follow_the_musubi_schema(demo_manifest):
    import tomllib

    for name, path in demo_manifest["dataset_configs"].items():
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        assert doc["general"] == {"resolution": [64, 64], "caption_extension": ".txt", "batch_size": 1,
                                  "enable_bucket": True, "bucket_no_upscale": False}
        (ds,) = doc["datasets"]
        assert Path(ds["image_directory"]).is_dir()
        assert ds["cache_directory"].startswith(str(Path(demo_manifest["root"]) / "cache"))
        assert ("control_directory" in ds) == (name != "t2i")
    lines = Path(demo_manifest["sample_prompts"]["original"]).read_text().splitlines()
    assert "a red circle --w 64 --h 64 --s 4 --d 42 --l 4.0" in lines
    edit2 = [ln for ln in Path(demo_manifest["sample_prompts"]["edit-2509"]).read_text().splitlines()
             if not ln.startswith("#")]
    for line in edit2:
        controls = [part.split(" ", 1)[1] for part in line.split(" --")[1:] if part.startswith("ci ")]
        assert len(controls) == 2 and all(Path(c).is_file() for c in controls)


# ---------------------------------------------------------------------------------------------- file layouts

def test_dit_files_are_comfyui_layout_and_load_into_the_diffusers_class(demo_manifest):
    from diffusers import QwenImageTransformer2DModel

    weights = {}
    for version, path in demo_manifest["dit"].items():
        tensors, meta = read_safetensors(path)
        config = json.loads(meta["config"])
        assert config["_class_name"] == "QwenImageTransformer2DModel"
        assert config["joint_attention_dim"] == 32 and config["in_channels"] == 64
        assert config["zero_cond_t"] is (version == "edit-2511")
        assert all(k.startswith("model.diffusion_model.") for k in tensors)
        marker = tensors.pop("model.diffusion_model.__index_timestep_zero__", None)
        assert (marker is not None) == (version == "edit-2511")
        if marker is not None:
            assert marker.numel() == 0
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        model = QwenImageTransformer2DModel.from_config(config)
        result = model.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in tensors.items()},
                                       strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        weights[version] = tensors["model.diffusion_model.proj_out.weight"]
    assert not torch.equal(weights["original"], weights["edit"]), "each DiT file has its own seed"
    # The in-memory builder gives exactly the file's weights (bf16-exact), so tests may use either.
    built = demo.build_dit("edit").state_dict()["proj_out.weight"]
    assert torch.equal(built, weights["edit"].float())


def test_text_encoder_file_is_comfyui_layout_with_tokenizer_ids(demo_manifest):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    tensors, meta = read_safetensors(demo_manifest["text_encoder"])
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"model", "visual", "lm_head"}
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in tensors)
    assert "model.embed_tokens.weight" in tensors and "visual.patch_embed.proj.weight" in tensors
    config = Qwen2_5_VLConfig(**json.loads(meta["config"]))
    tokenizer = Qwen2Tokenizer.from_pretrained(demo_manifest["tokenizer"])
    assert config.text_config.vocab_size == len(tokenizer) == tensors["lm_head.weight"].shape[0]
    assert config.text_config.hidden_size == 32
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    model = Qwen2_5_VLForConditionalGeneration(config)
    to_current = {demo.comfy_text_encoder_key(k): k for k in model.state_dict()}
    result = model.load_state_dict({to_current[k]: v for k, v in tensors.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_vae_file_is_diffusers_layout(demo_manifest):
    from diffusers import AutoencoderKLQwenImage

    tensors, meta = read_safetensors(demo_manifest["vae"])
    config = json.loads(meta["config"])
    assert config["_class_name"] == "AutoencoderKLQwenImage" and config["z_dim"] == 16
    assert config["latents_mean"][:2] == [-0.7571, -0.7089] and config["latents_std"][-1] == 1.916
    vae = AutoencoderKLQwenImage.from_config(config)
    assert set(tensors) == set(vae.state_dict())
    vae.load_state_dict(tensors, strict=True)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


# ---------------------------------------------------------------------------------------------- tokenizer

def test_demo_tokenizer_splits_the_templates_like_the_real_one(demo_manifest, real_tokenizer):
    from transformers import Qwen2Tokenizer

    tiny = Qwen2Tokenizer.from_pretrained(demo_manifest["tokenizer"])
    user_start = "<|im_start|>user\n"
    for variant in VARIANTS.values():
        prefix = variant.template[:variant.template.index(user_start) + len(user_start)]
        assert len(tiny(prefix)["input_ids"]) == variant.drop_idx == len(real_tokenizer(prefix)["input_ids"])
        for item in demo_data.ITEMS[:3]:
            text = variant.prompt_text(item.instruction, 2)
            assert [tiny.decode([i]) for i in tiny(text)["input_ids"]] == \
                [real_tokenizer.decode([i]) for i in real_tokenizer(text)["input_ids"]]
    # Special tokens keep the real offsets from <|endoftext|> (real ids 151643 + offset).
    for offset, token in enumerate(demo.QWEN_SPECIAL_TOKENS):
        assert tiny.convert_tokens_to_ids(token) == offset
        assert real_tokenizer.convert_tokens_to_ids(token) == 151643 + offset


def test_demo_tokenizer_loads_from_the_classic_files_too(demo_manifest, tmp_path):
    from transformers import Qwen2Tokenizer

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(Path(demo_manifest["tokenizer"]) / name, tmp_path / name)
    fast = Qwen2Tokenizer.from_pretrained(demo_manifest["tokenizer"])
    classic = Qwen2Tokenizer.from_pretrained(str(tmp_path))
    text = VARIANTS["edit-2509"].prompt_text("make the circle blue", 2)
    assert classic(text)["input_ids"] == fast(text)["input_ids"]
    assert classic.eos_token == "<|im_end|>" and classic.pad_token == "<|endoftext|>"


def test_real_tokenizer_dir_is_qwen_image_tokenizer(real_tokenizer_dir, real_tokenizer):
    from engine.models.tokenizer import load_tokenizer

    assert len(real_tokenizer) == 151665
    assert len(load_tokenizer(real_tokenizer_dir)) == 151665
    assert real_tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert len(real_tokenizer(VARIANTS["original"].template.split("{}")[0])["input_ids"]) == 34


def test_tiny_te_for_real_tokenizer(tiny_te_for_real_tokenizer, tiny_te_for_real_tokenizer_file, real_tokenizer):
    te = tiny_te_for_real_tokenizer
    assert te.config.image_token_id == 151655 and te.config.vision_start_token_id == 151652
    assert te.config.text_config.vocab_size == 152064 >= len(real_tokenizer)
    ids = real_tokenizer(VARIANTS["original"].prompt_text("a red circle", 0), return_tensors="pt")
    with torch.no_grad():
        hidden = te(**ids, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (1, ids["input_ids"].shape[1], 32) and hidden.std() > 0.1
    tensors, _ = read_safetensors(tiny_te_for_real_tokenizer_file)
    assert torch.equal(tensors["model.embed_tokens.weight"].float(),
                       te.state_dict()["model.language_model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------- partial builds

def test_partial_or_moved_builds_are_not_taken_for_a_demo(demo_dir, tmp_path):
    # A killed build leaves its hidden build folder (with a manifest even) next to the target: not a demo.
    target = tmp_path / "demo"
    leftover = tmp_path / ".demo.building-999999999-deadbeef"
    shutil.copytree(demo_dir, leftover)
    (leftover / "models" / demo.VAE_FILE).unlink()
    assert demo.load_manifest(target) is None
    # A copy in another place has stale absolute paths inside: not a demo there either.
    moved = tmp_path / "moved"
    shutil.copytree(demo_dir, moved)
    assert demo.load_manifest(moved) is None

    manifest = demo.make_demo(target)
    assert demo.load_manifest(target) == manifest
    assert not leftover.exists(), "a dead build's folder is cleaned up"

    # A demo with a file missing (deleted by hand) is rebuilt, not returned.
    missing = Path(manifest["dit"]["edit-2511"])
    missing.unlink()
    assert demo.load_manifest(target) is None
    demo.make_demo(target)
    assert missing.is_file() and demo.load_manifest(target) is not None

    # --force rebuilds a complete demo (same seeds, same weights, new files).
    before = missing.stat().st_mtime_ns, missing.stat().st_ino
    forced = demo.make_demo(target, force=True)
    assert (missing.stat().st_mtime_ns, missing.stat().st_ino) != before
    assert forced["files"] == manifest["files"]
    (new, new_meta), (old, old_meta) = read_safetensors(missing), read_safetensors(demo_dir / "models" / missing.name)
    assert new_meta == old_meta and new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)


def test_refuses_to_replace_an_unrelated_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OptionError, match="refusing to replace"):
        demo.make_demo(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- command line

def test_manifest_reading_needs_no_torch():
    """The app checks for a demo at start-up, where torch must not be imported (it costs seconds)."""
    code = "import sys, engine.spec.demo_manifest as m; m.load_manifest('/nonexistent'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr

def test_cli_make_demo_emits_start_and_done(tmp_path, demo_dir):
    target = tmp_path / "cli_demo"
    env = dict(os.environ, QIS_EVENTS="json", PYTHONPATH=str(ROOT))

    def run_cli():
        proc = subprocess.run([sys.executable, "-m", "engine", "make_demo", str(target)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [e for e in map(parse_line, proc.stdout.splitlines()) if e]

    events = run_cli()
    assert events[0]["type"] == "start" and events[0]["command"] == "make_demo"
    assert events[-1]["type"] == "done" and events[-1]["outputs"] == [str(target / "demo.json")]
    assert any(e["type"] == "progress" for e in events)
    assert demo.load_manifest(target) is not None
    # Fixed seeds: the same weights as the session's demo, built in another process.
    a, _ = read_safetensors(target / "models" / demo.DIT_FILES["edit-2509"])
    b, _ = read_safetensors(demo_dir / "models" / demo.DIT_FILES["edit-2509"])
    assert all(torch.equal(a[k], b[k]) for k in b)

    again = run_cli()
    assert again[-1]["type"] == "done" and not any(e["type"] == "progress" for e in again)
    assert any(e["type"] == "log" and "already complete" in e["message"] for e in again)


# ---------------------------------------------------------------------------------------------- conftest fixtures

def test_diffusers_edit_pipelines_run_on_the_demo_files(demo_manifest, patch_edit_pipeline_area, tmp_path):
    """The processor patch and the area fixture together: diffusers' own Edit and EditPlus pipelines, built
    from the demo files with diffusers/transformers classes, run at 64 px."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageEditPlusPipeline, QwenImageTransformer2DModel)
    from PIL import Image
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = Qwen2Tokenizer.from_pretrained(demo_manifest["tokenizer"])
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16),
                                 tokenizer=tokenizer)
    processor.save_pretrained(str(tmp_path / "processor"))
    reloaded = Qwen2VLProcessor.from_pretrained(str(tmp_path / "processor"))
    assert reloaded.image_processor.size["longest_edge"] == 28 * 28 * 16
    tensors, meta = read_safetensors(demo_manifest["text_encoder"])
    te = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**json.loads(meta["config"])))
    to_current = {demo.comfy_text_encoder_key(k): k for k in te.state_dict()}
    te.load_state_dict({to_current[k]: v.float() for k, v in tensors.items()})
    tensors, meta = read_safetensors(demo_manifest["vae"])
    vae = AutoencoderKLQwenImage.from_config(json.loads(meta["config"]))
    vae.load_state_dict({k: v.float() for k, v in tensors.items()})
    control = Image.open(demo_manifest["examples"]["control"]).convert("RGB")
    outputs = {}
    for version, cls, image in (("edit", QwenImageEditPipeline, control),
                                ("edit-2511", QwenImageEditPlusPipeline, [control, control.resize((48, 48))])):
        tensors, meta = read_safetensors(demo_manifest["dit"][version])
        dit = QwenImageTransformer2DModel.from_config(json.loads(meta["config"]))
        dit.load_state_dict({k[len("model.diffusion_model."):]: v.float() for k, v in tensors.items()
                             if not k.endswith("__index_timestep_zero__")})
        pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te.eval(), tokenizer=tokenizer,
                   processor=processor, transformer=dit.eval())
        out = pipe(image=image, prompt="make the circle blue", negative_prompt=" ", true_cfg_scale=2.0,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(42), output_type="np").images
        assert out.shape == (1, 64, 64, 3) and float(out.std()) > 0
        outputs[version] = out
    assert patch_edit_pipeline_area.vae_area == 64 * 64
