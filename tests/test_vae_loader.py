"""VAE loader: a tiny AutoencoderKLQwenImage saved in the diffusers and the ComfyUI/Wan layouts loads back through
`load_vae` and encodes/decodes exactly like the original; the Wan key rules agree with diffusers' own Wan converter;
encode_pixels/decode_latents match diffusers' pipelines; wrong files get one clear error each."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from engine.spec.errors import ModelFileError
from engine.models import common
from engine.models import vae as V
from engine.models.safetensors_io import save_file_atomic

TINY = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


def make_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    config = {**TINY, **overrides}
    if "latents_mean" not in config:   # non-trivial statistics, so the normalisation is really tested
        config["latents_mean"] = torch.linspace(-1, 1, 16).tolist()
        config["latents_std"] = torch.linspace(0.5, 3, 16).tolist()
    vae = V.model_class()(**config).eval()
    with torch.no_grad():   # RMS-norm gammas start at ones; perturb them so a mis-mapped gamma shows
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.add_(torch.randn_like(p) * 0.1)
    return vae


def config_json(vae) -> str:
    return json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")})


def to_wan(key: str, num_res_blocks: int) -> str:
    """diffusers → Wan/ComfyUI naming, written independently of the loader (checked against diffusers' own
    Wan converter in test_wan_rules_agree_with_diffusers_converter)."""
    module, _, param = key.rpartition(".")
    top = {v: k for k, v in V.WAN_TOP.items()}
    res = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}
    per_level = num_res_blocks + 2
    if module in top:
        return f"{top[module]}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)", module):
        return f"{m[1]}.middle.{2 * int(m[2])}.{res[m[3]]}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+)", module):
        return f"{m[1]}.middle.1.{m[2]}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(\w+)(.*)", module):
        return f"encoder.downsamples.{m[1]}.{res.get(m[2], m[2])}{m[3]}.{param}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
        return f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.{res[m[3]]}.{param}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", module):
        return f"decoder.upsamples.{int(m[1]) * per_level + num_res_blocks + 1}.{m[2]}.{param}"
    raise AssertionError(f"no Wan name for {key}")


def wan_state_dict(vae) -> dict:
    return {to_wan(k, vae.config.num_res_blocks): v for k, v in vae.state_dict().items()}


@pytest.fixture(scope="module")
def original():
    return make_vae()


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.rand(2, 3, 16, 24) * 2 - 1


@pytest.fixture(scope="module")
def codec(original, pixels):
    """The original module's encode/decode outputs, computed once."""
    with torch.no_grad():
        z = V.encode_pixels(original, pixels)
        return pixels, z, V.decode_latents(original, z)


def assert_same_codec(loaded, codec):
    pixels, z, images = codec
    with torch.no_grad():
        assert torch.equal(V.encode_pixels(loaded, pixels), z)
        assert torch.equal(V.decode_latents(loaded, z), images)


# ---- key rules -------------------------------------------------------------------------------------------------


def test_wan_rules_round_trip_tiny(original):
    sd = original.state_dict()
    wan = wan_state_dict(original)
    assert "conv1.bias" in wan and "decoder.upsamples.2.resample.1.weight" in wan   # 1 resnet/level: 3 per level
    rename = V.wan_key_rename(original.config.num_res_blocks)
    assert {rename(k): k2 for k, k2 in zip(wan, sd)} == {k: k for k in sd}


