"""What the LoRA tools share: plain-LoRA files read as raw factors (bit for bit, alpha kept apart from the
weights, so a conversion is exact), written in each layout of engine/spec/lora_keys.py, and the output-path rule.

A `Plain` LoRA is {module path: Module(down (rank, in), up (out, rank), alpha or None)} plus the file's metadata;
alpha None means the file gave none (scale 1, i.e. alpha = rank, kohya's and ComfyUI's rule).

API:
- `check_output(output, inputs, option)`        never write over an input; a .safetensors name
- `read_plain(path, what) -> Plain`             LoRA factors as stored; LoHa/LoKr/DoRA refused with the reason
- `write_lora(plain, path, fmt, dtype=None)`    kohya / musubi / diffusers / comfyui, atomic
- `lora_variant_metadata(version)`              ss_base_model_version + modelspec for a LoRA we create
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.models.safetensors_io import load_file, save_file_atomic
from engine.spec.errors import ModelFileError, OptionError
from engine.spec.lora_keys import (PEFT_METADATA_KEY, format_of, group_header, kohya_name, peft_alpha,
                                   peft_config)
from engine.spec.safetensors_header import read_header
from engine.spec.variants import get_variant

# Metadata that describes the stored layout rather than the training run: rewritten for the new layout.
LAYOUT_KEYS = (PEFT_METADATA_KEY,)
# kohya's hashes cover the tensors: they no longer hold once the tensors change (resize).
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


@dataclass
class Module:
    down: torch.Tensor           # (rank, in)
    up: torch.Tensor             # (out, rank)
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha else 1.0

    def delta(self, device=None) -> torch.Tensor:
        """ΔW = scale · up @ down in float32."""
        return (self.up.to(device, torch.float32) @ self.down.to(device, torch.float32)) * self.scale


@dataclass
class Plain:
    path: Path
    format: str
    modules: dict[str, Module] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    alpha_dtype: torch.dtype = torch.float32   # the dtype the source stored its alpha tensors in


def check_output(output: str | None, inputs: list[str], option: str) -> Path:
    """`output` must be given, end in .safetensors and be none of `inputs` (the user's files are never
    overwritten, also not through another spelling of the same path or a link)."""
    if not output:
        raise OptionError(f"{option} is required: the file to write.", f"Add {option} OUT.safetensors.")
    out = Path(output)
    if out.suffix != ".safetensors":
        raise OptionError(f"{option} {output}: the output must be a .safetensors file.",
                          f"Name it e.g. {out.with_suffix('.safetensors').name}.")
    for given in inputs:
        src = Path(given)
        same = out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src))
        if same:
            raise OptionError(f"{option} {output} is the input file {given}; the tools never overwrite their input.",
                              f"Choose another name for {option}.")
        if src.is_dir() and src.resolve() in out.resolve().parents:
            raise OptionError(f"{option} {output} lies inside the input model folder {given}.",
                              "Write the result somewhere else, so the input folder stays as it is.")
    if out.is_dir():
        raise OptionError(f"{option} {output} is a folder.", "Give a file name ending in .safetensors.")
    return out


def read_plain(path: str | os.PathLike, what: str = "LoRA file") -> Plain:
    """The LoRA's factors as stored. Foreign-family files and LoHa/LoKr/DoRA are refused with the reason."""
    path = Path(path)
    header = read_header(path)
    grouped, styles = group_header(header)
    peft = peft_config(header.metadata)
    tensors = load_file(path)
    out = Plain(path, "", metadata=dict(header.metadata))
    first_down = next((tensors[p["down"]] for p in grouped.values() if "down" in p), None)
    if first_down is not None and first_down.is_floating_point():
        out.alpha_dtype = first_down.dtype      # files without alpha keys: the trainers store alpha like the factors
    for module, parts in grouped.items():
        if set(parts) - {"down", "up", "alpha"}:
            other = sorted(set(parts) - {"down", "up", "alpha"})
            raise ModelFileError(f"{what} {path}: {module} is not a plain LoRA module (it has {', '.join(other)}).",
                                 "Only plain LoRA files (lora_down/lora_up or lora_A/lora_B) can be converted or "
                                 "resized; LoHa, LoKr and DoRA files are applied as they are.")
        if "down" not in parts or "up" not in parts:
            raise ModelFileError(f"{what} {path}: {module} lacks its {'down' if 'down' not in parts else 'up'} "
                                 "factor.", "The file is incomplete or damaged; export it again.")
        down, up = tensors[parts["down"]], tensors[parts["up"]]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ModelFileError(f"{what} {path}: {module} has down {tuple(down.shape)} and up {tuple(up.shape)}.",
                                 "The ranks of the two factors must agree; the file is damaged.")
        alpha = None
        if "alpha" in parts:
            alpha_t = tensors[parts["alpha"]]
            out.alpha_dtype = alpha_t.dtype
            alpha = float(alpha_t.float().item())
        elif peft is not None:
            alpha = peft_alpha(module, peft, down.shape[0])
        out.modules[module] = Module(down, up, alpha)
    out.format = format_of({"lora"}, styles)
    return out


