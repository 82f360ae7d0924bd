"""The trainable LoRA network for the Qwen-Image DiT (musubi-tuner's networks/lora_qwen_image.py semantics).

Why forward wrappers and not PEFT: kohya's math (per-module `alpha` buffer, scale = alpha/rank, rank and module
dropout, neuron dropout, a global multiplier) and its key names are the contract of our files (docs/architecture.md, "Outputs"),
and the wrapped Linear's own forward stays in place, so fp8-patched Linears (engine.models.fp8) and block-swapped
weights (engine.models.block_swap) work underneath unchanged. PEFT would need a key conversion on every save
and has no rank/module dropout.

API:
- `parse_network_args(["k=v", ...]) -> dict`         musubi's --network_args (lists, floats, bools, strings)
- `create_network(dit, dim=4, alpha=1.0, ...)`        LoRANetwork over the 14 Linear layers of every block
- `net.apply_to()` / `net.remove()`                   wrap / unwrap the Linear forwards
- `net.prepare_optimizer_params(lr)`                  param groups (LoRA+: lora_up at lr × loraplus_lr_ratio)
- `net.state_dict()`                                  kohya keys: lora_unet_<path>.lora_down/.lora_up/.alpha
- `net.save_weights(path, dtype, metadata)`           atomic safetensors; `save_diffusers(path, dtype)` too
- `net.load_weights(path)`                            continue from any LoRA file format (engine.models.lora_formats)
- `lora_metadata(cfg, ...)` lives in engine.train.lora_metadata (ss_* + modelspec).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from engine.models.lora_formats import BLOCK_LINEARS, kohya_name, read_lora
from engine.models.safetensors_io import save_file_atomic
from engine.spec.config import parse_network_args  # noqa: F401  (part of this module's API)
from engine.spec.errors import ModelFileError, OptionError
from engine.spec.options import DEFAULT_NETWORK_ALPHA, DEFAULT_NETWORK_DIM
from engine.train.lora_metadata import add_hashes

SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
               "bf16": torch.bfloat16}


class LoRAModule(nn.Module):
    """y = org(x) + multiplier · scale · up(dropout(down(x))), scale = alpha / rank."""

    def __init__(self, name: str, org: nn.Linear, dim: int, alpha: float | None, multiplier: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        self.lora_name = name
        self.lora_dim = dim
        self.lora_down = nn.Linear(org.in_features, dim, bias=False)
        self.lora_up = nn.Linear(dim, org.out_features, bias=False)
        alpha = dim if alpha is None or alpha == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha))       # saved as `<name>.alpha`
        self._scale = float(self.alpha) / dim    # a Python float: reading the buffer per call syncs a CUDA device
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.org_module = [org]          # a list: not a submodule (its weights are not ours to save)
        self.org_forward = None

    @property
    def scale(self) -> float:
        return self._scale

    def refresh_scale(self) -> None:
        """After the alpha buffer changed (a loaded file or state)."""
        self._scale = float(self.alpha) / self.lora_dim

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh_scale()

    def apply_to(self) -> None:
        org = self.org_module[0]
        self._had_own_forward = "forward" in org.__dict__    # e.g. an fp8 patch: restore it on remove()
        self.org_forward = org.forward
        org.forward = self.forward

    def remove(self) -> None:
        if self.org_forward is None:
            return
        org = self.org_module[0]
        if self._had_own_forward:
            org.forward = self.org_forward
        else:
            del org.forward
        self.org_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.org_forward(x)
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return out
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.training and self.dropout:
            lx = nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            lx = lx * (mask.unsqueeze(1) if lx.dim() == 3 else mask).to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)       # as if the rank had shrunk
        return out + (self.lora_up(lx) * (self.multiplier * scale)).to(out.dtype)


class LoRANetwork(nn.Module):
    """All LoRA modules; registered under their kohya names so state_dict() has the file's keys."""

    def __init__(self, modules: list[LoRAModule], loraplus_lr_ratio: float | None = None):
        super().__init__()
        for m in modules:
            self.add_module(m.lora_name, m)
        self.loraplus_lr_ratio = loraplus_lr_ratio

    @property
    def loras(self) -> list[LoRAModule]:
        return [m for m in self.children() if isinstance(m, LoRAModule)]

    def apply_to(self) -> None:
        for m in self.loras:
            m.apply_to()

    def remove(self) -> None:
        for m in self.loras:
            m.remove()

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.loras:
            m.multiplier = multiplier

    def prepare_optimizer_params(self, lr: float) -> list[dict]:
        """One group, or two with LoRA+ (lora_up weights at lr × ratio); each group has a `name` for logging."""
        if not self.loraplus_lr_ratio:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr, "name": "unet"}]
        ups = [p for n, p in self.named_parameters() if "lora_up" in n and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if "lora_up" not in n and p.requires_grad]
        return [{"params": rest, "lr": lr, "name": "unet"},
                {"params": ups, "lr": lr * self.loraplus_lr_ratio, "name": "unet plus"}]

    def export_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", dtype) for k, v in self.state_dict().items()}

    def save_weights(self, path: str | Path, dtype: torch.dtype = torch.float32,
                     metadata: dict[str, str] | None = None) -> Path:
        """kohya/musubi layout (all tensors incl. alpha cast to `dtype`), atomic, with the kohya hashes."""
        state = self.export_state(dtype)
        meta = add_hashes(state, dict(metadata or {}))
        return save_file_atomic(state, path, meta)

    def diffusers_state(self, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
        """diffusers layout `transformer.<path>.lora_A/B.weight` with alpha baked in (scale split √ between A
        and B), so lora_alpha == rank and ComfyUI's implicit scale 1.0 is right. Never writes `.alpha` keys."""
        state = {}
        ranks = set()
        for m in self.loras:
            path = self._module_paths[m.lora_name]
            root = math.sqrt(m.scale)
            state[f"transformer.{path}.lora_A.weight"] = (m.lora_down.weight.detach().float() * root).to("cpu", dtype)
            state[f"transformer.{path}.lora_B.weight"] = (m.lora_up.weight.detach().float() * root).to("cpu", dtype)
            ranks.add(m.lora_dim)
        rank = max(ranks) if ranks else DEFAULT_NETWORK_DIM
        peft = {"r": rank, "lora_alpha": rank, "target_modules": sorted({p.split(".", 2)[-1] for p in
                                                                          self._module_paths.values()}),
                "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False}
        if len(ranks) > 1:   # mixed ranks (from --network_weights): record each module's alpha == its rank
            peft["alpha_pattern"] = {self._module_paths[m.lora_name]: m.lora_dim for m in self.loras}
            peft["rank_pattern"] = dict(peft["alpha_pattern"])
        # diffusers keys the PEFT config by component ("transformer.r", "transformer.lora_alpha", ...).
        packed = {f"transformer.{k}": v for k, v in peft.items()}
        return state, {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)}

    def save_diffusers(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        state, meta = self.diffusers_state(dtype)
        return save_file_atomic(state, path, meta)

    @torch.no_grad()
    def load_weights(self, path: str | Path) -> None:
        """Continue from a LoRA file (any plain-LoRA layout). Modules and ranks must match this network."""
        lora = read_lora(path)
        by_name = {kohya_name(p): f for p, f in lora.factors.items()}
        mine = {m.lora_name: m for m in self.loras}
        extra, missing = sorted(set(by_name) - set(mine)), sorted(set(mine) - set(by_name))
        if extra or missing:
            raise ModelFileError(f"--network_weights {path}: modules differ from the network "
                                 f"(extra: {extra[:3]}, missing: {missing[:3]}).",
                                 "Use the same include/exclude patterns as when the file was trained.")
        for name, factor in by_name.items():
            m = mine[name]
            if factor.kind != "lora" or factor.tensors["down"].shape != m.lora_down.weight.shape:
                raise ModelFileError(f"--network_weights {path}: {name} is a {factor.kind} of shape "
                                     f"{tuple(factor.tensors.get('down', torch.empty(0)).shape)}, the network "
                                     f"needs lora_down {tuple(m.lora_down.weight.shape)}.",
                                     "Set --network_dim to the file's rank.")
            m.lora_down.weight.copy_(factor.tensors["down"])
            m.lora_up.weight.copy_(factor.tensors["up"])
            m.alpha.fill_(factor.scale * m.lora_dim)
            m.refresh_scale()


def target_paths(dit: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    """Dotted paths of the targeted Linear layers: the 14 per block, minus `exclude` fullmatches unless an
    `include` pattern fullmatches (include overrides exclude, musubi semantics)."""
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]
    paths = []
    for name, module in dit.named_modules():
        m = re.fullmatch(r"transformer_blocks\.\d+\.(.+)", name)
        if not (m and m.group(1) in BLOCK_LINEARS and isinstance(module, nn.Linear)):
            continue
        if any(p.fullmatch(name) for p in exc) and not any(p.fullmatch(name) for p in inc):
            continue
        paths.append(name)
    return paths


def create_network(dit: nn.Module, dim: int | None = None, alpha: float | None = DEFAULT_NETWORK_ALPHA,
                   multiplier: float = 1.0, dropout: float | None = None, **network_args) -> LoRANetwork:
    """Build (not yet applied) LoRA modules over the DiT's block Linears. `network_args` are the parsed
    --network_args: include_patterns, exclude_patterns, rank_dropout, module_dropout, loraplus_lr_ratio, verbose."""
    known = {"include_patterns", "exclude_patterns", "rank_dropout", "module_dropout", "loraplus_lr_ratio",
             "verbose"}
    unknown = set(network_args) - known
    if unknown:
        raise OptionError(f"--network_args: unknown key(s) {sorted(unknown)}.", f"Known keys: {sorted(known)}.")
    dim = dim or DEFAULT_NETWORK_DIM
    paths = target_paths(dit, _as_list(network_args.get("include_patterns")),
                         _as_list(network_args.get("exclude_patterns")))
    if not paths:
        raise OptionError("--network_args include/exclude patterns leave no Linear layer to train.",
                          "Patterns fullmatch dotted paths like transformer_blocks.0.attn.to_q.")
    modules = dict(dit.named_modules())
    loras = [LoRAModule(kohya_name(p), modules[p], dim, alpha, multiplier, dropout,
                        _float(network_args.get("rank_dropout")), _float(network_args.get("module_dropout")))
             for p in paths]
    net = LoRANetwork(loras, _float(network_args.get("loraplus_lr_ratio")))
    net._module_paths = {kohya_name(p): p for p in paths}
    return net


def _as_list(value) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _float(value) -> float | None:
    return None if value is None else float(value)
