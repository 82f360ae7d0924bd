"""Fault suite: damaged and crafted model files, LoRAs and latent files. Each is refused with one clear error
naming the file before any model is loaded (or, for a NaN model, before anything is saved)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _fault_util import digest, one_clear_error, run_engine, safetensors_bytes
from engine.models.inspect import inspect_path
from engine.spec.safetensors_header import read_header

pytestmark = pytest.mark.fault("model_file")


@pytest.fixture(scope="module")
def base(demo_manifest):
    m = demo_manifest
    return ["generate_image", "--vae", m["vae"], "--text_encoder", m["text_encoder"], "--tokenizer", m["tokenizer"],
            "--device", "cpu", "--infer_steps", "2", "--image_size", "32", "32", "--prompt", "a red fox",
            "--seed", "1"]


def dit_parts(demo_manifest) -> tuple[dict, bytes]:
    """The demo DiT's header (dict, metadata included) and data section."""
    path = Path(demo_manifest["dit"]["original"])
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------------- headers

def _entry(**kw):
    return {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], **kw}}


HEADER_FAULTS = {
    "deeply_nested_header": lambda h, d: safetensors_bytes(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    "huge_header_length": lambda h, d: safetensors_bytes(h, d, length=2 ** 62),
    "header_longer_than_file": lambda h, d: safetensors_bytes(b'{"a": 1}', length=10_000),
    "header_not_json": lambda h, d: safetensors_bytes(b"{this is not json}   "),
    "header_is_a_list": lambda h, d: safetensors_bytes(b"[1, 2, 3]"),
    "dtype_is_a_list": lambda h, d: safetensors_bytes(_entry(dtype=["F32"]), b"\0" * 4),
    "negative_shape": lambda h, d: safetensors_bytes(_entry(shape=[-1]), b"\0" * 4),
    "offsets_are_strings": lambda h, d: safetensors_bytes(_entry(data_offsets=["0", "4"]), b"\0" * 4),
    "unknown_dtype": lambda h, d: safetensors_bytes(_entry(dtype="Q4_K"), b"\0" * 4),
    "truncated_data": lambda h, d: safetensors_bytes(h, d[: len(d) // 2]),
    "empty_file": lambda h, d: b"",
    "pickle_checkpoint": lambda h, d: b"\x80\x04\x95" + b"\0" * 64,
    "zip_checkpoint": lambda h, d: b"PK\x03\x04" + b"\0" * 64,
    "gguf_file": lambda h, d: b"GGUF" + b"\0" * 64,
    "html_login_page": lambda h, d: b"<!DOCTYPE html><html><body>Sign in</body></html>" + b" " * 32,
    "lfs_pointer": lambda h, d: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 40000000000\n",
    "metadata_not_object": lambda h, d: safetensors_bytes({**h, "__metadata__": [1, 2]}, d),
}


@pytest.mark.parametrize("fault", sorted(HEADER_FAULTS))
def test_damaged_dit_file_is_one_clear_error(fault, base, demo_manifest, tmp_path):
    header, data = dit_parts(demo_manifest)
    dit = write(tmp_path, f"{fault}.safetensors", HEADER_FAULTS[fault](header, data))
    before = digest(dit)
    rc, events = run_engine([*base, "--dit", dit, "--save_path", tmp_path / "out"], tmp_path / "ev.jsonl")
    one_clear_error(rc, events, dit, kind="model_file")
    assert digest(dit) == before and not list((tmp_path / "out").glob("*.png"))


def _with_config(header: dict, **changes) -> dict:
    config = json.loads(header["__metadata__"]["config"])
    config.update(changes)
    return {**header, "__metadata__": {**header["__metadata__"], "config": json.dumps(config)}}


CONFIG_FAULTS = {
    "ten_million_layers": dict(num_layers=10_000_000),
    "huge_rope_axis": dict(axes_dims_rope=[1_000_000, 4, 4]),
    "rope_axes_not_head_width": dict(axes_dims_rope=[8, 8, 8]),
    "huge_head_width": dict(attention_head_dim=1_000_000_000),
    "negative_heads": dict(num_attention_heads=-4),
    "deeply_nested_config": dict(extra={"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}),
    "config_list_of_a_million": dict(axes_dims_rope=list(range(1000))),
}


@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
def test_implausible_config_refused_before_building(fault, base, demo_manifest, tmp_path):
    """A 200 KB file must not make the engine allocate gigabytes: its config is bounded before anything is built,
    and inspect_model reports the same as a problem."""
    header, data = dit_parts(demo_manifest)
    dit = write(tmp_path, "dit.safetensors", safetensors_bytes(_with_config(header, **CONFIG_FAULTS[fault]), data))
    rc, events = run_engine([*base, "--dit", dit, "--save_path", tmp_path / "out"], tmp_path / "ev.jsonl")
    err = one_clear_error(rc, events, dit, kind="model_file")
    assert "config" in err["message"]
    assert any("config" in p for p in inspect_path(dit)["problems"])


def test_config_that_is_not_json(base, demo_manifest, tmp_path):
    header, data = dit_parts(demo_manifest)
    header = {**header, "__metadata__": {**header["__metadata__"], "config": "{" * 5000}}
    dit = write(tmp_path, "dit.safetensors", safetensors_bytes(header, data))
    rc, events = run_engine([*base, "--dit", dit, "--save_path", tmp_path / "out"], tmp_path / "ev.jsonl")
    one_clear_error(rc, events, dit, "config", kind="model_file")


def test_integer_dtype_weights_refused(base, demo_manifest, tmp_path):
    header, data = dit_parts(demo_manifest)
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16" and v["shape"])
    header[key] = {**header[key], "dtype": "I16"}                    # same byte size: a valid file of integers
    dit = write(tmp_path, "dit.safetensors", safetensors_bytes(header, data))
    rc, events = run_engine([*base, "--dit", dit, "--save_path", tmp_path / "out"], tmp_path / "ev.jsonl")
    one_clear_error(rc, events, dit, key, kind="model_file")


# ---------------------------------------------------------------------------------------------- LoRAs

def _lora(demo_manifest, make) -> dict[str, torch.Tensor]:
    key = "model.diffusion_model.transformer_blocks.0.attn.to_q.weight"
    h = read_header(demo_manifest["dit"]["original"]).tensors[key]
    out_f, in_f = h.shape
    stem = "lora_unet_transformer_blocks_0_attn_to_q"
    return make(stem, out_f, in_f)


LORA_FAULTS = {
    "one_dimensional_up": lambda s, o, i: {f"{s}.lora_down.weight": torch.zeros(4, i),
                                           f"{s}.lora_up.weight": torch.zeros(o)},
    "rank_mismatch": lambda s, o, i: {f"{s}.lora_down.weight": torch.zeros(4, i),
                                      f"{s}.lora_up.weight": torch.zeros(o, 3)},
    "integer_factors": lambda s, o, i: {f"{s}.lora_down.weight": torch.zeros(4, i, dtype=torch.int32),
                                        f"{s}.lora_up.weight": torch.zeros(o, 4, dtype=torch.int32)},
    "nan_factors": lambda s, o, i: {f"{s}.lora_down.weight": torch.full((4, i), float("nan")),
                                    f"{s}.lora_up.weight": torch.zeros(o, 4)},
    "made_for_a_wider_model": lambda s, o, i: {f"{s}.lora_down.weight": torch.zeros(4, i * 2),
                                               f"{s}.lora_up.weight": torch.zeros(o * 2, 4)},
    "alpha_with_two_values": lambda s, o, i: {f"{s}.lora_down.weight": torch.zeros(4, i),
                                              f"{s}.lora_up.weight": torch.zeros(o, 4), f"{s}.alpha": torch.ones(2)},
    "loha_shapes_do_not_combine": lambda s, o, i: {f"{s}.hada_w1_a": torch.zeros(o, 4),
                                                   f"{s}.hada_w1_b": torch.zeros(3, i),
                                                   f"{s}.hada_w2_a": torch.zeros(o, 4),
                                                   f"{s}.hada_w2_b": torch.zeros(4, i)},
}


@pytest.mark.parametrize("fault", sorted(LORA_FAULTS))
def test_bad_lora_is_one_clear_error(fault, base, demo_manifest, tmp_path):
    lora = tmp_path / f"{fault}.safetensors"
    save_file(_lora(demo_manifest, LORA_FAULTS[fault]), str(lora))
    rc, events = run_engine([*base, "--dit", demo_manifest["dit"]["original"], "--lora_weight", lora,
                             "--save_path", tmp_path / "out"], tmp_path / "ev.jsonl")
    one_clear_error(rc, events, lora, kind="model_file")
    assert not any(e["type"] == "phase" and e["name"] == "loading" for e in events)   # refused before any load


# ---------------------------------------------------------------------------------------------- --latent_path

def _latent(tmp_path, name, tensors, metadata=None) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


LATENT_FAULTS = {
    "no_latent_key": lambda: ({"x": torch.zeros(1, 16, 1, 2, 2)}, None),
    "integer_latent": lambda: ({"latent": torch.zeros(1, 16, 1, 2, 2, dtype=torch.int32)}, None),
    "three_dimensional": lambda: ({"latent": torch.zeros(16, 2, 2)}, None),
    "eight_channels": lambda: ({"latent": torch.zeros(1, 8, 1, 2, 2)}, None),
    "huge_size": lambda: ({"latent": torch.zeros(1, 16, 1, 1, 4096)}, None),
    "nan_values": lambda: ({"latent": torch.full((1, 16, 1, 2, 2), float("nan"))}, None),
    "parameters_not_json": lambda: ({"latent": torch.zeros(1, 16, 1, 2, 2)}, {"parameters": "{oops"}),
}


@pytest.mark.parametrize("fault", sorted(LATENT_FAULTS))
def test_bad_latent_file_is_one_clear_error(fault, demo_manifest, tmp_path):
    tensors, meta = LATENT_FAULTS[fault]()
    latent = _latent(tmp_path, fault, tensors, meta)
    rc, events = run_engine(["generate_image", "--vae", demo_manifest["vae"], "--device", "cpu", "--latent_path",
                             latent, "--save_path", tmp_path / "out"], tmp_path / "ev.jsonl")
    one_clear_error(rc, events, latent, kind="model_file")
    assert not list((tmp_path / "out").glob("*.png"))


def test_latent_path_that_is_text(demo_manifest, tmp_path):
    latent = write(tmp_path, "latent.safetensors", b"just some notes\n" * 4)
    rc, events = run_engine(["generate_image", "--vae", demo_manifest["vae"], "--device", "cpu", "--latent_path",
                             latent, "--save_path", tmp_path / "out"], tmp_path / "ev.jsonl")
    one_clear_error(rc, events, latent, kind="model_file")


# ---------------------------------------------------------------------------------------------- NaN model

def test_nan_dit_decode_is_refused_and_nothing_saved(base, demo_manifest, tmp_path):
    """A DiT whose output projection is NaN denoises to NaN: the decode says so instead of saving a black PNG."""
    header, data = dit_parts(demo_manifest)
    data = bytearray(data)
    key = "model.diffusion_model.proj_out.weight"
    start, end = header[key]["data_offsets"]
    nan = torch.full(((end - start) // 2,), float("nan"), dtype=torch.bfloat16)
    data[start:end] = nan.view(torch.uint8).numpy().tobytes()
    dit = write(tmp_path, "nan_dit.safetensors", safetensors_bytes(header, bytes(data)))
    rc, events = run_engine([*base, "--dit", dit, "--save_path", tmp_path / "out"], tmp_path / "ev.jsonl")
    err = one_clear_error(rc, events, "NaN", kind="numeric")
    assert "nothing was saved" in err["message"]
    assert not list((tmp_path / "out").glob("*.png"))
