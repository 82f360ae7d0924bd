"""inspect_model: identify tiny real-class files of every component from headers, the JSON contract of
docs/architecture.md, and the published DiT's exact parameter count from a 40 GB header-only (sparse) file."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.models.inspect import JSON_KEYS, format_table, inspect_path, inspect_paths
from engine.models.safetensors_io import save_file_atomic

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "model.diffusion_model."
TINY_DIT = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 4, 4))
BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1}


def header_only(path: Path, shapes: dict[str, tuple], dtype: str = "BF16", metadata: dict | None = None) -> Path:
    """A valid safetensors file whose data section is a hole (sparse): headers are all inspect reads."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


@pytest.fixture(scope="module")
def dit():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**TINY_DIT)


@pytest.fixture(scope="module")
def text_encoder():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=1000, eos_token_id=2, bos_token_id=0, pad_token_id=0,
                         rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default"}, rope_theta=1e6),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=12, video_token_id=13, vision_start_token_id=9, vision_end_token_id=10, vision_token_id=11)
    return Qwen2_5_VLForConditionalGeneration(cfg)


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True, True])


def comfy_te(sd: dict) -> dict:
    """transformers-5 keys → ComfyUI qwen_2.5_vl_7b layout (model.*, visual.*, no lm_head)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.visual."):
            out["visual." + k[len("model.visual."):]] = v
    return out


def numel(sd: dict) -> int:
    return sum(v.numel() for v in sd.values())


def lora_keys(targets: list[str], a: str, b: str, alpha: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for t in targets:
        out[f"{t}.{a}.weight"] = torch.zeros(4, 32)
        out[f"{t}.{b}.weight"] = torch.zeros(32, 4)
        if alpha:
            out[f"{t}.alpha"] = torch.tensor(1.0)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, dit, text_encoder, vae):
    d = tmp_path_factory.mktemp("inspect")
    dit_sd = dit.state_dict()
    cfg = {"config": json.dumps(dict(dit.config))}
    te_sd = text_encoder.state_dict()
    te_cfg = {"config": text_encoder.config.to_json_string()}
    vae_sd = vae.state_dict()
    f = {}
    f["dit_2509"] = save_file_atomic({PREFIX + k: v.bfloat16() for k, v in dit_sd.items()},
                                     d / "qwen_image_edit_2509_bf16.safetensors", cfg)
    f["dit_marker"] = save_file_atomic({**{k: v.bfloat16() for k, v in dit_sd.items()},
                                        "__index_timestep_zero__": torch.tensor([])}, d / "model.safetensors", cfg)
    f["dit_t2i"] = save_file_atomic(dit_sd, d / "qwen_image_fp32.safetensors", cfg)
    dit.save_pretrained(d / "Qwen-Image-Edit" / "transformer")
    f["dit_folder"] = d / "Qwen-Image-Edit" / "transformer"
    f["dit_fp8"] = save_file_atomic({PREFIX + k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.bfloat16()
                                     for k, v in dit_sd.items()}, d / "qwen_image_fp8_e4m3fn.safetensors", cfg)
    f["te_hf"] = save_file_atomic(te_sd, d / "te_transformers.safetensors", te_cfg)
    f["te_comfy"] = save_file_atomic(comfy_te(te_sd), d / "qwen_2.5_vl_tiny.safetensors", te_cfg)
    f["te_no_config"] = save_file_atomic(comfy_te(te_sd), d / "qwen_2.5_vl_noconfig.safetensors")
    f["vae"] = save_file_atomic(vae_sd, d / "diffusion_pytorch_model.safetensors")
    f["vae_comfy"] = header_only(d / "qwen_image_vae.safetensors", {
        "conv1.weight": (32, 32, 1, 1, 1), "conv2.weight": (16, 16, 1, 1, 1), "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "decoder.conv1.weight": (384, 16, 3, 3, 3), "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1)})
    f["vae_sd"] = header_only(d / "sdxl_vae.safetensors", {
        "encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3),
        "post_quant_conv.weight": (4, 4, 1, 1)})
    f["vae_wan22"] = header_only(d / "wan2.2_vae.safetensors", {
        "encoder.conv1.weight": (160, 12, 3, 3, 3), "decoder.conv1.weight": (1024, 48, 3, 3, 3),
        "conv1.weight": (96, 96, 1, 1, 1)})
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mlp.net.0.proj"]
    f["lora_kohya"] = save_file_atomic(
        lora_keys(["lora_unet_" + t.replace(".", "_") for t in targets], "lora_down", "lora_up", alpha=True),
        d / "my_lora.safetensors", {"ss_base_model_version": "qwen_image"})
    f["lora_diffusers"] = save_file_atomic(lora_keys(["transformer." + t for t in targets], "lora_A", "lora_B"),
                                           d / "pytorch_lora_weights.safetensors",
                                           {"modelspec.architecture": "Qwen-Image-Edit-Plus/lora"})
    f["lora_comfy"] = save_file_atomic(lora_keys(["diffusion_model." + t for t in targets], "lora_A", "lora_B"),
                                       d / "comfy_lora.safetensors")
    f["lora_flux"] = save_file_atomic(
        lora_keys(["lora_unet_double_blocks_0_img_attn_qkv"], "lora_down", "lora_up", alpha=True),
        d / "flux_lora.safetensors")
    f["flux_dit"] = header_only(d / "flux1-dev.safetensors", {"double_blocks.0.img_attn.qkv.weight": (9216, 3072),
                                                              "single_blocks.0.linear1.weight": (21504, 3072)})
    (d / "model.ckpt").write_bytes(b"\x80\x04\x95" + b"\x00" * 100)
    f["pickle"] = d / "model.ckpt"
    f["_sds"] = {"dit": numel(dit_sd), "te": numel(te_sd), "te_comfy": numel(comfy_te(te_sd)), "vae": numel(vae_sd)}
    return f


def by_key(files, names):
    results = inspect_paths([files[n] for n in names])
    assert all(list(r) == list(JSON_KEYS) for r in results)
    return dict(zip(names, results))


def test_dits_and_their_variants(files):
    r = by_key(files, ["dit_2509", "dit_marker", "dit_t2i", "dit_folder", "dit_fp8", "flux_dit"])
    n = files["_sds"]["dit"]
    assert r["dit_2509"] | {"path": None} == {"path": None, "component": "dit", "variant": "edit-2509",
                                              "dtype": "bf16", "params": n, "problems": r["dit_2509"]["problems"],
                                              "size_bytes": files["dit_2509"].stat().st_size, "can_caption": None}
    assert any("guessed from the file name" in p for p in r["dit_2509"]["problems"])
    assert (r["dit_marker"]["variant"], r["dit_marker"]["problems"]) == ("edit-2511", [])
    assert r["dit_marker"]["params"] == n                      # the marker tensor is empty
    assert (r["dit_t2i"]["variant"], r["dit_t2i"]["dtype"]) == ("original", "fp32")
    assert r["dit_folder"]["component"] == "dit" and r["dit_folder"]["variant"] == "edit"
    assert r["dit_folder"]["size_bytes"] == sum(p.stat().st_size for p in files["dit_folder"].glob("*.safetensors"))
    assert r["dit_fp8"]["dtype"] == "fp8_e4m3fn"
    assert any("pre-quantized fp8" in p and "cannot be used" in p for p in r["dit_fp8"]["problems"])
    assert r["flux_dit"]["variant"] is None and any("Flux" in p for p in r["flux_dit"]["problems"])


def test_text_encoders(files):
    r = by_key(files, ["te_hf", "te_comfy", "te_no_config"])
    assert r["te_hf"]["component"] == r["te_comfy"]["component"] == "text_encoder"
    assert r["te_hf"]["variant"] is None and r["te_hf"]["problems"] == [] and r["te_comfy"]["problems"] == []
    assert r["te_hf"]["params"] == files["_sds"]["te"] and r["te_comfy"]["params"] == files["_sds"]["te_comfy"]
    assert any("hidden size 32 with 2 layers" in p for p in r["te_no_config"]["problems"])


def test_vaes(files):
    r = by_key(files, ["vae", "vae_comfy", "vae_sd", "vae_wan22"])
    assert {v["component"] for v in r.values()} == {"vae"}
    assert r["vae"]["problems"] == [] and r["vae"]["params"] == files["_sds"]["vae"] and r["vae"]["dtype"] == "fp32"
    assert r["vae_comfy"]["problems"] == []
    assert any("wrong family" in p and "4 latent channels" in p for p in r["vae_sd"]["problems"])
    assert any("wrong family" in p and "48 latent channels" in p for p in r["vae_wan22"]["problems"])


def test_loras_and_unreadable_files(files):
    r = by_key(files, ["lora_kohya", "lora_diffusers", "lora_comfy", "lora_flux", "pickle"])
    assert {r[k]["component"] for k in ("lora_kohya", "lora_diffusers", "lora_comfy", "lora_flux")} == {"lora"}
    assert (r["lora_kohya"]["variant"], r["lora_diffusers"]["variant"], r["lora_comfy"]["variant"]) == \
        ("original", "edit-2509", None)
    assert r["lora_kohya"]["problems"] == r["lora_diffusers"]["problems"] == r["lora_comfy"]["problems"] == []
    assert any("not Qwen-Image" in p for p in r["lora_flux"]["problems"])
    assert r["pickle"]["component"] == "unknown" and "pickle" in r["pickle"]["problems"][0]
    assert r["pickle"]["size_bytes"] == 103


def test_incomplete_shard_set_is_a_problem_not_a_crash(tmp_path, dit):
    dit.save_pretrained(tmp_path / "t", max_shard_size="250KB")
    shards = sorted((tmp_path / "t").glob("*-of-*.safetensors"))
    shards[1].unlink()
    result = inspect_path(shards[0])
    assert result["component"] == "unknown" and "missing" in result["problems"][0]


def test_published_dit_params_from_a_40_gb_header(tmp_path):
    from engine.models.common import build_empty
    from engine.models.dit import PUBLISHED_DIT_CONFIG, PUBLISHED_DIT_PARAMS, dit_class

    model = build_empty(dit_class(), PUBLISHED_DIT_CONFIG)
    shapes = {PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}
    path = header_only(tmp_path / "qwen_image_bf16.safetensors", shapes)
    result = inspect_path(path)
    assert result["params"] == PUBLISHED_DIT_PARAMS == 20_430_401_088
    assert result["size_bytes"] > 40.8e9 and result["dtype"] == "bf16"
    assert (result["component"], result["variant"]) == ("dit", "original")
    assert not [p for p in result["problems"] if "guessed from the file name" not in p]


def test_table_names_every_file(files):
    table = format_table([inspect_path(files[k]) for k in ("dit_2509", "vae_sd", "pickle")])
    lines = table.splitlines()
    assert lines[0].startswith("file") and len(lines) == 4
    assert "qwen_image_edit_2509_bf16.safetensors" in lines[1] and "edit-2509" in lines[1]
    assert "wrong family" in lines[2] and "not a safetensors file" in lines[3]


def test_cli_json_in_a_subprocess(files):
    """stdout is the JSON result alone (events go to stderr), so `inspect_model ... --json | jq .` works."""
    paths = [str(files[k]) for k in ("dit_marker", "te_comfy", "vae", "lora_kohya", "pickle")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QIS_EVENTS": "json"}
    proc = subprocess.run([sys.executable, "-m", "engine", "inspect_model", *paths, "--json"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results == inspect_paths(paths)
    events = [json.loads(line)["type"] for line in proc.stderr.splitlines() if line.startswith("{")]
    assert events[0] == "start" and events[-1] == "done"
    assert [r["component"] for r in results] == ["dit", "text_encoder", "vae", "lora", "unknown"]


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
@pytest.mark.parametrize("command", [["inspect_model", "FILE", "--json"], ["estimate_vram", "--for", "generate_image"],
                                     ["check_dataset", "--dataset_config", "DATASET", "--json"]])
def test_a_result_on_stdout_pipes_into_jq(files, tmp_path, command):
    """Every command whose result is data prints only that result on stdout."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "a.txt").write_text("a caption")
    dataset = tmp_path / "d.toml"
    dataset.write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\nresolution = 32\n')
    argv = [str(files["vae"]) if a == "FILE" else str(dataset) if a == "DATASET" else a for a in command]
    engine = subprocess.Popen([sys.executable, "-m", "engine", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "QIS_EVENTS": "json"})
    jq = subprocess.run(["jq", "-c", "."], stdin=engine.stdout, capture_output=True, text=True, timeout=120)
    engine.stdout.close()
    assert engine.wait(timeout=120) == 0 and jq.returncode == 0, jq.stderr
    assert len(jq.stdout.splitlines()) == 1             # one JSON document, nothing else
    assert isinstance(json.loads(jq.stdout), (list, dict))
