"""Read LoRA files in any common Qwen-Image layout and apply them to a loaded or loading DiT.

Layouts read:
- kohya / musubi / ours:  `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`
- diffusers / PEFT:       `transformer.<module>.lora_A.weight`, `.lora_B.weight`; alpha from the safetensors
                          metadata `lora_adapter_metadata` (PEFT LoraConfig JSON) when present, else scale 1
- ComfyUI / ai-toolkit:   `diffusion_model.<module>.lora_A.weight` / `lora_B.weight` (+ optional `.alpha`)
- DiffSynth:              `...lora_A.default.weight` / `lora_B.default.weight`
- LoHa (`hada_w1_a/w1_b/w2_a/w2_b` + `.alpha`) and LoKr (`lokr_w1[_a/_b]`, `lokr_w2[_a/_b]` + `.alpha`), with
  ComfyUI's scale rule: alpha / (rank of the decomposed factor), 1.0 when there is no alpha or no decomposition.

API:
- `read_lora(path) -> LoraFile`                  {module path: LoraFactor}; clear ModelFileError otherwise
- `LoraFactor.delta()`                           the (out, in) weight delta, scale included, in float32
- `merge_loras(model, [(LoraFile, mult), ...])`  W += Σ mult·delta in place (validated first, all or nothing)
- `LoraMerger([...]).transform(key, tensor)`     the same merge per tensor, for the DiT load hook (run it
                                                 before fp8 quantisation); `.check_all_used()` afterwards
- `module_path_from_kohya(name)`                 `transformer_blocks_0_attn_to_q` → `transformer_blocks.0.attn.to_q`
The files themselves are never modified.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from engine.models.safetensors_io import load_file
from engine.spec.errors import ModelFileError
# Key naming lives in the torch-free spec, so the app can summarise LoRA files without torch.
from engine.spec.lora_keys import (BLOCK_LINEARS, foreign_error, format_of, group_keys, kohya_name,  # noqa: F401
                                    module_path_from_kohya)
from engine.spec.safetensors_header import read_header

@dataclass
class LoraFactor:
    """The factors of one module's weight delta. `kind` is lora, loha or lokr; `scale` multiplies the delta."""
    kind: str
    tensors: dict[str, torch.Tensor]
    scale: float

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW (out, in) in float32, scale included (no multiplier)."""
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            d = t["up"].flatten(1) @ t["down"].flatten(1)
        elif self.kind == "loha":
            d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            d = torch.kron(w1, w2)
        return d * self.scale

    def out_in(self) -> tuple[int, int]:
        if self.kind == "lora":
            return self.tensors["up"].shape[0], self.tensors["down"].flatten(1).shape[1]
        if self.kind == "loha":
            return self.tensors["hada_w1_a"].shape[0], self.tensors["hada_w1_b"].shape[1]
        return tuple(self.delta().shape)


@dataclass
class LoraFile:
    path: Path
    format: str                                   # kohya, diffusers, comfyui, diffsynth, loha, lokr
    factors: dict[str, LoraFactor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.factors)


# ---------------------------------------------------------------------------------------------- reading

def read_lora(path: str | Path, tensors: Mapping[str, torch.Tensor] | None = None,
              metadata: Mapping[str, str] | None = None) -> LoraFile:
    """Read a LoRA file (or an already loaded state dict + metadata) into normalised factors."""
    path = Path(path)
    if tensors is None:
        if not path.is_file():
            raise ModelFileError(f"LoRA file {path} does not exist.", "Check the path given to --lora_weight.")
        metadata = read_header(path).metadata
        tensors = load_file(path)
    metadata = metadata or {}
    if not tensors:
        raise ModelFileError(f"LoRA file {path} holds no tensors.", "Use a LoRA trained for Qwen-Image.")
    grouped, styles, unknown = group_keys(tensors.items())
    if unknown:
        raise foreign_error(path, unknown, len(tensors))
    _check_values(path, tensors)
    peft_alpha = _peft_alphas(metadata)
    out = LoraFile(path, "")
    kinds = set()
    for module, parts in grouped.items():
        factor = _checked_factor(path, module, parts, peft_alpha)
        out.factors[module] = factor
        kinds.add(factor.kind)
    out.format = format_of(kinds, styles)
    return out


def _peft_alphas(metadata: Mapping[str, str]) -> dict | None:
    """PEFT config saved by diffusers' save_lora_weights: {'default': (lora_alpha, r), patterns...}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    cfg = json.loads(raw)
    # diffusers writes the keys with the component prefix ("transformer.lora_alpha"); plain PEFT without.
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()}
    return {"alpha": cfg.get("lora_alpha"), "r": cfg.get("r"), "alpha_pattern": cfg.get("alpha_pattern") or {},
            "rank_pattern": cfg.get("rank_pattern") or {}}


