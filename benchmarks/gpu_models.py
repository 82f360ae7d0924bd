"""Real-size Qwen-Image models with random weights, made on the device without reading or writing a model file.

Each model is built on the meta device (engine/models/common.py: build_empty, no memory), then every tensor is
drawn on the compute device (cheap: `normal_` on the GPU), passed through the same per-tensor hook the engine's
loader uses (fp8 quantisation of the DiT's block Linears, fp8 storage of the text encoder's Linears), placed where
the loader would place it (host RAM for a block-swapped DiT) and assigned with `load_state_dict(assign=True)`, as
engine/models/common.py: load_weights does. Only the source of each tensor differs from a file load.

`random_dit_loader(config)` has the signature of engine/models/dit_setup.py: load, so benchmarks/gpu_check.py puts
it in that function's place and the engine's own trainee / generate setup (LoRA network, block swap, gradient
checkpointing, attention kernel) runs unchanged on top of it.

`--dry` sizes (REDUCED_*) keep the real layouts (channels, heads of 128 / 32, RoPE axes) at a width and depth a
CPU runs in seconds.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models import bnb_quant, common
from engine.models import text_encoder as te
from engine.models.dit import PUBLISHED_DIT_CONFIG, dit_class
from engine.models.fp8 import Fp8Hook
from engine.models.vae import PUBLISHED_VAE_CONFIG
from engine.models.vae import model_class as vae_class

# --dry: 4 blocks of 2 heads × 32, text features 64 wide; the RoPE axes still sum to the head dim.
REDUCED_DIT = dict(num_layers=4, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                   axes_dims_rope=(8, 12, 12))
REDUCED_TE_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=1024,
                       rope_scaling={"mrope_section": [4, 6, 6], "rope_type": "default"})
REDUCED_TE_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                         fullatt_block_indexes=[1])
REDUCED_VAE = dict(base_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def dit_config(reduced: bool, zero_cond_t: bool = False) -> dict:
    config = {k: v for k, v in PUBLISHED_DIT_CONFIG.items() if not k.startswith("_")}
    return {**config, **(REDUCED_DIT if reduced else {}), "zero_cond_t": zero_cond_t}


@torch.no_grad()
def fill_random(model: nn.Module, dtype: torch.dtype, device: torch.device, calc_device: torch.device,
                transform=None) -> nn.Module:
    """Give a meta-built model random weights (std 0.02, norms 1), tensor by tensor through `transform`."""
    state = {}
    for name, meta in model.state_dict().items():
        if meta.device.type != "meta":                     # tables computed at build time (RoPE)
            state[name] = meta.to(device)
            continue
        t = torch.empty(meta.shape, dtype=dtype if meta.is_floating_point() else meta.dtype, device=calc_device)
        if t.is_floating_point():
            t.fill_(1.0) if "norm" in name and name.endswith("weight") else t.normal_(0.0, 0.02)
        else:
            t.zero_()
        out = transform(name, t) if transform is not None else t
        for key, value in (out.items() if isinstance(out, dict) else [(name, out)]):
            state[key] = value.to(device)
        del t, out
    model.load_state_dict(state, strict=True, assign=True)
    del state
    return model.to(device).eval()


def random_dit_loader(reduced: bool, calc_device: torch.device):
    """A stand-in for dit_setup.load: the DiT of the published config (or the reduced one) with random weights,
    fp8-quantised (Fp8Hook) or nf4/int8-quantised (bnb_quant.BnbHook) per tensor while being filled, as the file
    loader does, on the CPU with block swap."""

    def load(path, variant, device, dtype, *, fp8=False, fp8_scaled=False, swap=False, merger=None,
             base_precision="no_change"):
        hook = Fp8Hook(scaled=fp8_scaled) if fp8 else None
        if base_precision in bnb_quant.MODES:
            hook = bnb_quant.BnbHook(base_precision, dtype)
        dit = common.build_empty(dit_class(), dit_config(reduced, variant.zero_cond_t))
        target = torch.device("cpu") if swap else torch.device(device)
        fill_random(dit, dtype, target, calc_device, hook.transform if hook else None)
        if hook is not None:
            hook.finish(dit)
        return dit

    return load


def random_text_encoder(reduced: bool, device: torch.device, dtype: torch.dtype, fp8_vl: bool):
    """Qwen2.5-VL 7B (or the reduced one) with random weights; fp8_vl stores every Linear in e4m3 as the
    engine's loader does (engine/models/text_encoder.py)."""
    config = dict(te.PUBLISHED_TE_CONFIG)
    if reduced:
        config["text_config"] = {**config["text_config"], **REDUCED_TE_TEXT}
        config["vision_config"] = {**config["vision_config"], **REDUCED_TE_VISION}
    model = common.build_empty(te.model_class(), te.make_config(config, "gpu_check"))
    names = te._fp8_weight_names(model) if fp8_vl else set()
    fill_random(model, dtype, device, device, te._make_transform(names, tie_lm_head=False))
    if fp8_vl:
        te.enable_fp8_compute(model)
    return model.requires_grad_(False)


def random_vae(reduced: bool, device: torch.device, dtype: torch.dtype):
    config = {k: v for k, v in PUBLISHED_VAE_CONFIG.items() if not k.startswith("_")}
    model = common.build_empty(vae_class(), {**config, **(REDUCED_VAE if reduced else {})})
    return fill_random(model, dtype, device, device).requires_grad_(False)


def block_linear_weights(dit: nn.Module) -> int:
    """Weights of the blocks' Linears (the matmuls that dominate a step's FLOPs)."""
    return sum(m.weight.numel() for m in dit.transformer_blocks.modules() if isinstance(m, nn.Linear))
