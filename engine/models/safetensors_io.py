"""Reading and writing safetensors tensors without mmap: one tensor at a time, converted as it goes.

Each tensor is read with a plain `readinto` into a fresh uint8 buffer that is then viewed as the stored dtype.
Nothing maps the whole file: Linux refuses to mmap a 40 GB file on a machine whose RAM + swap is smaller
(safetensors' `safe_open` fails with "Cannot allocate memory"), and the low-VRAM user is exactly the one with
little RAM. Peak extra memory while loading is one tensor (plus its converted copy when a dtype change is asked
for). The header side (no torch) is `engine/spec/safetensors_header.py`.

API (other loaders build on this; keep it stable):
- `iter_tensors(paths, keys=None, dtype=None, device=None, rename=None, transform=None)`
                                           yields (name, tensor) one at a time, converting as it goes
- `read_tensor(f, header, name)`           one tensor from an open file
- `load_file(path)`                        every tensor of a small file as a dict
- `save_file_atomic(tensors, path, metadata=None)`  temp file in the same folder + fsync + os.replace
- `torch_dtype("BF16")`, `dtype_name(torch.bfloat16)`: dtype names
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
import safetensors.torch

from engine.spec.diskio import fsync_dir, reporting
from engine.spec.errors import ModelFileError
from engine.spec.safetensors_header import DTYPE_INFO, Header, expand_shards, read_header

_READ_CHUNK = 256 * 1024 * 1024       # readinto() may return short reads for huge sizes; loop in chunks


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype for a safetensors dtype name ("BF16" → torch.bfloat16)."""
    return getattr(torch, DTYPE_INFO[name][1])


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors dtype name for a torch dtype (torch.bfloat16 → "BF16")."""
    attr = str(dtype).removeprefix("torch.")
    return next(k for k, (_, a) in DTYPE_INFO.items() if a == attr)


def read_tensor(f, header: Header, name: str) -> torch.Tensor:
    """Read one tensor from open binary file `f` (whose header is `header`) in its stored dtype, on CPU."""
    info = header.tensors[name]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy()).cast("B")
    f.seek(header.data_start + info.start)
    done = 0
    while done < info.nbytes:
        n = f.readinto(view[done:done + _READ_CHUNK])
        if not n:
            raise ModelFileError(f"{header.path}: unexpected end of file while reading tensor {name!r}.",
                                 "The file changed or is truncated; download it again.")
        done += n
    return buf.view(torch_dtype(info.dtype)).reshape(info.shape)


Transform = Callable[[str, torch.Tensor], "torch.Tensor | Mapping[str, torch.Tensor] | None"]


def iter_tensors(paths: Iterable[str | os.PathLike], keys: Iterable[str] | Callable[[str], bool] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 rename: Callable[[str], str | None] | None = None,
                 transform: Transform | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of `paths`, one read at a time.

    Per tensor, in this order:
    1. `rename(file_key)` gives the name used below; returning None skips the tensor unread.
    2. `keys` (a set of names or a predicate on the renamed name) selects tensors; others are not read.
    3. read in the stored dtype; floating-point tensors are cast to `dtype` (integer ones never are), then
       moved to `device`.
    4. `transform(name, tensor)` may replace it: return a tensor (same name), a mapping {name: tensor}
       (e.g. a quantized weight plus its scale), or None to drop it. Its result is used as-is (no further cast),
       so fp8 quantisation or a LoRA merge at load time plugs in here.
    """
    want = keys if callable(keys) or keys is None else set(keys).__contains__
    for path in paths:
        header = read_header(path)
        with open(header.path, "rb") as f:
            for file_key in header.tensors:
                name = rename(file_key) if rename else file_key
                if name is None or (want is not None and not want(name)):
                    continue
                tensor = _convert(read_tensor(f, header, file_key), dtype, device)
                yield from _apply(transform, name, tensor)


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        if device is not None and torch.device(device).type != "cpu":
            return t.to(device).to(dtype)  # convert on the GPU: faster, and no second CPU copy
        t = t.to(dtype)
    return t.to(device) if device is not None else t


def _apply(transform: Transform | None, name: str, tensor: torch.Tensor):
    if transform is None:
        yield name, tensor
        return
    out = transform(name, tensor)
    if out is None:
        return
    if not isinstance(out, Mapping):
        yield name, out
    else:
        yield from out.items()


def load_file(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) model as a dict — for small files (LoRA, caches)."""
    return dict(iter_tensors(expand_shards(path), dtype=dtype, device=device))


# ---------------------------------------------------------------------------------------------- writing

def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: temp file in the same folder, fsync, os.replace.

    A crash mid-write leaves the old file (or none), never a half-written one. Tensors are made contiguous
    and moved to CPU; metadata values must be strings (safetensors' rule).
    """
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        safetensors.torch.save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


Entry = tuple[str, str, tuple[int, ...]]   # (name, safetensors dtype name, shape): one header entry


def write_streamed(path: str | os.PathLike, entries: list[Entry], tensors: Iterable[tuple[str, torch.Tensor]],
                   metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file tensor by tensor: the header is computed from `entries` alone, then each
    (name, tensor) of `tensors` (in the same order, with the dtype and shape its entry declared) is copied to
    the host and written on its own, so at most one tensor is in RAM at a time (a whole 20B DiT would be 40 GB).
    Atomic like every save (atomic_output); a tensor that does not match its entry is an error and nothing is
    left behind."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = DTYPE_INFO[dtype][0] * _numel(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {k: str(v) for k, v in (metadata or {}).items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)                       # safetensors aligns the data start to 8 bytes
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        pending = iter(entries)
        for name, t in tensors:
            want = next(pending, None)
            if want is None or want[0] != name or want[1] != dtype_name(t.dtype) or tuple(want[2]) != tuple(t.shape):
                raise ValueError(f"write_streamed {path}: got {name} {dtype_name(t.dtype)} {tuple(t.shape)}, "
                                 f"the header declared {want}")
            host = t.detach().to("cpu").contiguous()
            if host.numel():
                f.write(host.view(-1).view(torch.uint8).numpy().tobytes())
            del host
        if next(pending, None) is not None:
            raise ValueError(f"write_streamed {path}: fewer tensors than header entries")
    return Path(path)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `path` to write to; when the block ends normally the file is fsynced and renamed over
    `path` (readers see the old file or the whole new one, never a partial one); otherwise it is removed.
    The temp name carries our pid, so a later run can tell a killed save's leftover from a live one
    (engine/train/checkpoints.py `remove_dead_temps`). A disk error (full, read-only, no permission) is one
    DiskError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with reporting(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        with reporting(path):
            yield tmp
        with reporting(path):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(path.parent)