def _check_values(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Factors are floating-point numbers without NaN/inf: an integer tensor or a NaN would silently turn the
    merged DiT weights into garbage (or NaN images)."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ModelFileError(f"LoRA file {path}: tensor {key!r} is stored as {str(t.dtype).removeprefix('torch.')}"
                                 ", not as floating-point numbers.", "The file is damaged or not a LoRA; re-export "
                                 "it in fp16/bf16/fp32.")
        if not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"LoRA file {path}: tensor {key!r} contains NaN or infinite values.",
                                 "The LoRA's training diverged or the file is damaged; use an earlier checkpoint.")


def _checked_factor(path: Path, module: str, parts: dict[str, torch.Tensor], peft: dict | None) -> LoraFactor:
    """The factor of one module, with its shapes proven to combine: the delta is built on the meta device (shapes
    only, no memory), so a damaged file is one error naming the module, not a crash inside a merge."""
    try:
        factor = _factor(path, module, parts, peft)
        delta = factor.delta("meta")
    except (IndexError, RuntimeError, ValueError, ZeroDivisionError) as e:
        shapes = {k: list(v.shape) for k, v in parts.items()}
        raise ModelFileError(f"LoRA file {path}: the factors of {module} {shapes} do not form a weight delta "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).",
                             "The file is damaged; re-export it.") from None
    if delta.ndim != 2:
        raise ModelFileError(f"LoRA file {path}: the factors of {module} give a {delta.ndim}-D delta, not a Linear "
                             "weight.", "Qwen-Image has Linear layers only; use a Linear LoRA.")
    return factor


