"""safetensors headers, read without torch: what a model file holds, in milliseconds even for 40 GB files.

A safetensors file starts with an 8-byte little-endian length and a JSON header naming every tensor's dtype,
shape and byte range. We parse it ourselves, so `inspect_model`, the cache status and every pre-flight check
answer without importing torch. Reading the tensors themselves is `engine/models/safetensors_io.py`.

API (the loaders and the cache status build on it; keep it stable):
- `read_header(path) -> Header`            validate + parse one file (reads only the header)
- `expand_shards(path) -> list[Path]`      file / first shard / folder → the safetensors files to read
- `read_headers(paths) -> dict[name, (Path, TensorInfo)]`  merged over shards; duplicate names are an error
- `DTYPE_INFO`, `DTYPE_SHORT`, `FP8_DTYPES`: dtype names
Errors are `engine.spec.errors.ModelFileError` naming the file, what was found and the fix.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from engine.spec.errors import ModelFileError

# safetensors dtype name → (bytes per value, torch dtype attribute); little-endian on disk.
DTYPE_INFO: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
    "U16": (2, "uint16"), "U32": (4, "uint32"), "U64": (8, "uint64"), "BOOL": (1, "bool"),
}
# Short names for reports (inspect_model's "dtype").
DTYPE_SHORT = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8_e4m3fn",
               "F8_E5M2": "fp8_e5m2"}


FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_HEADER_NESTING = 64                # tensor table → entry → shape list, plus nested metadata at most
SHARD_RE = re.compile(r"^(.*?)(\d+)-of-(\d+)\.safetensors$")

NOT_SAFETENSORS_HINT = ("Download the .safetensors file (see the download table in the README or the Models tab); "
                        "pickled .ckpt/.pt/.bin files and GGUF files are not supported.")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str                 # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int                 # byte offsets relative to the data section
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0        # absolute file offset of the data section
    file_size: int = 0

    def dtype_bytes(self) -> dict[str, int]:
        """Bytes stored per dtype name (to name a file's main dtype)."""
        out: dict[str, int] = {}
        for info in self.tensors.values():
            out[info.dtype] = out.get(info.dtype, 0) + info.nbytes
        return out

    def main_dtype(self) -> str | None:
        """The dtype holding most of the bytes (e.g. "BF16"), or None for an empty file."""
        sizes = self.dtype_bytes()
        return max(sizes, key=sizes.get) if sizes else None

    def params(self) -> int:
        return sum(i.numel for i in self.tensors.values())


# ---------------------------------------------------------------------------------------------- headers

def sniff_format(head: bytes) -> str | None:
    """Name what a non-safetensors file looks like from its first bytes (None = no idea)."""
    stripped = head.lstrip()
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .pt/.ckpt/.bin pickle checkpoint)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (an old-style PyTorch .ckpt/.pt/.bin checkpoint)"
    if head.startswith(b"GGUF"):
        return "a GGUF file (llama.cpp / ComfyUI-GGUF quantized weights)"
    if head.startswith(b"version https://git-lfs"):
        return "a git-lfs pointer file (the real weights were never downloaded; run `git lfs pull`)"
    if stripped[:1] == b"<" or stripped[:9].lower() == b"<!doctype":
        return "an HTML/XML page (probably a login or error page saved instead of the weights)"
    if stripped[:1] in (b"{", b"["):
        return "a JSON text file"
    return None


def _not_safetensors(path: Path, head: bytes, why: str) -> ModelFileError:
    looks = sniff_format(head)
    what = f"it looks like {looks}" if looks else why
    return ModelFileError(f"{path}: not a safetensors file ({what}).", NOT_SAFETENSORS_HINT)


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of one safetensors file. Reads only the header bytes."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found." if not path.exists() else f"{path}: is not a file.",
                             "Check the path (a DiT may also be given as a diffusers transformer/ folder).")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: not a safetensors file (only {size} bytes long).", NOT_SAFETENSORS_HINT)
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise _not_safetensors(path, head + f.read(56), f"its first 8 bytes give a header length of {n} "
                                   f"bytes for a {size}-byte file")
        raw = f.read(n)
    if not raw.lstrip().startswith(b"{"):
        raise _not_safetensors(path, head + raw[:56], "the header is not a JSON object")
    if _nesting(raw) > MAX_HEADER_NESTING:   # json.loads would recurse until Python's stack limit
        raise ModelFileError(f"{path}: the safetensors header nests deeper than {MAX_HEADER_NESTING} levels; a "
                             "real header is a flat table of tensors.", "The file is damaged or crafted; download "
                             "it again from the model's page.")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"{path}: the safetensors header JSON is broken ({e}).",
                             "The file is damaged; download it again.") from None
    if not isinstance(doc, dict):
        raise ModelFileError(f"{path}: the safetensors header is not a JSON object.", "Download the file again.")
    return _parse_header(path, doc, 8 + n, size)


