"""What a run trains, set up with its memory options: a LoRA network on a frozen DiT (train_network) or the whole
DiT (train). The loop only sees a `Trainee`: the DiT to call, the module whose weights train (saved in states),
its optimizer parameter groups, and how to write the model file.

Order of the LoRA setup matters: fp8 quantisation while loading → LoRA wraps the block Linears (their own
forward, fp8 or not, stays underneath) → block swap places the model (the LoRA weights stay on the device)
→ gradient checkpointing (+ activation CPU offload) → attention kernel.

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

from engine.models.runtime import compute_dtype
from engine.spec.variants import Variant

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


def dit_dtype(cfg, device: torch.device, full: bool) -> torch.dtype:
    """The DiT's weight dtype for this run (known before loading: sample prompts are encoded in it)."""
    if full:
        return torch.bfloat16 if cfg.full_bf16 else torch.float32
    return compute_dtype(device)


def load_training_dit(cfg, variant: Variant, device: torch.device, dtype: torch.dtype, fp8: bool):
    from engine.infer.dit_setup import Fp8Hook
    from engine.models.dit import load_dit

    hook = Fp8Hook(scaled=cfg.fp8_scaled) if fp8 else None
    swap = cfg.blocks_to_swap > 0
    dit = load_dit(cfg.dit, model_version=variant.name, device="cpu" if swap else device, dtype=dtype,
                   transform=hook.transform if hook else None)
    if hook is not None:
        hook.finish(dit)
    return dit


def _attention(dit, cfg, device: torch.device) -> None:
    from engine.spec.errors import OptionError

    mode = cfg.attn_mode()
    if mode == "sdpa":
        return
    if device.type != "cuda":
        raise OptionError(f"--{'flash_attn' if mode == 'flash' else mode} needs a CUDA device (running on "
                          f"{device.type}).", "Use --sdpa.")
    dit.set_attention_backend({"flash": "flash", "xformers": "xformers"}[mode])


def _checkpointing(dit, cfg, device: torch.device) -> None:
    if cfg.gradient_checkpointing:
        from engine.models.checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(dit, cfg.gradient_checkpointing_cpu_offload, device)


def lora_trainee(cfg, variant: Variant, device: torch.device) -> Trainee:
    from engine.train.lora import SAVE_DTYPES, create_network, parse_network_args
    from engine.train.lora_metadata import lora_metadata

    dtype = dit_dtype(cfg, device, full=False)
    dit = load_training_dit(cfg, variant, device, dtype, fp8=cfg.fp8_base)
    dit.eval().requires_grad_(False)
    net = create_network(dit, cfg.network_dim, cfg.network_alpha, dropout=cfg.network_dropout,
                         **parse_network_args(cfg.network_args))
    if cfg.network_weights:
        net.load_weights(cfg.network_weights)
        log.info("LoRA weights loaded from %s", cfg.network_weights)
    net.apply_to()
    net.to(device).train()
    swap = None
    if cfg.blocks_to_swap:
        from engine.models.block_swap import enable_block_swap

        swap = enable_block_swap(dit, cfg.blocks_to_swap, device, supports_backward=True)
    _checkpointing(dit, cfg, device)
    _attention(dit, cfg, device)
    log.info("LoRA: %d modules, rank %d, alpha %g", len(net.loras), net.loras[0].lora_dim, cfg.network_alpha)
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
    from engine.train.checkpoints import save_dit_file
    from engine.train.lora_metadata import modelspec

    dtype = dit_dtype(cfg, device, full=True)
    dit = load_training_dit(cfg, variant, device, dtype, fp8=False)
    dit.train().requires_grad_(True)
    swap = None
    if cfg.blocks_to_swap:       # validate: only with --fused_backward_pass (weights stepped while on the device)
        from engine.models.block_swap import enable_block_swap

        swap = enable_block_swap(dit, cfg.blocks_to_swap, device, supports_backward=True, trainable=True)
    _checkpointing(dit, cfg, device)
    _attention(dit, cfg, device)
    save_dtype = {None: torch.bfloat16, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
                  "bf16": torch.bfloat16}[cfg.save_precision]
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
