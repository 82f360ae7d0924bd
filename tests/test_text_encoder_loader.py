"""Text-encoder loader: a tiny Qwen2_5_VLForConditionalGeneration saved in every supported layout loads back
through `load_text_encoder` and gives the same hidden states; wrong files get one clear error each."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from engine.spec.errors import ModelFileError
from engine.models import text_encoder as te
from engine.models.safetensors_io import save_file_atomic

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = 60, 61, 58, 59


def tiny_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=1,
                         rope_parameters={"mrope_section": [2, 3, 3], "rope_type": "default", "rope_theta": 1e6}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1]),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID,
        vision_end_token_id=VEND_ID, vision_token_id=57)


def flat_config_dict(config) -> dict:
    """The transformers-4 layout: text fields at the top level, `rope_scaling`, no text_config."""
    text = config.text_config.to_dict()
    rope = text.pop("rope_parameters")
    flat = {k: v for k, v in text.items() if k not in ("model_type", "architectures")}
    flat.update(model_type="qwen2_5_vl", vision_config=config.vision_config.to_dict(),
                rope_theta=rope["rope_theta"], rope_scaling={"mrope_section": rope["mrope_section"],
                                                              "rope_type": "default", "type": "default"},
                image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID,
                vision_end_token_id=VEND_ID, vision_token_id=57, tie_word_embeddings=False)
    return flat


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    model = te.model_class()(tiny_config()).eval()
    # Non-trivial norm weights, so a norm loaded wrongly (or left at ones) shows in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def old_layout(model, with_lm_head=True) -> dict:
    """ComfyUI `qwen_2.5_vl_7b.safetensors` keys: model.* (language model), visual.*, lm_head.*."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.visual."):
            out[k[len("model."):]] = v
        elif with_lm_head:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def inputs():
    """A text-only input and an image+text input (one 56x56 image → 4 merged image tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text = {"input_ids": torch.tensor([[3, 7, 11, 19, 23, 2], [5, 9, 13, 2, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])}
    arr = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    vision = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)(Image.fromarray(arr),
                                                                              return_tensors="pt")
    assert vision["image_grid_thw"].tolist() == [[1, 4, 4]]
    ids = torch.tensor([[3, 5, VSTART_ID] + [IMAGE_ID] * 4 + [VEND_ID, 7, 9, 2]])
    image = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMAGE_ID).long(),
             "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
    return {"text": text, "image": image}


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[-1]


def assert_same_outputs(loaded, original, inputs):
    for name, batch in inputs.items():
        assert torch.equal(hidden(loaded, batch), hidden(original, batch)), name


# ---- supported layouts -------------------------------------------------------------------------------------


def test_comfy_file_with_config_metadata(tmp_path, original, inputs):
    path = save_file_atomic(old_layout(original), tmp_path / "qwen_2.5_vl_7b.safetensors",
                            {"config": json.dumps(original.config.to_dict())})
    loaded = te.load_text_encoder(path, "cpu")
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert_same_outputs(loaded, original, inputs)
    assert torch.equal(loaded.lm_head.weight, original.lm_head.weight)


def test_comfy_file_without_lm_head_and_flat_config(tmp_path, original, inputs, caplog):
    """No lm_head: loads anyway, tied to the embedding (no copy), with a log line. The transformers-4 flat config
    layout is routed into text_config by Qwen2_5_VLConfig."""
    flat = flat_config_dict(original.config)
    assert "text_config" not in flat and flat["hidden_size"] == 32
    path = save_file_atomic(old_layout(original, with_lm_head=False), tmp_path / "te.safetensors",
                            {"config": json.dumps(flat)})
    with caplog.at_level(logging.INFO, logger="engine.models.text_encoder"):
        loaded = te.load_text_encoder(path, "cpu")
    assert loaded.config.text_config.hidden_size == 32
    assert loaded.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert_same_outputs(loaded, original, inputs)
    embed = loaded.model.language_model.embed_tokens.weight
    assert loaded.lm_head.weight.data_ptr() == embed.data_ptr()
    assert "no lm_head" in caplog.text


def test_current_layout_file(tmp_path, original, inputs):
    path = save_file_atomic(original.state_dict(), tmp_path / "te_current.safetensors",
                            {"config": json.dumps(original.config.to_dict())})
    assert_same_outputs(te.load_text_encoder(path, "cpu"), original, inputs)


def test_transformers_folder_sharded(tmp_path, original, inputs):
    folder = tmp_path / "text_encoder"
    original.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert_same_outputs(te.load_text_encoder(folder, "cpu"), original, inputs)
    # a pipeline folder holding text_encoder/ works as well, and so does the first shard (musubi's convention),
    # whose sibling config.json is used because it is a Qwen2.5-VL config
    assert_same_outputs(te.load_text_encoder(tmp_path, "cpu"), original, inputs)
    first = sorted(folder.glob("model-00001-of-*.safetensors"))[0]
    assert_same_outputs(te.load_text_encoder(first, "cpu"), original, inputs)


def test_foreign_sibling_config_is_ignored(tmp_path, original):
    """A ComfyUI file next to another model's config.json: that config is not used (the file's metadata is)."""
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage", "z_dim": 16}))
    path = save_file_atomic(old_layout(original), tmp_path / "te.safetensors",
                            {"config": json.dumps(original.config.to_dict())})
    assert te.text_encoder_files(path) == ([path], None)


def test_dtype_argument(tmp_path, original, inputs):
    path = save_file_atomic(old_layout(original), tmp_path / "te.safetensors",
                            {"config": json.dumps(original.config.to_dict())})
    loaded = te.load_text_encoder(path, "cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_fp8_vl_runs_and_is_close(tmp_path, original, inputs):
    path = save_file_atomic(old_layout(original), tmp_path / "te.safetensors",
                            {"config": json.dumps(original.config.to_dict())})
    loaded = te.load_text_encoder(path, "cpu", fp8_vl=True)
    dtypes = {n: p.dtype for n, p in loaded.named_parameters()}
    assert dtypes["model.language_model.layers.0.self_attn.q_proj.weight"] == torch.float8_e4m3fn
    assert dtypes["model.visual.blocks.0.attn.qkv.weight"] == torch.float8_e4m3fn
    assert dtypes["model.language_model.layers.0.self_attn.q_proj.bias"] == torch.float32
    assert dtypes["model.language_model.embed_tokens.weight"] == torch.float32
    assert dtypes["model.language_model.norm.weight"] == torch.float32
    assert dtypes["model.visual.patch_embed.proj.weight"] == torch.float32

    # Exact reference: the original with its Linear weights rounded through fp8 (compute stays float32).
    rounded = te.model_class()(original.config).eval()
    rounded.load_state_dict(original.state_dict())
    with torch.no_grad():
        for m in rounded.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.to(torch.float8_e4m3fn).float())
    for name, batch in inputs.items():
        out, ref, exact = hidden(loaded, batch), hidden(rounded, batch), hidden(original, batch)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        rel = ((out - exact).norm() / exact.norm()).item()
        assert 0 < rel < 0.1, (name, rel)
        print(f"fp8_vl {name}: relative error vs unrounded weights {rel:.4f}")


def test_published_config_has_8_29b_params():
    model = te.common.build_empty(te.model_class(), te.make_config(te.PUBLISHED_TE_CONFIG, "published"))
    n = sum(p.numel() for p in model.parameters())
    assert n == te.PUBLISHED_TE_PARAMS == 8_292_166_656
    assert all(p.device.type == "meta" for p in model.parameters())


# ---- bad files: one clear error each, nothing written ------------------------------------------------------


def _refused(path, match):
    before = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(ModelFileError, match=match) as err:
        te.load_text_encoder(path, "cpu")
    assert err.value.hint
    assert sorted(p.name for p in path.parent.iterdir()) == before
    return err.value


def _file(tmp_path, tensors: dict, name="x.safetensors", metadata=None):
    return save_file_atomic({k: torch.zeros(v) for k, v in tensors.items()}, tmp_path / name, metadata)


@pytest.mark.parametrize("keys, match", [
    ({"shared.weight": (8, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4)}, "T5"),
    ({"text_model.encoder.layers.0.self_attn.q_proj.weight": (4, 4)}, "CLIP"),
    ({"model.embed_tokens.weight": (8, 4), "model.layers.0.self_attn.q_norm.weight": (4,),
      "model.layers.0.self_attn.q_proj.weight": (4, 4)}, "without a vision tower"),       # Qwen3
    ({"img_in.weight": (4, 4), "txt_in.weight": (4, 4), "transformer_blocks.0.img_mod.1.weight": (4, 4)},
     "Qwen-Image DiT"),
    ({"model.diffusion_model.img_in.weight": (4, 4), "model.diffusion_model.txt_in.weight": (4, 4),
      "model.diffusion_model.transformer_blocks.0.img_mod.1.weight": (4, 4)}, "Qwen-Image DiT"),
    ({"double_blocks.0.img_attn.qkv.weight": (4, 4)}, "Flux"),
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3),
      "decoder.conv_in.weight": (8, 4, 3, 3)}, "2-D image VAE"),
    ({"model.embed_tokens.weight": (8, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4),
      "model.layers.0.self_attn.q_proj.bias": (4,)}, "without a vision tower"),
], ids=["t5", "clip", "qwen3", "dit", "comfy_dit", "flux", "sd_vae", "text_only_qwen"])
def test_wrong_family_is_refused(tmp_path, keys, match):
    err = _refused(_file(tmp_path, keys), match)
    assert "qwen_2.5_vl_7b.safetensors" in err.hint


def test_shape_mismatch_names_tensor(tmp_path, original):
    # A tiny file without config metadata is checked against the published 7B config.
    path = save_file_atomic(old_layout(original), tmp_path / "te.safetensors")
    err = _refused(path, "expects")
    assert "published config" in err.message and "shape" in err.message


def test_prequantized_fp8_is_refused(tmp_path, original):
    sd = old_layout(original)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    path = save_file_atomic(sd, tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                            {"config": json.dumps(original.config.to_dict())})
    _refused(path, "pre-quantized fp8")


def test_wrong_model_type_in_config_is_refused(tmp_path, original):
    path = save_file_atomic(old_layout(original), tmp_path / "te.safetensors",
                            {"config": json.dumps({"model_type": "qwen3", "hidden_size": 32})})
    _refused(path, "'qwen3' model, not Qwen2.5-VL")


def test_invalid_config_metadata_is_refused(tmp_path, original):
    path = save_file_atomic(old_layout(original), tmp_path / "te.safetensors",
                            {"config": json.dumps({"model_type": "qwen2_5_vl", "text_config": "oops"})})
    _refused(path, "not a valid Qwen2.5-VL config")


def test_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "qwen_2.5_vl_7b.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    _refused(path, "not a safetensors file")


def test_mixed_layouts_are_refused(tmp_path, original):
    sd = old_layout(original)
    sd["model.visual.extra"] = sd.pop("visual.merger.ln_q.weight")
    _refused(save_file_atomic(sd, tmp_path / "te.safetensors"), "mixes the old key layout")
