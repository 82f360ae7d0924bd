"""`train_network` end to end on the demo models (CPU): the LoRA lowers the loss, its file has kohya keys for the
14 Linear layers of every block with the ss_*/modelspec metadata, intermediate saves follow musubi-tuner's
names, the event stream has what the GUI needs, and the file loads in diffusers' QwenImagePipeline and gives the
same image there as our `generate_image --lora_weight`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from _train_util import cached_dataset, done_outputs, fixed_loss, losses, train
from engine.models.lora_formats import BLOCK_LINEARS

STEPS = 40


@pytest.fixture(scope="module")
def t2i(demo_manifest, tmp_path_factory):
    return cached_dataset(demo_manifest, tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def run(demo_manifest, t2i, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    events = train("train_network", out, "--dit", demo_manifest["dit"]["original"], "--dataset_config", t2i,
                   "--output_dir", out, "--output_name", "demo", "--max_train_steps", STEPS, "--learning_rate", "3e-3",
                   "--network_dim", 8, "--network_alpha", 8, "--seed", 3, "--save_every_n_steps", 20,
                   "--save_format", "diffusers", "--sdpa")
    return out, events


def _merged_dit(dit_path, lora_path):
    from engine.models.lora_formats import LoraMerger, read_lora
    from engine.models.dit import load_dit

    merger = LoraMerger([(read_lora(lora_path), 1.0)]) if lora_path else None
    return load_dit(dit_path, transform=merger.transform if merger else None)


def test_lora_lowers_the_loss(run, demo_manifest, t2i):
    out, _ = run
    before = fixed_loss(_merged_dit(demo_manifest["dit"]["original"], None), t2i)
    after = fixed_loss(_merged_dit(demo_manifest["dit"]["original"], out / "demo.safetensors"), t2i)
    print(f"fixed-noise loss: base {before:.5f} -> LoRA {after:.5f} after {STEPS} steps")
    assert after < before * 0.98


def test_lora_file_keys_and_metadata(run):
    out, _ = run
    with safe_open(str(out / "demo.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    expected = {f"lora_unet_transformer_blocks_{b}_{lin.replace('.', '_')}.{part}"
                for b in range(2) for lin in BLOCK_LINEARS for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert len(BLOCK_LINEARS) == 14
    assert keys == expected
    assert meta["ss_network_dim"] == "8" and meta["ss_base_model_version"] == "qwen_image"
    assert meta["ss_steps"] == str(STEPS) and meta["modelspec.architecture"] == "Qwen-Image/lora"
    assert meta["sshs_model_hash"] and meta["ss_num_train_items"] == "8"
    assert json.loads(meta["ss_datasets"]) == [{"dataset_index": 0, "batch_size": 1, "num_repeats": 1, "num_items": 8}]


def test_saves_and_events(run):
    out, events = run
    assert (out / "demo-step00000020.safetensors").is_file() and (out / "demo_diffusers.safetensors").is_file()
    from engine.spec.config import TrainNetworkConfig, load_toml

    saved = load_toml(TrainNetworkConfig, out / "demo_config.toml")       # the resolved run, reloadable
    assert (saved.network_dim, saved.seed, saved.output_name, saved.events_file) == (8, 3, "demo", None)
    assert not list(out.glob(".*tmp*"))
    types = {e["type"] for e in events}
    assert {"start", "estimate", "phase", "progress", "metric", "vram", "checkpoint", "done"} <= types
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, STEPS + 1)) and progress[-1]["eta_s"] == 0
    metric = [e for e in events if e["type"] == "metric"][-1]
    assert metric["lr"] == pytest.approx(3e-3) and metric["it_s"] > 0 and "avg_loss" in metric
    checkpoints = [e["step"] for e in events if e["type"] == "checkpoint"]
    assert checkpoints == [20, 20, STEPS, STEPS]             # kohya + diffusers files at step 20 and the end
    assert str(out / "demo.safetensors") in done_outputs(events)
    assert len(losses(events)) == STEPS


def test_lora_in_diffusers_matches_generate_image(run, demo_manifest, real_tokenizer, real_tokenizer_dir,
                                                  tiny_te_for_real_tokenizer, tiny_te_for_real_tokenizer_file,
                                                  tmp_path):
    """The trained file in diffusers' load_lora_weights gives our generate_image's image (1/255 bar), and the
    LoRA visibly changes the image (so the comparison could fail)."""
    from diffusers import QwenImagePipeline

    from _generate_util import qwen_scheduler
    from engine.__main__ import main
    from engine.demo import build_dit, build_vae

    out, _ = run
    lora = out / "demo.safetensors"
    prompt, seed = "a red circle on a blue background", 5

    def ours(*extra):
        save = tmp_path / f"gen{len(extra)}"
        assert main(["generate_image", "--dit", demo_manifest["dit"]["original"], "--vae", demo_manifest["vae"],
                     "--text_encoder", str(tiny_te_for_real_tokenizer_file), "--tokenizer", str(real_tokenizer_dir),
                     "--device", "cpu", "--prompt", prompt, "--image_size", "64", "64", "--infer_steps", "3",
                     "--guidance_scale", "1.0", "--seed", str(seed), "--save_path", str(save), *extra]) == 0
        return np.asarray(Image.open(next(save.glob("*.png"))), dtype=np.float32)

    with_lora, without = ours("--lora_weight", str(lora)), ours()
    pipe = QwenImagePipeline(scheduler=qwen_scheduler(), vae=build_vae(), text_encoder=tiny_te_for_real_tokenizer,
                             tokenizer=real_tokenizer, transformer=build_dit("original"))
    pipe.load_lora_weights(str(lora))
    ref = np.asarray(pipe(prompt=prompt, true_cfg_scale=1.0, height=64, width=64, num_inference_steps=3,
                          generator=torch.Generator().manual_seed(seed)).images[0], dtype=np.float32)
    diff, effect = np.abs(with_lora - ref).mean(), np.abs(with_lora - without).mean()
    print(f"diffusers vs ours with the trained LoRA: {diff:.4f}/255; LoRA effect {effect:.3f}/255")
    assert diff < 1.0 and effect > 3 * max(diff, 0.3)


def test_metadata_stats_are_json_safe(run):
    out, _ = run
    with safe_open(str(out / "demo-step00000020.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "20"
    json.loads(meta.get("ss_network_args", "{}"))


def test_samples_during_training(demo_manifest, t2i, tmp_path):
    """--sample_prompts with musubi-tuner's per-line options (--w --h --s --d --l): --sample_at_first and every
    n steps, through the inference code; one `sample` event per PNG, of the line's size."""
    out = tmp_path / "s"
    events = train("train_network", out, "--dit", demo_manifest["dit"]["original"], "--dataset_config", t2i,
                   "--vae", demo_manifest["vae"], "--text_encoder", demo_manifest["text_encoder"], "--tokenizer",
                   demo_manifest["tokenizer"], "--output_dir", out, "--max_train_steps", 3,
                   "--sample_prompts", demo_manifest["sample_prompts"]["original"], "--sample_at_first",
                   "--sample_every_n_steps", 2)
    shown = [e for e in events if e["type"] == "sample"]
    assert [e["step"] for e in shown] == [0, 0, 0, 2, 2, 2]
    sizes = [Image.open(e["path"]).size for e in shown[:3]]
    assert sizes == [(64, 64), (64, 64), (80, 48)]
    assert all(e["path"].startswith(str(out / "sample")) for e in shown)
    assert "prompt" in json.loads(Image.open(shown[0]["path"]).text["parameters"])
