"""What a run trains, set up with its memory options: a LoRA network on a frozen DiT (train_network) or the whole
DiT (train). The loop only sees a `Trainee`: the DiT to call, the module whose weights train (saved in states),
its optimizer parameter groups, and how to write the model file.

The DiT is set up in engine/models/dit_setup.py's order: fp8 (or, LoRA only, bitsandbytes nf4/int8) quantisation
while loading → (LoRA only) the
network wraps the block Linears, their own forward, fp8 or not, staying underneath → block swap places the model
(the LoRA weights stay on the device) → gradient checkpointing (+ activation CPU offload) → attention kernel.

dtypes: LoRA: the DiT in the compute dtype (bf16 on CUDA, float32 on CPU), the LoRA weights in float32 (autocast
with --mixed_precision). Full finetune: float32 weights, or bf16 with --full_bf16 (Adafactor's stochastic
rounding keeps small updates).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine.models import dit_setup
from engine.models.runtime import compute_dtype
from engine.spec.variants import Variant
from engine.train.checkpoints import save_dit_file
from engine.train import lycoris_net
from engine.train.lora import SAVE_DTYPES, create_network, parse_network_args
from engine.train.lora_metadata import lora_metadata, modelspec

log = logging.getLogger(__name__)


@dataclass
class Trainee:
    dit: nn.Module
    module: nn.Module                   # the trained weights (network or DiT): optimizer, states, DDP sync
    param_groups: list[dict]
    dtype: torch.dtype                  # what the DiT's inputs are cast to
    save: Callable[[Path, dict], list[Path]]      # (path, stats) -> files written
    eval_modules: tuple = field(default_factory=tuple)   # also switched to eval while sampling
    block_swap: object = None
    collective_save: bool = False       # every process takes part in `save` (FSDP gathers); the main one writes


def dit_dtype(cfg, device: torch.device, full: bool) -> torch.dtype:
    """The DiT's weight dtype for this run (known before loading: sample prompts are encoded in it)."""
    if full:
        return torch.bfloat16 if cfg.full_bf16 else torch.float32
    return compute_dtype(device)


def load_training_dit(cfg, variant: Variant, device: torch.device, dtype: torch.dtype, fp8: bool) -> nn.Module:
    return dit_setup.load(cfg.dit, variant, device, dtype, fp8=fp8, fp8_scaled=cfg.fp8_scaled,
                          swap=cfg.blocks_to_swap > 0,
                          base_precision=getattr(cfg, "base_model_precision", "no_change"))   # LoRA only


def finish_dit(dit: nn.Module, cfg, device: torch.device, full: bool):
    """Block swap, gradient checkpointing and the attention kernel (after the LoRA network, if any, is applied)."""
    return dit_setup.finish(dit, device, blocks_to_swap=cfg.blocks_to_swap, training=True, trainable_blocks=full,
                            checkpointing=cfg.gradient_checkpointing,
                            checkpoint_offload=cfg.gradient_checkpointing_cpu_offload, attention=cfg.attn_mode())


def lora_trainee(cfg, variant: Variant, device: torch.device) -> Trainee:
    dtype = dit_dtype(cfg, device, full=False)
    dit = load_training_dit(cfg, variant, device, dtype, fp8=cfg.fp8_base)
    dit.eval().requires_grad_(False)
    if cfg.network_module == lycoris_net.MODULE:       # LoKr, LoHa ... (engine/train/lycoris_net.py)
        net = lycoris_net.create_lycoris(dit, cfg.network_rank(), cfg.network_alpha, cfg.network_dropout,
                                         parse_network_args(cfg.network_args))
        net.apply_to()                                  # LyCORIS registers its modules here: load after it
        if cfg.network_weights:
            net.load_weights(cfg.network_weights)
    else:
        net = create_network(dit, cfg.network_rank(), cfg.network_alpha, dropout=cfg.network_dropout,
                             **parse_network_args(cfg.network_args))
        if cfg.network_weights:
            net.load_weights(cfg.network_weights)
        net.apply_to()
    if cfg.network_weights:
        log.info("network weights loaded from %s", cfg.network_weights)
    net.to(device).train()
    swap = finish_dit(dit, cfg, device, full=False)
    log.info("%s: %d modules, rank %d, alpha %g", cfg.network_module, len(net.loras), net.loras[0].lora_dim,
             cfg.network_alpha)
    started = time.time()

    def save(path: Path, stats: dict) -> list[Path]:
        meta = lora_metadata(cfg, dict(stats, ss_training_finished_at=str(time.time())), title=path.stem)
        meta["ss_training_started_at"] = str(started)
        written = [net.save_weights(path, SAVE_DTYPES[cfg.save_precision], meta)]
        if cfg.save_format == "diffusers":
            written.append(net.save_diffusers(path.with_name(f"{path.stem}_diffusers.safetensors"),
                                              SAVE_DTYPES[cfg.save_precision]))
        return written

    return Trainee(dit, net, net.prepare_optimizer_params(cfg.learning_rate), dtype, save, (net,), swap)


def full_trainee(cfg, variant: Variant, device: torch.device) -> Trainee:
    dtype = dit_dtype(cfg, device, full=True)
    dit = load_training_dit(cfg, variant, device, dtype, fp8=False)
    dit.train().requires_grad_(True)
    swap = finish_dit(dit, cfg, device, full=True)   # swap needs --fused_backward_pass (train/validate.py)
    save_dtype = SAVE_DTYPES[cfg.save_precision] if cfg.save_precision else torch.bfloat16
    params = [p for p in dit.parameters() if p.requires_grad]
    log.info("full finetune: %d tensors, %.1fM parameters in %s", len(params),
             sum(p.numel() for p in params) / 1e6, str(dtype).removeprefix("torch."))

    def save(path: Path, stats: dict) -> list[Path]:
        meta = modelspec(variant, path.stem, time.time(), cfg, is_lora=False)
        meta.update({k: str(v) for k, v in stats.items()})
        return [save_dit_file(dit, path, save_dtype, meta, mem_eff=cfg.mem_eff_save,
                              marker_2511=variant.zero_cond_t)]

    groups = [{"params": params, "lr": cfg.learning_rate, "name": "dit"}]
    return Trainee(dit, dit, groups, dtype, save, block_swap=swap)