def state_for(plain: Plain, fmt: str, dtype: torch.dtype | None = None) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of `plain` in layout `fmt`; factors are copied unchanged unless `dtype` is given."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)          # noqa: E731
    alpha_dtype = dtype or plain.alpha_dtype
    meta = {k: v for k, v in plain.metadata.items() if k not in LAYOUT_KEYS}
    state: dict[str, torch.Tensor] = {}
    for module, m in plain.modules.items():
        alpha = m.alpha if m.alpha is not None else float(m.rank)
        if fmt in ("kohya", "musubi"):
            stem = kohya_name(module)
            state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"] = cast(m.down), cast(m.up)
            state[f"{stem}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
        elif fmt == "comfyui":
            stem = f"diffusion_model.{module}"
            state[f"{stem}.lora_A.weight"], state[f"{stem}.lora_B.weight"] = cast(m.down), cast(m.up)
            state[f"{stem}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
        else:
            stem = f"transformer.{module}"
            state[f"{stem}.lora_A.weight"], state[f"{stem}.lora_B.weight"] = cast(m.down), cast(m.up)
    if fmt == "diffusers":
        meta[PEFT_METADATA_KEY] = json.dumps(_peft_config(plain), sort_keys=True)
    meta.setdefault("format", "pt")
    return state, meta


def _peft_config(plain: Plain) -> dict:
    """diffusers' layout of the PEFT LoraConfig (keys prefixed with the component): the most common rank and
    alpha, with per-module patterns for the others, so each module keeps its own scale exactly."""
    ranks = [m.rank for m in plain.modules.values()]
    alphas = [m.alpha if m.alpha is not None else float(m.rank) for m in plain.modules.values()]
    rank = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    rank_pattern, alpha_pattern = {}, {}
    for (module, m), a in zip(plain.modules.items(), alphas):
        if m.rank != rank:
            rank_pattern[_pattern(module)] = m.rank
        if a != alpha:
            alpha_pattern[_pattern(module)] = a
    targets = sorted({p.split(".", 2)[-1] if p.startswith("transformer_blocks.") else p for p in plain.modules})
    peft = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "use_dora": False, "lora_bias": False}
    return {f"transformer.{k}": v for k, v in peft.items()}


def _pattern(module: str) -> str:
    """A regex that matches exactly this module path (PEFT matches patterns at the end of the module name)."""
    return module.replace(".", r"\.")


def write_lora(plain: Plain, path: str | os.PathLike, fmt: str, dtype: torch.dtype | None = None) -> Path:
    state, meta = state_for(plain, fmt, dtype)
    return save_file_atomic(state, path, meta)


def lora_variant_metadata(version: str, title: str) -> dict[str, str]:
    """The metadata that says which model a LoRA we create belongs to (as the trainer writes it)."""
    v = get_variant(version)
    return {"ss_base_model_version": v.base_model_version, "ss_network_module": "networks.lora_qwen_image",
            "modelspec.architecture": f"{v.modelspec_arch}/lora", "modelspec.implementation":
            "https://github.com/QwenLM/Qwen-Image", "modelspec.title": title,
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S")}
