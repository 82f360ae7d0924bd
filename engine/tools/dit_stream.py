"""A DiT read tensor by tensor for the tools (merge, extract): the loader's checks on the headers first, then
random access to single tensors with the loader's reader (engine/models/safetensors_io.py), so no more than a
few tensors of a 40 GB DiT are in memory at once; and the merged file's header and metadata.

API:
- `DitSource(path, version, what)`     headers checked like load_dit (a Qwen-Image DiT, not a foreign fp8 file,
                                       edit evidence vs --model_version); `.names` (diffusers keys, file order),
                                       `.info(name)`, `.read(name, device)` (dequantised if it is our fp8 file),
                                       `.config` (the architecture config), `.has_2511_marker`
- `merged_metadata(source, extra)`     metadata of a DiT we write: config JSON (+ zero_cond_t) and the rest
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from engine.models import common, fp8_files
from engine.models.dit import (COMFY_PREFIX, MARKER_2511, PUBLISHED_DIT_CONFIG, check_edit_evidence,
                               check_is_qwen_dit, dit_files, strip_prefix)
from engine.models.fp8 import dequantize_weight
from engine.models.safetensors_io import read_tensor
from engine.spec.errors import OptionError
from engine.spec.safetensors_header import TensorInfo, read_header
from engine.spec.variants import get_variant


class DitSource:
    def __init__(self, path: str | os.PathLike, version: str, what: str = "--dit"):
        if not path:
            raise OptionError(f"{what} is required.", f"Add {what} PATH (a Qwen-Image DiT file or folder).")
        self.path = Path(path)
        self.variant = get_variant(version)
        self.files, folder_config = dit_files(self.path)
        self.headers = {f: read_header(f) for f in self.files}
        tensors = {k: (f, info) for f, h in self.headers.items() for k, info in h.tensors.items()}
        check_is_qwen_dit(tensors, self.files[0])
        self.fp8_kind = fp8_files.check_dit(self.files, tensors, self.variant.name)
        check_edit_evidence(tensors, self.path, self.variant)
        self.has_2511_marker = any(strip_prefix(k) is None for k in tensors)
        rename = fp8_files.renamer(strip_prefix, self.fp8_kind)
        self._where: dict[str, tuple[Path, str]] = {}
        for key, (f, _) in tensors.items():
            name = rename(key)
            if name is not None:
                self._where[name] = (f, key)
        self.names = list(self._where)
        config, self.config_source = common.resolve_config(self.files, PUBLISHED_DIT_CONFIG, folder_config)
        self.config = {**config, "zero_cond_t": self.variant.zero_cond_t}
        self._handles: dict[Path, object] = {}

    def info(self, name: str) -> TensorInfo:
        f, key = self._where[name]
        return self.headers[f].tensors[key]

    def dtype_name(self) -> str:
        """The main floating dtype of the file (what "keep the input's precision" means)."""
        sizes: dict[str, int] = {}
        for name in self.names:
            i = self.info(name)
            if i.dtype in ("F32", "F16", "BF16"):
                sizes[i.dtype] = sizes.get(i.dtype, 0) + i.nbytes
        return max(sizes, key=sizes.get) if sizes else "BF16"

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor in its stored dtype (our fp8 weights dequantised to float32), on `device`."""
        f, key = self._where[name]
        t = read_tensor(self._handle(f), self.headers[f], key).to(device)
        scale = fp8_files.scale_key(key)
        if self.fp8_kind == fp8_files.SCALED and scale in self.headers[f].tensors:
            s = read_tensor(self._handle(f), self.headers[f], scale).to(device)
            return dequantize_weight(t, s, torch.float32)
        return t.float() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = open(f, "rb")
        return self._handles[f]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()


def merged_metadata(source: DitSource, extra: dict[str, str]) -> dict[str, str]:
    """The config JSON the loader reads back (with Edit-2511's zero_cond_t), plus `extra`."""
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in source.config.items()
              if k != "_use_default_values"}
    config.setdefault("_class_name", PUBLISHED_DIT_CONFIG["_class_name"])
    return {"format": "pt", "config": json.dumps(config), **extra}


def out_key(name: str) -> str:
    """ComfyUI's layout, as the trainer saves a DiT."""
    return COMFY_PREFIX + name


MARKER_KEY_2511 = COMFY_PREFIX + MARKER_2511
