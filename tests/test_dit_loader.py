"""engine.models.dit.load_dit: every on-disk layout of docs/architecture.md ("Model files") loads a tiny real-class DiT that
reproduces the original module's output; every bad file gets its clear error before anything is built."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from engine.spec.errors import ModelFileError
from engine.models import common
from engine.models.dit import (MARKER_2511, PUBLISHED_DIT_CONFIG, PUBLISHED_DIT_PARAMS, dit_class, load_dit)
from engine.models.safetensors_io import save_file_atomic

TINY = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 4, 4))
PREFIX = "model.diffusion_model."


def tiny(**extra) -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**{**TINY, **extra}).eval()


def forward(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 8, 64, generator=g),          # target 2×2 + one 2×2 reference
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                  encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long),
                  timestep=torch.tensor([0.6]), img_shapes=[[(1, 2, 2), (1, 2, 2)]], return_dict=False)
    with torch.no_grad():
        return model(**inputs)[0]


def config_json(model) -> str:
    return json.dumps(dict(model.config))


def save_comfy(model, path: Path, prefix: str = PREFIX, metadata: bool = True, dtype=None, extra=None) -> Path:
    sd = {prefix + k: (v.to(dtype) if dtype else v) for k, v in model.state_dict().items()}
    sd.update(extra or {})
    return save_file_atomic(sd, path, {"config": config_json(model)} if metadata else None)


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def reference(model):
    return forward(model)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("prefix", [PREFIX, ""], ids=["comfy-prefixed", "unprefixed"])
def test_single_file_loads_and_reproduces_output(tmp_path, model, reference, prefix):
    path = save_comfy(model, tmp_path / "qwen_image_tiny.safetensors", prefix)
    loaded = load_dit(path, "original", "cpu")
    assert isinstance(loaded, QwenImageTransformer2DModel) and not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.equal(forward(loaded), reference)


def test_diffusers_transformer_folder_and_pipeline_folder(tmp_path, model, reference):
    folder = tmp_path / "Qwen-Image" / "transformer"
    model.save_pretrained(folder)                       # config.json + diffusion_pytorch_model.safetensors
    assert torch.equal(forward(load_dit(folder, "original", "cpu")), reference)
    assert torch.equal(forward(load_dit(folder.parent, "original", "cpu")), reference)


def test_hf_shard_set_from_folder_and_from_any_shard(tmp_path, model, reference):
    folder = tmp_path / "transformer"
    model.save_pretrained(folder, max_shard_size="250KB")
    shards = sorted(folder.glob("*-of-*.safetensors"))
    assert len(shards) == 2 and list(folder.glob("*.index.json"))
    assert torch.equal(forward(load_dit(folder, "original", "cpu")), reference)
    # A bare shard set (no index): any shard names the whole set; config.json next to it is used.
    (next(folder.glob("*.index.json"))).unlink()
    assert torch.equal(forward(load_dit(shards[1], "original", "cpu")), reference)


def test_bf16_file_loads_as_float32_on_cpu_and_bf16_when_asked(tmp_path, model):
    path = save_comfy(model, tmp_path / "qwen_image_bf16.safetensors", dtype=torch.bfloat16)
    rounded = tiny()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    loaded = load_dit(path, "original", "cpu")
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.equal(forward(loaded), forward(rounded))
    as_bf16 = load_dit(path, "original", "cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in as_bf16.parameters()} == {torch.bfloat16}


def test_edit_2511_marker_is_dropped_and_zero_cond_t_set(tmp_path):
    model = tiny(zero_cond_t=True)
    path = save_comfy(model, tmp_path / "qwen_image_edit_2511_bf16.safetensors",
                      extra={PREFIX + MARKER_2511: torch.tensor([])})
    loaded = load_dit(path, "edit-2511", "cpu")
    assert loaded.config.zero_cond_t is True
    assert torch.equal(forward(loaded), forward(model))


def test_config_from_metadata_is_overridden_by_the_model_version(tmp_path, model, reference):
    path = save_comfy(model, tmp_path / "qwen_image_edit_bf16.safetensors")   # config says zero_cond_t False
    loaded = load_dit(path, "edit-2511", "cpu")
    assert loaded.config.zero_cond_t is True
    assert not torch.equal(forward(loaded), reference)       # references now modulated at t = 0
    assert torch.equal(forward(load_dit(path, "edit", "cpu")), reference)


def test_transform_hook_sees_diffusers_names_and_its_result_is_loaded(tmp_path, model):
    path = save_comfy(model, tmp_path / "qwen_image_tiny.safetensors",
                      extra={PREFIX + MARKER_2511: torch.tensor([])})
    seen = []

    def transform(name, t):
        seen.append(name)
        return t + 1 if name == "proj_out.bias" else t

    loaded = load_dit(path, "edit-2511", "cpu", transform=transform)
    assert set(seen) == set(model.state_dict())           # stripped names, marker never passed on
    assert torch.equal(loaded.proj_out.bias, model.proj_out.bias + 1)


def test_published_config_has_the_published_parameter_count():
    empty = common.build_empty(dit_class(), PUBLISHED_DIT_CONFIG)
    params = list(empty.parameters())
    assert {p.device.type for p in params} == {"meta"}
    assert sum(p.numel() for p in params) == PUBLISHED_DIT_PARAMS == 20_430_401_088


def test_t2i_looking_file_with_edit_mode_warns_with_evidence(tmp_path, model, caplog):
    path = save_comfy(model, tmp_path / "qwen_image_bf16.safetensors")
    with caplog.at_level(logging.WARNING, logger="engine.models.dit"):
        load_dit(path, "edit", "cpu")
    assert "looks like a text-to-image model" in caplog.text and "does not contain 'edit'" in caplog.text


# ---------------------------------------------------------------------------------------------- bad files

def fake(keys: dict[str, tuple], dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape, dtype=dtype) for k, shape in keys.items()}


def bad_cases(model):
    sd = model.state_dict()
    fp8 = {PREFIX + k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in sd.items()}
    scaled = {**{PREFIX + k: v.to(torch.bfloat16) for k, v in sd.items()},
              PREFIX + "transformer_blocks.0.attn.to_q.scale_weight": torch.ones(1)}
    return {
        "fp8_e4m3fn": ("qwen_image_fp8_e4m3fn.safetensors", fp8, "original", "pre-quantized fp8.*F8_E4M3"),
        "fp8_scaled": ("qwen_image_fp8_scaled.safetensors", scaled, "original", "pre-quantized fp8.*scale_weight"),
        "flux": ("flux1-dev.safetensors", fake({"double_blocks.0.img_attn.qkv.weight": (9, 3),
                                                "single_blocks.0.linear1.weight": (3, 3)}), "original", "Flux"),
        "wan": ("wan2.1_t2v.safetensors", fake({"blocks.0.self_attn.q.weight": (3, 3),
                                                "blocks.0.cross_attn.q.weight": (3, 3)}), "original", "Wan 2.x DiT"),
        "sd3": ("sd3.5_large.safetensors", fake({PREFIX + "joint_blocks.0.x_block.attn.qkv.weight": (9, 3)}),
                "original", "SD3"),
        "text_encoder": ("qwen_2.5_vl_7b.safetensors", fake({"model.layers.0.self_attn.q_proj.weight": (4, 4),
                                                             "model.layers.0.self_attn.q_proj.bias": (4,),
                                                             "model.embed_tokens.weight": (10, 4),
                                                             "visual.blocks.0.attn.qkv.weight": (12, 4)}),
                         "original", "Qwen2.5-VL text encoder"),
        "vae": ("qwen_image_vae.safetensors", fake({"encoder.conv_in.weight": (8, 3, 3, 3, 3),
                                                    "decoder.conv_in.weight": (8, 16, 3, 3, 3),
                                                    "post_quant_conv.weight": (16, 16, 1, 1, 1)}),
                "original", "3-D causal VAE"),
        "edit_without_edit_mode": ("qwen_image_edit_bf16.safetensors", {PREFIX + k: v for k, v in sd.items()},
                                   "original", "looks like an edit-model DiT .*name 'qwen_image_edit_bf16"),
        "marker_wrong_version": ("qwen_image_edit_2509.safetensors",
                                 {**{PREFIX + k: v for k, v in sd.items()}, PREFIX + MARKER_2511: torch.tensor([])},
                                 "edit-2509", "Qwen-Image-Edit-2511 DiT, but --model_version is edit-2509"),
    }


CASES = ["fp8_e4m3fn", "fp8_scaled", "flux", "wan", "sd3", "text_encoder", "vae", "edit_without_edit_mode",
         "marker_wrong_version"]


@pytest.mark.parametrize("case", CASES)
def test_bad_dit_files_fail_clearly_and_write_nothing(tmp_path, model, case):
    name, tensors, version, pattern = bad_cases(model)[case]
    path = save_file_atomic(tensors, tmp_path / name, {"config": config_json(model)})
    before = listing(tmp_path)
    with pytest.raises(ModelFileError, match=pattern) as e:
        load_dit(path, version, "cpu")
    assert str(path) in e.value.message and e.value.hint
    assert listing(tmp_path) == before


def test_fp8_error_cites_the_seed(tmp_path, model):
    name, tensors, version, _ = bad_cases(model)["fp8_scaled"]
    path = save_file_atomic(tensors, tmp_path / name)
    with pytest.raises(ModelFileError) as e:
        load_dit(path, version, "cpu")
    assert "fp8_scaled / fp8_e4m3fn checkpoints cannot be used" in e.value.message
    assert "qwen_image_bf16.safetensors" in e.value.hint


def test_not_safetensors_and_truncated(tmp_path, model):
    ckpt = tmp_path / "qwen_image.safetensors"
    torch.save(model.state_dict(), ckpt)
    with pytest.raises(ModelFileError, match="not a safetensors file.*pickle"):
        load_dit(ckpt, "original", "cpu")
    path = save_comfy(model, tmp_path / "qwen_image_bf16.safetensors")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    before = listing(tmp_path)
    with pytest.raises(ModelFileError, match="truncated"):
        load_dit(path, "original", "cpu")
    assert listing(tmp_path) == before


def test_without_config_metadata_the_published_config_must_match(tmp_path, model):
    path = save_comfy(model, tmp_path / "qwen_image_tiny.safetensors", metadata=False)
    before = listing(tmp_path)
    with pytest.raises(ModelFileError) as e:
        load_dit(path, "original", "cpu")
    msg = e.value.message
    assert str(path) in msg and "published config" in msg
    assert re.search(r"tensor 'model\.diffusion_model\.[\w.]+' has shape \[32, \d+\] .* expects \[3072, \d+\]", msg)
    assert listing(tmp_path) == before


def test_config_metadata_that_disagrees_with_the_shapes(tmp_path, model):
    sd = {PREFIX + k: v for k, v in model.state_dict().items()}
    wrong = json.dumps({**dict(model.config), "joint_attention_dim": 48})
    path = save_file_atomic(sd, tmp_path / "qwen_image_tiny.safetensors", {"config": wrong})
    with pytest.raises(ModelFileError, match=r"'model.diffusion_model.txt_norm.weight' has shape \[32\] .*"
                                             r"'config' metadata.* expects \[48\]"):
        load_dit(path, "original", "cpu")
    fewer = json.dumps({**dict(model.config), "num_layers": 3})
    path = save_file_atomic(sd, tmp_path / "qwen_image_tiny.safetensors", {"config": fewer})
    with pytest.raises(ModelFileError, match=r"tensors the Qwen-Image DiT needs are missing.*transformer_blocks\.2"):
        load_dit(path, "original", "cpu")