def _parse_header(path: Path, doc: dict, data_start: int, size: int) -> Header:
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path}: __metadata__ in the header is not a JSON object.", "Download the file again.")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _parse_entry(path, name, entry)
    data_len = max((t.end for t in tensors.values()), default=0)
    if data_start + data_len > size:
        raise ModelFileError(
            f"{path}: the file is truncated: its header describes {data_start + data_len:,} bytes but the file "
            f"has {size:,}.", "The download was interrupted; download the file again (compare its size).")
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, data_start, size)


def _nesting(raw: bytes) -> int:
    """The deepest bracket nesting of a JSON text (brackets inside strings counted too: an upper bound)."""
    depth = deepest = 0
    for byte in raw.translate(None, _NOT_BRACKETS):
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _parse_entry(path: Path, name: str, entry) -> TensorInfo:
    try:
        dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if not all(type(x) is int and x >= 0 for x in (*shape, start, end)) or not isinstance(dtype, str):
            raise ValueError("dtype must be a name; shape and data_offsets non-negative integers")
    except (TypeError, KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: header entry for tensor {name!r} is malformed ({e!r}).",
                             "Download the file again.") from None
    if dtype not in DTYPE_INFO:
        raise ModelFileError(f"{path}: tensor {name!r} has dtype {dtype}, which this engine cannot read.",
                             "Convert the file to bf16/fp16/fp32 safetensors.")
    info = TensorInfo(dtype, shape, int(start), int(end))
    if info.end < info.start or info.nbytes != info.numel * DTYPE_INFO[dtype][0]:
        raise ModelFileError(f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) has data offsets "
                             f"[{start}, {end}] that do not match its size.", "Download the file again.")
    return info


# ---------------------------------------------------------------------------------------------- shards

def expand_shards(path: str | os.PathLike) -> list[Path]:
    """The safetensors files that make up one model.

    - `name-00001-of-00003.safetensors` (any shard) → all three shards; a missing one is an error.
    - a folder with `*.safetensors.index.json` → the files its weight_map names.
    - a folder with one `*.safetensors` (or one shard set) → that file (those files).
    - any other file → [file] (read_header validates it).
    """
    path = Path(path)
    if path.is_dir():
        return _expand_folder(path)
    if not path.exists():
        raise ModelFileError(f"{path}: file not found.", "Check the path.")
    m = SHARD_RE.match(path.name)
    if not m:
        return [path]
    prefix, width, total = m.group(1), len(m.group(2)), int(m.group(3))
    files = [path.with_name(f"{prefix}{i:0{width}d}-of-{m.group(3)}.safetensors") for i in range(1, total + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelFileError(f"{path}: shard set of {total} files is incomplete; missing {', '.join(missing)}.",
                             f"Download all {total} shards into {path.parent}.")
    return files


def _expand_folder(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ModelFileError(f"{folder}: several index files ({', '.join(i.name for i in indexes)}).",
                             "Keep one model per folder, or pass the file itself.")
    if indexes:
        return _files_from_index(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth", ".gguf"))
        found = f" (found {', '.join(other[:3])})" if other else ""
        raise ModelFileError(f"{folder}: no .safetensors file in this folder{found}.", NOT_SAFETENSORS_HINT)
    if len(files) == 1:
        return files
    shard_sets = {SHARD_RE.match(f.name).group(1) if SHARD_RE.match(f.name) else f.name for f in files}
    if len(shard_sets) == 1 and SHARD_RE.match(files[0].name):
        return expand_shards(files[0])
    raise ModelFileError(f"{folder}: holds {len(files)} unrelated .safetensors files "
                         f"({', '.join(f.name for f in files[:4])}) and no index.json.",
                         "Pass the file you mean directly.")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{index}: not a valid safetensors index ({e!r}).", "Download the index again.") from None
    names = sorted(set(weight_map.values()))
    files = [index.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelFileError(f"{index}: names {len(files)} files but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing.",
                             f"Download every shard listed in {index.name} into {index.parent}.")
    return files


def read_headers(paths: Iterable[str | os.PathLike]) -> dict[str, tuple[Path, TensorInfo]]:
    """Tensor name → (file, info) over several files (shards). A name in two files is an error."""
    out: dict[str, tuple[Path, TensorInfo]] = {}
    for p in paths:
        header = read_header(p)
        for name, info in header.tensors.items():
            if name in out:
                raise ModelFileError(f"{header.path}: tensor {name!r} is also in {out[name][0]}.",
                                     "The shard set mixes two models; download it again.")
            out[name] = (header.path, info)
    return out
