"""inspect_lora and convert_lora on LoRAs shaped for the demo DiT: every format is described, conversions are exact
both ways, the converted files load in diffusers' load_lora_weights with the same effect, foreign files are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _dit_util import dit_inputs, run
from _lora_tools_util import error_of, make_lora, run_inproc
from engine.spec.lora_keys import summarize, summary_markdown

FORMATS = ("kohya", "musubi", "diffusers", "comfyui")
META = {"ss_base_model_version": "qwen_image", "ss_steps": "120", "ss_num_epochs": "3",
        "modelspec.architecture": "Qwen-Image/lora", "sshs_model_hash": "abc123",
        "ss_datasets": json.dumps([{"num_train_images": 12, "num_repeats": 2, "resolution": [512, 512]}])}


@pytest.fixture(scope="module")
def dit_path(demo_manifest):
    return demo_manifest["dit"]["original"]


@pytest.fixture(scope="module")
def source(dit_path, tmp_path_factory):
    """A kohya LoRA with mixed ranks and alphas (so per-module patterns matter), bf16 like trained files."""
    ranks = {"transformer_blocks.1.attn.to_q": 2, "transformer_blocks.0.img_mlp.net.2": 3}
    path = make_lora(dit_path, tmp_path_factory.mktemp("src") / "src.safetensors", rank=4, alpha=2.0,
                     dtype=torch.bfloat16, metadata=META, ranks=ranks)
    state = load_file(path)
    state["lora_unet_transformer_blocks_1_attn_to_v.alpha"] = torch.tensor(8.0, dtype=torch.bfloat16)
    save_file(state, path, metadata=META)
    return path


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("conv")
    out = {}
    for fmt in FORMATS:
        rc, events = run_inproc("convert_lora", "--input", source, "--output", folder / f"{fmt}.safetensors",
                                "--format", fmt)
        assert rc == 0, error_of(events)
        out[fmt] = folder / f"{fmt}.safetensors"
    return out


def test_inspect_describes_every_format(source, converted):
    for fmt, path in converted.items():
        s = summarize(path)
        assert s["format"] == ("kohya" if fmt == "musubi" else fmt)
        assert s["modules"] == 28 and s["version"] == "original" and s["dtype"] == "bf16"
        assert s["rank"] is None and s["ranks"] == {"2": 1, "3": 1, "4": 26}
        per = s["per_module"]
        assert per["transformer_blocks.1.attn.to_v"]["alpha"] == 8.0
        assert per["transformer_blocks.0.attn.to_q"]["alpha"] == 2.0
        assert s["targets"]["num_blocks"] == 2 and len(s["targets"]["layers"]) == 14
        assert s["training"]["steps"] == "120" and s["training"]["file hash"] == "abc123"
        assert "num_train_images=12" in s["datasets"]
        md = summary_markdown(s)
        assert "| format |" in md and "Qwen-Image" in md


def test_inspect_command_json(source):
    from engine.spec.commands import COMMANDS

    assert COMMANDS["inspect_lora"].prints_result(type("C", (), {"json": True})())
    rc, events = run_inproc("inspect_lora", source)
    assert rc == 0


def test_round_trips_are_exact(source, converted, tmp_path):
    original = load_file(source)
    for fmt in FORMATS:
        back = tmp_path / f"back_{fmt}.safetensors"
        rc, events = run_inproc("convert_lora", "--input", converted[fmt], "--output", back, "--format", "kohya")
        assert rc == 0, error_of(events)
        again = load_file(back)
        assert again.keys() == original.keys(), fmt
        for k, v in original.items():
            assert again[k].dtype == v.dtype and torch.equal(again[k], v), (fmt, k)
    from safetensors import safe_open

    with safe_open(str(converted["diffusers"]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "120" and "lora_adapter_metadata" in meta     # training metadata kept


def test_converted_files_load_in_diffusers(dit_path, source, converted):
    """diffusers' load_lora_weights on each converted file equals our load-time merge of the source."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from engine.models.dit import load_dit
    from engine.models.lora_formats import LoraMerger, read_lora

    base = load_dit(dit_path, device="cpu")
    merger = LoraMerger([(read_lora(source), 1.0)])
    ours = load_dit(dit_path, device="cpu", transform=merger.transform)
    inputs = dit_inputs(h=4, w=4, text=5)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][..., :32]
    with torch.no_grad():
        reference, plain = run(ours, inputs), run(base, inputs)
    assert (reference - plain).abs().max() > 1e-3                           # the LoRA changes the output
    for fmt in ("kohya", "diffusers", "comfyui"):
        pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                 tokenizer=None, transformer=copy.deepcopy(base))
        pipe.load_lora_weights(str(converted[fmt]), adapter_name="conv")
        with torch.no_grad():
            out = run(pipe.transformer, inputs)
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-3, msg=fmt)


def test_refusals(source, tmp_path):
    flux = tmp_path / "flux.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 4)}, flux)
    rc, events = run_inproc("convert_lora", "--input", flux, "--output", tmp_path / "x.safetensors")
    assert rc == 2 and "Flux LoRA" in error_of(events)["message"]
    assert not (tmp_path / "x.safetensors").exists()
    before = source.read_bytes()
    rc, events = run_inproc("convert_lora", "--input", source, "--output", source, "--format", "diffusers")
    assert rc == 2 and "never overwrite" in error_of(events)["message"]
    assert source.read_bytes() == before
    loha = tmp_path / "loha.safetensors"
    save_file({f"lora_unet_transformer_blocks_0_attn_to_q.{k}": torch.ones(2, 32) if k.endswith("b") else
               torch.ones(32, 2) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}, loha)
    rc, events = run_inproc("convert_lora", "--input", loha, "--output", tmp_path / "y.safetensors")
    assert rc == 2 and "not a plain LoRA" in error_of(events)["message"]
    s = summarize(loha)                                        # LyCORIS files are described, not converted
    assert s["format"] == s["kind"] == "loha" and s["rank"] == 2 and s["version"] is None


def test_a_model_file_is_not_a_lora(dit_path, tmp_path):
    rc, events = run_inproc("inspect_lora", dit_path)
    assert rc == 2 and "is not a LoRA file" in error_of(events)["message"]
    assert "inspect_model" in error_of(events)["hint"]
    rc, events = run_inproc("convert_lora", "--input", dit_path, "--output", tmp_path / "z.safetensors")
    assert rc == 2 and "is not a LoRA file" in error_of(events)["message"]
