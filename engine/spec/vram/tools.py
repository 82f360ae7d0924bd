"""VRAM/RAM estimate of the streamed LoRA tools (merge_lora, extract_lora) from file headers alone (no torch).

Both hold only a few tensors of the DiT at a time, so the peak follows the largest Linear weight L (numel),
not the model size:
- merge: the weight as read (its stored bytes) and in float32, the float32 LoRA delta, the merged float32 sum
  and its output copy, on the compute device; in RAM the LoRA files (read whole: they are small), the read
  buffer and the host copy being written.
- extract: base and finetuned weights in float32, their difference, and the SVD's factors and workspace
  (U, S, Vh of the difference, about as large as the difference itself twice over); in RAM both read buffers.
The result has the shape of engine/spec/vram/estimate.py's (vram_gib, ram_gib, phases, peak_phase, parts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from engine.spec.errors import OptionError
from engine.spec.safetensors_header import DTYPE_INFO, Header, expand_shards, read_header
from engine.spec.vram.constants import GIB
from engine.spec.vram.constants import value as K

PARTS = ("weights", "lora_and_optimizer", "gradients", "activations", "block_swap_buffers", "workspace")
FP32 = 4
SVD_WORK = 3          # U, S, Vh and LAPACK/cuSOLVER workspace, in units of the difference's float32 size


def largest(headers: Iterable[Header]) -> tuple[int, int]:
    """(numel, stored bytes per value) of the largest 2-D tensor of the DiT."""
    best = (0, 2)
    for h in headers:
        for info in h.tensors.values():
            if len(info.shape) == 2 and info.numel > best[0]:
                best = (info.numel, DTYPE_INFO[info.dtype][0])
    return best


def _phase(gpu: dict, ram: float, on_gpu: bool) -> dict:
    parts = {p: gpu.get(p, 0.0) for p in PARTS}
    if not on_gpu:           # on the CPU the "device" tensors live in RAM
        return {"vram": 0.0, "ram": ram + sum(parts.values()), "parts": {p: 0.0 for p in PARTS}}
    parts["workspace"] += (K("cuda_context_gib") + K("cublas_workspace_gib")) * GIB
    return {"vram": sum(parts.values()), "ram": ram, "parts": parts}


def _result(name: str, phase: dict) -> dict:
    return {"vram_gib": round(phase["vram"] / GIB, 2), "ram_gib": round(phase["ram"] / GIB, 2),
            "phases": {name: {"vram_gib": round(phase["vram"] / GIB, 3), "ram_gib": round(phase["ram"] / GIB, 3),
                              "parts": {k: round(v / GIB, 3) for k, v in phase["parts"].items()}}},
            "peak_phase": name, "parts": {k: round(v / GIB, 3) for k, v in phase["parts"].items()}}


def estimate_merge(dit_headers: Iterable[Header], lora_paths: list[str | os.PathLike], on_gpu: bool) -> dict:
    numel, stored = largest(dit_headers)
    lora_bytes = sum(read_header(p).file_size for p in lora_paths)
    gpu = {"weights": numel * (stored + FP32), "lora_and_optimizer": numel * FP32,
           "workspace": numel * 2 * FP32}                     # the merged sum and its output copy
    ram = K("process_ram_gib") * GIB + lora_bytes + numel * stored * 2
    return _result("merging", _phase(gpu, ram, on_gpu))


def estimate_extract(org_headers: Iterable[Header], tuned_headers: Iterable[Header], on_gpu: bool) -> dict:
    numel, stored = largest(list(org_headers) + list(tuned_headers))
    gpu = {"weights": numel * 2 * FP32, "activations": numel * FP32, "workspace": numel * SVD_WORK * FP32}
    ram = K("process_ram_gib") * GIB + numel * stored * 2
    return _result("extracting", _phase(gpu, ram, on_gpu))


def estimate_tool(command: str, cfg) -> dict | None:
    """The estimate for a merge_lora / extract_lora config before it runs (the Tools tab shows it); None for the
    other tools, which hold only a LoRA. The GPU is assumed unless --device cpu (the app cannot see the device)."""
    on_gpu = getattr(cfg, "device", "auto") != "cpu"
    if command == "merge_lora":
        return estimate_merge(_headers(cfg.dit, "--dit"), cfg.lora_weight, on_gpu)
    if command == "extract_lora":
        return estimate_extract(_headers(cfg.model_org, "--model_org"), _headers(cfg.model_tuned, "--model_tuned"),
                                on_gpu)
    return None


def _headers(path, option: str) -> list[Header]:
    if not path:
        raise OptionError(f"{option} is required.", f"Give {option} a Qwen-Image DiT file or folder.")
    folder = Path(path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and (folder / "transformer").is_dir():
        folder = folder / "transformer"          # a diffusers pipeline folder
    return [read_header(f) for f in expand_shards(folder)]


def estimate_line(est: dict) -> str:
    where = f"{est['vram_gib']:.1f} GiB VRAM, " if est["vram_gib"] else ""
    return f"Estimated peak: {where}{est['ram_gib']:.1f} GiB RAM (the largest layer at a time, not the whole DiT)."