def test_wan_rules_agree_with_diffusers_converter():
    """With the published num_res_blocks=2, diffusers' own converter (hard-coded for that layout) gives the same
    names as our rules, and inverts the test's diffusers → Wan naming."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    vae = make_vae(base_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
    sd = vae.state_dict()
    wan = wan_state_dict(vae)
    converted = convert_wan_vae_to_diffusers(wan)
    assert set(converted) == set(sd)
    rename = V.wan_key_rename(2)
    assert all(torch.equal(converted[rename(k)], v) for k, v in wan.items())
    assert sorted(rename(k) for k in wan) == sorted(sd)


# ---- supported layouts -------------------------------------------------------------------------------------


def test_comfy_wan_file(tmp_path, original, codec):
    path = save_file_atomic(wan_state_dict(original), tmp_path / "qwen_image_vae.safetensors",
                            {"config": config_json(original)})
    loaded = V.load_vae(path, "cpu")
    assert type(loaded).__name__ == "AutoencoderKLQwenImage"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert_same_codec(loaded, codec)


def test_diffusers_folder_and_pipeline_folder(tmp_path, original, codec):
    original.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "config.json").is_file()
    assert_same_codec(V.load_vae(tmp_path / "vae", "cpu"), codec)
    assert_same_codec(V.load_vae(tmp_path, "cpu"), codec)   # pipeline folder with vae/
    # the file itself: its sibling config.json is an AutoencoderKLQwenImage config, so it is used
    assert_same_codec(V.load_vae(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", "cpu"), codec)


def test_diffusers_single_file(tmp_path, original, codec):
    path = save_file_atomic(original.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors",
                            {"config": config_json(original)})
    loaded = V.load_vae(path, "cpu", dtype=torch.float32)
    assert_same_codec(loaded, codec)
    assert V.load_vae(path, "cpu", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_published_config_has_126_9m_params():
    model = common.build_empty(V.model_class(), {k: v for k, v in V.PUBLISHED_VAE_CONFIG.items()
                                                 if not k.startswith("_")})
    assert sum(p.numel() for p in model.parameters()) == V.PUBLISHED_VAE_PARAMS == 126_892_531
    assert all(p.device.type == "meta" for p in model.parameters())


# ---- pixels ↔ latents vs diffusers' pipelines ----------------------------------------------------------------


def test_encode_pixels_matches_diffusers_edit_pipeline(original, pixels):
    from diffusers import QwenImageEditPipeline

    with torch.no_grad():
        ours = V.encode_pixels(original, pixels)
        # the pipeline's own method (posterior mode, then (z - mean) / std), run on our VAE
        ref = QwenImageEditPipeline._encode_vae_image(SimpleNamespace(vae=original, latent_channels=16),
                                                      pixels.unsqueeze(2), generator=None)
    assert ours.shape == (2, 16, 1, 2, 3)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert V.encode_pixels(original, pixels.unsqueeze(2)).shape == ours.shape   # 5-D input too


def test_decode_latents_matches_diffusers_pipeline(original):
    from diffusers.image_processor import VaeImageProcessor

    torch.manual_seed(2)
    latents = torch.randn(2, 16, 1, 2, 3)
    with torch.no_grad():
        ours = V.decode_latents(original, latents)
        # QwenImagePipeline.__call__: latents / (1 / std) + mean → decode → [:, :, 0] → postprocess
        cfg = original.config
        std = 1.0 / torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
        image = original.decode(latents / std + mean, return_dict=False)[0][:, :, 0]
        ref = VaeImageProcessor(vae_scale_factor=16).postprocess(image, output_type="pt")
    assert ours.shape == (2, 3, 16, 24) and ours.min() >= 0 and ours.max() <= 1
    assert (ours - ref).abs().max().item() <= 1e-5
    assert torch.equal(V.decode_latents(original, latents[:, :, 0]), ours)   # 4-D latents too


# ---- bad files: one clear error each, nothing written ------------------------------------------------------


def _refused(path, match):
    before = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(ModelFileError, match=match) as err:
        V.load_vae(path, "cpu")
    assert err.value.hint
    assert sorted(p.name for p in path.parent.iterdir()) == before
    return err.value


def _file(tmp_path, shapes: dict, name="vae.safetensors"):
    return save_file_atomic({k: torch.zeros(s) for k, s in shapes.items()}, tmp_path / name)


def test_sd_flux_vae_is_refused(tmp_path):
    err = _refused(_file(tmp_path, {"encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3),
                                    "encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (8, 16, 3, 3),
                                    "quant_conv.weight": (32, 32, 1, 1)}, "ae.safetensors"), "SD / SDXL / Flux")
    assert "qwen_image" in err.hint.lower() or "Qwen/Qwen-Image" in err.hint


def test_wan22_vae_is_refused(tmp_path):
    _refused(_file(tmp_path, {"conv1.weight": (96, 96, 1, 1, 1), "conv1.bias": (96,),
                              "encoder.conv1.weight": (160, 12, 3, 3, 3), "decoder.conv1.weight": (1024, 48, 3, 3, 3),
                              "encoder.downsamples.0.downsamples.0.residual.0.gamma": (160, 1, 1, 1)},
                         "wan2.2_vae.safetensors"), "48 latent channels")


def test_48_channel_diffusers_vae_is_refused(tmp_path):
    _refused(_file(tmp_path, {"quant_conv.weight": (96, 96, 1, 1, 1), "encoder.conv_in.weight": (160, 12, 3, 3, 3),
                              "decoder.conv_in.weight": (1024, 48, 3, 3, 3)}), "48 latent channels")


def test_layered_rgba_vae_is_refused(tmp_path):
    layered = make_vae(input_channels=4)
    path = save_file_atomic(wan_state_dict(layered), tmp_path / "qwen_image_layered_vae.safetensors",
                            {"config": config_json(layered)})
    _refused(path, "Layered RGBA")


@pytest.mark.parametrize("keys, match", [
    (("img_in.weight", "txt_in.weight", "transformer_blocks.0.img_mod.1.weight"), "Qwen-Image DiT"),
    (("model.layers.0.self_attn.q_proj.weight", "visual.blocks.0.attn.qkv.weight"), "text encoder"),
    (("some.random.weight",), "unknown layout"),
], ids=["dit", "text_encoder", "unknown"])
def test_other_components_are_refused(tmp_path, keys, match):
    _refused(_file(tmp_path, {k: (4, 4) for k in keys}), match)


def test_shape_mismatch_against_published_config(tmp_path, original):
    err = _refused(save_file_atomic(wan_state_dict(original), tmp_path / "vae.safetensors"), "expects")
    assert "published config" in err.message


def test_prequantized_fp8_vae_is_refused(tmp_path, original):
    sd = wan_state_dict(original)
    sd["decoder.head.2.weight"] = sd["decoder.head.2.weight"].to(torch.float8_e4m3fn)
    _refused(save_file_atomic(sd, tmp_path / "vae_fp8.safetensors", {"config": config_json(original)}),
             "pre-quantized fp8")


def test_invalid_config_metadata_is_refused(tmp_path, original):
    bad = {**json.loads(config_json(original)), "dim_mult": "x"}
    _refused(save_file_atomic(wan_state_dict(original), tmp_path / "vae.safetensors", {"config": json.dumps(bad)}),
             "not a valid AutoencoderKLQwenImage config")


def test_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "qwen_image_vae.safetensors"
    path.write_text("<html>sign in</html>")
    _refused(path, "not a safetensors file")
