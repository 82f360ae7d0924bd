"""LyCORIS networks (LoKr, LoHa, ...) for train_network: `--network_module lycoris.kohya`, as musubi-tuner and
kohya's scripts accept it, built by the lycoris-lora package and wrapped in the interface engine/train/lora.py's
LoRANetwork offers the trainer (apply_to, prepare_optimizer_params, save_weights, load_weights, loras).

- `--network_args algo=lokr factor=8` (or `algo=loha`, and LyCORIS's own keys: preset, dropout, rank_dropout,
  module_dropout, use_tucker, use_scalar, decompose_both, full_matrix, bypass_mode, dora_wd, ...), passed to
  `lycoris.kohya.create_network` unchanged. Without `algo` LyCORIS trains plain LoRA (its LoCon).
- Targets: engine/train/lycoris_qwen_image.toml, a LyCORIS preset giving the built-in LoRA's targets (every Linear
  of each QwenImageTransformerBlock); `preset=...` in --network_args replaces it.
- Saved keys are LyCORIS's kohya names with the built-in LoRA's prefix: `lora_unet_transformer_blocks_0_attn_to_q`
  + `.lokr_w1`, `.lokr_w2` (or `.lokr_w2_a/_b`), `.alpha` for LoKr; `.hada_w1_a/_b`, `.hada_w2_a/_b`, `.alpha`
  for LoHa. ComfyUI's LoRA loader reads these (it maps the `lora_unet_` names of Qwen-Image and recognises the
  LoKr/LoHa tensors), as do musubi-tuner's loaders. diffusers has no LoKr/LoHa layout: --save_format diffusers is
  refused with LyCORIS.
- fp8 / nf4 / int8 bases: the adapter cannot rebuild W + ΔW from a quantised W, so it must run in LyCORIS's bypass
  mode (the base layer's own forward + the adapter's delta). LyCORIS detects fp8 weights itself but not every
  bitsandbytes layer (Linear4bit), so bypass_mode=True is set whenever a block Linear is quantised.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lycoris import kohya as lycoris_kohya
from torch import nn

from engine.models.safetensors_io import load_file, save_file_atomic
from engine.spec.errors import ModelFileError, OptionError
from engine.train.lora_metadata import add_hashes

log = logging.getLogger(__name__)

MODULE = "lycoris.kohya"
PRESET = Path(__file__).with_name("lycoris_qwen_image.toml")


class LycorisNetwork(nn.Module):
    """The LyCORIS network, registered as `net` so accelerate's states include its weights."""

    def __init__(self, dit: nn.Module, dim: int, alpha: float, dropout: float | None, network_args: dict):
        super().__init__()
        args = {"preset": str(PRESET), **network_args}       # values as parse_network_args read them
        if dropout:
            args.setdefault("dropout", dropout)
        if _quantized(dit):
            if str(args.get("bypass_mode", True)).lower() in ("false", "0", "no"):
                raise OptionError("--network_args bypass_mode=False: the DiT's block weights are quantised (fp8, "
                                  "nf4 or int8), so LyCORIS cannot rebuild them.", "Drop bypass_mode from "
                                  "--network_args.")
            args["bypass_mode"] = True
        self.algo = args.get("algo", "lora")
        self.dit = [dit]          # a list: not a submodule (its weights are not ours to save)
        self.net = lycoris_kohya.create_network(1.0, dim, alpha, None, None, dit, warn_on_unmatched=False, **args)
        if not self.net.unet_loras:
            raise OptionError(f"--network_module {MODULE} with --network_args {network_args}: no layer to train.",
                              "Drop preset= from --network_args (the default targets every block Linear).")

    @property
    def loras(self) -> list[nn.Module]:
        return list(self.net.unet_loras)

    def apply_to(self) -> None:
        self.net.apply_to(None, self.dit[0], apply_text_encoder=False, apply_unet=True)

    def prepare_optimizer_params(self, lr: float) -> list[dict]:
        groups, names = self.net.prepare_optimizer_params(unet_lr=lr)
        return [dict(g, params=list(g["params"]), name=n) for g, n in zip(groups, names)]

    def export_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", dtype) for k, v in self.net.state_dict().items()}

    def save_weights(self, path: str | Path, dtype: torch.dtype = torch.float32,
                     metadata: dict[str, str] | None = None) -> Path:
        """LyCORIS's kohya layout, atomic, with the kohya hashes (as the built-in LoRA's files)."""
        state = self.export_state(dtype)
        return save_file_atomic(state, path, add_hashes(state, dict(metadata or {})))

    def save_diffusers(self, path, dtype=torch.float32):
        raise OptionError(f"--save_format diffusers: diffusers has no layout for {self.algo}.",
                          "Use --save_format kohya (ComfyUI loads LyCORIS files in that layout).")

    @torch.no_grad()
    def load_weights(self, path: str | Path) -> None:
        """Continue from a LyCORIS file of the same algorithm, targets and shapes (after apply_to)."""
        state = load_file(path)
        mine = self.net.state_dict()
        extra, missing = sorted(set(state) - set(mine)), sorted(set(mine) - set(state))
        wrong = [k for k in set(state) & set(mine) if state[k].shape != mine[k].shape]
        if extra or missing or wrong:
            raise ModelFileError(f"--network_weights {path}: does not match this {self.algo} network (extra: "
                                 f"{extra[:3]}, missing: {missing[:3]}, other shapes: {sorted(wrong)[:3]}).",
                                 "Use the --network_dim and --network_args the file was trained with.")
        self.net.load_state_dict(state, strict=True)


def _quantized(dit: nn.Module) -> bool:
    """Whether a block Linear holds quantised weights (fp8, or a bitsandbytes layer)."""
    for name, module in dit.named_modules():
        if name.startswith("transformer_blocks.") and isinstance(module, nn.Linear):
            w = module.weight
            if type(module) is not nn.Linear or not w.is_floating_point() or w.element_size() == 1:
                return True
    return False


def create_lycoris(dit: nn.Module, dim: int, alpha: float, dropout: float | None, network_args: dict):
    return LycorisNetwork(dit, dim, alpha, dropout, network_args)
