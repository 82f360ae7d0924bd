"""engine.spec.safetensors_header and engine.models.safetensors_io: our header parser and per-tensor reader against safetensors' own files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from engine.spec.errors import ModelFileError
from engine.models import safetensors_io as sio
from engine.spec import safetensors_header as hdr

ROOT = Path(__file__).resolve().parents[1]


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    return {
        "f32": base,
        "bf16": base.to(torch.bfloat16),
        "f16": base.to(torch.float16),
        "f64": base.double()[:2],
        "e4m3": base.to(torch.float8_e4m3fn),
        "e5m2": base.to(torch.float8_e5m2),
        "i64": torch.arange(11, dtype=torch.int64),
        "i8": torch.arange(-3, 4, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "odd": torch.randn(3, generator=g).to(torch.bfloat16),   # makes later offsets unaligned
        "after_odd": torch.randn(2, 3, generator=g),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                    b.reshape(-1).view(torch.uint8))


def test_reads_every_dtype_bit_exact_and_agrees_with_safetensors(tmp_path):
    tensors = sample_tensors()
    path = sio.save_file_atomic(tensors, tmp_path / "all.safetensors", {"config": '{"a": 1}', "x": "y"})
    header = hdr.read_header(path)
    assert header.metadata == {"config": '{"a": 1}', "x": "y"}
    assert set(header.tensors) == set(tensors)
    assert header.tensors["bf16"].dtype == "BF16" and header.tensors["e4m3"].dtype == "F8_E4M3"
    assert header.params() == sum(t.numel() for t in tensors.values())
    ours = dict(sio.iter_tensors([path]))
    theirs = st_load_file(str(path))
    for name, t in tensors.items():
        assert same_bits(ours[name], t), name
        assert same_bits(ours[name], theirs[name]), name


def test_casts_floats_only_and_applies_rename_keys_transform(tmp_path):
    path = sio.save_file_atomic(sample_tensors(), tmp_path / "m.safetensors")
    got = dict(sio.iter_tensors([path], dtype=torch.float32))
    assert got["bf16"].dtype == torch.float32 and got["e4m3"].dtype == torch.float32
    assert torch.equal(got["bf16"], sample_tensors()["bf16"].float())
    assert got["i64"].dtype == torch.int64 and got["bool"].dtype == torch.bool

    read = []

    def rename(k):
        read.append(k)
        return None if k.startswith("i") else f"p.{k}"

    def transform(name, t):
        if name == "p.f32":
            return {"p.f32": t * 2, "p.f32_scale": torch.tensor(2.0)}
        return None if name == "p.u8" else t

    got = dict(sio.iter_tensors([path], keys=lambda n: n in ("p.f32", "p.u8", "p.bool"), rename=rename,
                                transform=transform))
    assert set(got) == {"p.f32", "p.f32_scale", "p.bool"}
    assert torch.equal(got["p.f32"], sample_tensors()["f32"] * 2)
    assert set(read) == set(sample_tensors())          # rename saw every key; unselected ones were not read


def test_big_tensors_read_exactly_and_convert(tmp_path):
    # Several MiB: read through the chunked readinto loop and converted; same bits either way.
    big = torch.randn(1536, 1024, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    path = sio.save_file_atomic({"pad": torch.ones(3, dtype=torch.bfloat16), "big": big}, tmp_path / "b.safetensors")
    got = dict(sio.iter_tensors([path]))
    assert same_bits(got["big"], big)
    assert torch.equal(dict(sio.iter_tensors([path], dtype=torch.float32))["big"], big.float())


def write_shards(folder: Path, n: int = 3, with_index: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files, weight_map = [], {}
    for i in range(n):
        f = folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        st_save_file({f"t{i}": torch.full((2,), float(i))}, str(f))
        files.append(f)
        weight_map[f"t{i}"] = f.name
    if with_index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return files


def test_expand_shards_from_any_shard_folder_and_index(tmp_path):
    files = write_shards(tmp_path / "a")
    assert hdr.expand_shards(files[1]) == files
    assert hdr.expand_shards(tmp_path / "a") == files
    files_b = write_shards(tmp_path / "b", with_index=True)
    assert hdr.expand_shards(tmp_path / "b") == files_b
    merged = hdr.read_headers(files_b)
    assert {k: p for k, (p, _) in merged.items()} == {"t0": files_b[0], "t1": files_b[1], "t2": files_b[2]}
    assert dict(sio.iter_tensors(files_b))["t2"].tolist() == [2.0, 2.0]
    single = tmp_path / "c" / "only.safetensors"
    single.parent.mkdir()
    st_save_file({"x": torch.ones(1)}, str(single))
    assert hdr.expand_shards(single.parent) == [single]


def test_missing_shard_names_it(tmp_path):
    files = write_shards(tmp_path / "a")
    files[2].unlink()
    with pytest.raises(ModelFileError, match="model-00003-of-00003.safetensors") as e:
        hdr.expand_shards(files[0])
    assert "shards" in e.value.hint
    write_shards(tmp_path / "b", with_index=True)[1].unlink()
    with pytest.raises(ModelFileError, match=r"model-00002-of-00003.safetensors is missing"):
        hdr.expand_shards(tmp_path / "b")


def test_duplicate_tensor_across_shards_is_an_error(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st_save_file({"x": torch.ones(1)}, str(a))
    st_save_file({"x": torch.ones(1)}, str(b))
    with pytest.raises(ModelFileError, match="'x' is also in"):
        hdr.read_headers([a, b])


@pytest.mark.parametrize("content, expected", [
    (None, "zip archive"),                                                    # torch.save → .pt / .ckpt
    (b"\x80\x04\x95" + b"\x00" * 64, "Python pickle"),
    (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "GGUF"),
    (b"<!DOCTYPE html><html><body>Access denied</body></html>" * 2, "HTML"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 40860000000\n", "git-lfs pointer"),
    (b"abc", "only 3 bytes"),
])
def test_not_safetensors_is_named(tmp_path, content, expected):
    path = tmp_path / "weights.safetensors"
    if content is None:
        torch.save({"w": torch.ones(3)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ModelFileError, match=expected) as e:
        hdr.read_header(path)
    assert str(path) in e.value.message and "not a safetensors file" in e.value.message
    assert ".safetensors" in e.value.hint


def test_truncated_file_says_so(tmp_path):
    path = sio.save_file_atomic({"w": torch.randn(64, 64)}, tmp_path / "big.safetensors")
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full - 100)
    with pytest.raises(ModelFileError, match="truncated") as e:
        hdr.read_header(path)
    assert f"{full:,}" in e.value.message and "download" in e.value.hint.lower()


def test_broken_header_json(tmp_path):
    path = tmp_path / "broken.safetensors"
    body = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'   # missing the closing brace
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\x00" * 4)
    with pytest.raises(ModelFileError, match="header JSON is broken"):
        hdr.read_header(path)
    body = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}'  # 2 floats need 8 bytes
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\x00" * 8)
    with pytest.raises(ModelFileError, match="do not match its size"):
        hdr.read_header(path)


def test_save_file_atomic_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "x.safetensors"
    sio.save_file_atomic({"a": torch.ones(2)}, path)
    sio.save_file_atomic({"a": torch.zeros(3)}, path, {"k": "v"})
    assert sio.load_file(path)["a"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(Exception):
        sio.save_file_atomic({"a": torch.ones(1)}, path, {"k": 1})        # metadata must be strings
    assert sio.load_file(path)["a"].tolist() == [0.0, 0.0, 0.0]           # the old file survived
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.safetensors"]


def test_header_reading_does_not_import_torch(tmp_path):
    path = sio.save_file_atomic({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    code = ("import sys; from engine.spec import safetensors_header as s; h = s.read_header(sys.argv[1]); "
            "assert h.tensors['a'].shape == (2,); assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env, timeout=60)