def _factor(path: Path, module: str, parts: dict[str, torch.Tensor], peft: dict | None) -> LoraFactor:
    if "dora_scale" in parts:
        raise ModelFileError(f"LoRA file {path}: {module} is a DoRA module (dora_scale), which is not supported.",
                             "Use a plain LoRA, LoHa or LoKr file.")
    alpha = float(parts.pop("alpha").float().item()) if "alpha" in parts else None
    if "down" in parts or "up" in parts:
        return _lora_factor(path, module, parts, alpha, peft)
    if any(k.startswith("hada_") for k in parts):
        if "hada_t1" in parts or "hada_t2" in parts:
            raise ModelFileError(f"LoRA file {path}: {module} is a LoHa with Tucker factors (conv only).",
                                 "Qwen-Image has no conv layers to apply it to; use a Linear LoHa.")
        _require(path, module, parts, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa")
        rank = parts["hada_w1_b"].shape[0]
        return LoraFactor("loha", parts, alpha / rank if alpha is not None else 1.0)
    if "lokr_t2" in parts:
        raise ModelFileError(f"LoRA file {path}: {module} is a LoKr with a Tucker factor (conv only).",
                             "Use a Linear LoKr.")
    if not ({"lokr_w1", "lokr_w1_a"} & parts.keys() and {"lokr_w2", "lokr_w2_a"} & parts.keys()):
        raise ModelFileError(f"LoRA file {path}: {module} has an incomplete set of factors {sorted(parts)}.",
                             "The file is damaged or in an unsupported layout.")
    rank = None
    if "lokr_w1_a" in parts:
        rank = parts["lokr_w1_b"].shape[0]
    if "lokr_w2_a" in parts:
        rank = parts["lokr_w2_b"].shape[0]
    return LoraFactor("lokr", parts, alpha / rank if alpha is not None and rank else 1.0)


def _lora_factor(path, module, parts, alpha, peft) -> LoraFactor:
    _require(path, module, parts, ("down", "up"), "LoRA")
    down, up = parts["down"], parts["up"]
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise ModelFileError(f"LoRA file {path}: {module} has down {tuple(down.shape)} but up {tuple(up.shape)}.",
                             "The ranks of the two factors must agree; the file is damaged.")
    if alpha is None and peft is not None:
        alpha, rank = _peft_alpha_for(module, peft, rank)
    scale = alpha / rank if alpha else 1.0     # kohya: alpha 0/None → scale 1
    return LoraFactor("lora", {"down": down, "up": up}, scale)


def _peft_alpha_for(module: str, peft: dict, rank: int) -> tuple[float, int]:
    alpha = peft["alpha"] if peft["alpha"] is not None else rank
    for pattern, value in peft["alpha_pattern"].items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return float(alpha), rank


def _require(path, module, parts, names, what) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise ModelFileError(f"LoRA file {path}: {what} module {module} lacks {', '.join(missing)}.",
                             "The file is incomplete or damaged; re-export it.")


# ---------------------------------------------------------------------------------------------- applying

def check_fits(lora: LoraFile, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every module of `lora` names a weight of the DiT whose `shapes` (from its headers) match the delta: a LoRA
    for another model size is refused before any model loads."""
    for module, factor in lora.factors.items():
        shape = shapes.get(module + ".weight")
        delta = tuple(factor.delta("meta").shape)
        if shape is None:
            raise ModelFileError(f"LoRA file {lora.path}: module {module} is not a layer of this DiT.",
                                 "The LoRA was made for a different model (or number of blocks).")
        if delta != shape:
            raise ModelFileError(f"LoRA file {lora.path}: {module} gives a {delta} delta but the DiT weight is "
                                 f"{shape}.", "The LoRA was made for a model of another size.")


def _checked(model: torch.nn.Module, loras: Iterable[tuple[LoraFile, float]]) -> list[tuple[str, LoraFactor, float]]:
    modules = dict(model.named_modules())
    work = []
    for lora, mult in loras:
        for path, factor in lora.factors.items():
            layer = modules.get(path)
            if not isinstance(layer, torch.nn.Linear):
                raise ModelFileError(f"LoRA file {lora.path}: module {path} is not a Linear layer of this DiT.",
                                     "The LoRA was made for a different model (or number of blocks).")
            expected = tuple(layer.weight.shape)
            if tuple(factor.delta("meta").shape) != expected:
                raise ModelFileError(
                    f"LoRA file {lora.path}: {path} gives a {tuple(factor.delta('meta').shape)} delta but the DiT "
                    "weight is "
                    f"{expected}.", "The LoRA was made for a model of another size.")
            work.append((path, factor, mult))
    return work


@torch.no_grad()
def merge_loras(model: torch.nn.Module, loras: Iterable[tuple[LoraFile, float]]) -> int:
    """Add Σ multiplier·ΔW into the model's Linear weights in place. Every LoRA is checked against the model
    before any weight changes. Returns the number of weights changed. fp8 weights are refused: merge before
    quantising (use `LoraMerger.transform` in the load hook)."""
    work = _checked(model, loras)
    modules = dict(model.named_modules())
    touched = set()
    for path, factor, mult in work:
        w = modules[path].weight
        if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ModelFileError(f"cannot merge a LoRA into fp8 weight {path}.",
                                 "Merge while loading (before fp8 quantisation): pass LoraMerger.transform to "
                                 "load_dit.")
        w.copy_((w.float() + mult * factor.delta(w.device)).to(w.dtype))
        touched.add(path)
    return len(touched)


class LoraMerger:
    """Per-tensor merge for the DiT load hook: `transform(key, tensor)` returns the merged weight for keys
    `<module>.weight` that some LoRA targets, the tensor unchanged otherwise."""

    def __init__(self, loras: Iterable[tuple[LoraFile, float]]):
        self.by_key: dict[str, list[tuple[LoraFile, LoraFactor, float]]] = {}
        for lora, mult in loras:
            for path, factor in lora.factors.items():
                self.by_key.setdefault(path + ".weight", []).append((lora, factor, mult))
        self.used: set[str] = set()

    def transform(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        entries = self.by_key.get(key)
        if not entries:
            return tensor
        merged = tensor.float()
        for lora, factor, mult in entries:
            if tuple(factor.delta("meta").shape) != tuple(tensor.shape):
                raise ModelFileError(f"LoRA file {lora.path}: {key} gives a {tuple(factor.delta('meta').shape)} "
                                     "delta but the "
                                     f"DiT weight is {tuple(tensor.shape)}.", "The LoRA was made for another model.")
            merged = merged + mult * factor.delta(tensor.device)
        self.used.add(key)
        return merged.to(tensor.dtype)

    def check_all_used(self) -> None:
        """After loading: every LoRA module must have met its weight, else the LoRA does not fit this DiT."""
        missing = sorted(set(self.by_key) - self.used)
        if missing:
            files = sorted({str(e[0].path) for k in missing for e in self.by_key[k]})
            raise ModelFileError(f"LoRA file(s) {', '.join(files)}: {len(missing)} module(s) not in the DiT "
                                 f"(e.g. {missing[0]}).", "The LoRA was made for a model with more blocks.")
