"""Metadata written into LoRA files: kohya's `ss_*` keys, the SAI modelspec and the kohya hashes
(as musubi-tuner writes them). Values that only the training loop knows (item counts, steps, times) are
passed in `stats`; everything else comes from the typed config and the variant registry.

API:
- `lora_metadata(cfg, stats=None, title=None) -> dict[str, str]`   ss_* + modelspec.*, honours --no_metadata
- `add_hashes(state, metadata) -> metadata`                       sshs_model_hash / sshs_legacy_hash
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from datetime import datetime

from safetensors.torch import save

from engine.spec.config import parse_network_args
from engine.spec.variants import get_variant

MINIMAL_KEYS = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
IMPLEMENTATION = "https://github.com/QwenLM/Qwen-Image"


def _s(value) -> str:
    return "None" if value is None else str(value)


def lora_metadata(cfg, stats: dict | None = None, title: str | None = None) -> dict[str, str]:
    """ss_* and modelspec metadata for a TrainNetworkConfig. `stats` may carry ss_* values the loop knows
    (ss_num_train_items, ss_num_batches_per_epoch, ss_num_epochs, ss_steps, ss_epoch, ss_datasets, ...)."""
    variant = get_variant(cfg.resolved_version())
    net_args = parse_network_args(cfg.network_args) if cfg.network_args else None
    now = time.time()
    meta = {
        "ss_session_id": str(int.from_bytes(os.urandom(4), "little")),
        "ss_training_started_at": _s(now),
        "ss_output_name": _s(cfg.output_name),
        "ss_learning_rate": _s(cfg.learning_rate),
        "ss_gradient_checkpointing": _s(cfg.gradient_checkpointing),
        "ss_gradient_checkpointing_cpu_offload": _s(cfg.gradient_checkpointing_cpu_offload),
        "ss_gradient_accumulation_steps": _s(cfg.gradient_accumulation_steps),
        "ss_max_train_steps": _s(cfg.max_train_steps),
        "ss_lr_warmup_steps": _s(cfg.lr_warmup_steps),
        "ss_lr_scheduler": _s(cfg.lr_scheduler),
        "ss_base_model_version": variant.base_model_version,
        "ss_network_module": _s(cfg.network_module),
        "ss_network_dim": _s(cfg.network_rank()),
        "ss_network_alpha": _s(cfg.network_alpha),
        "ss_network_dropout": _s(cfg.network_dropout),
        "ss_mixed_precision": _s(cfg.mixed_precision),
        "ss_seed": _s(cfg.seed),
        "ss_training_comment": "None",
        "ss_optimizer": _optimizer_text(cfg),
        "ss_max_grad_norm": _s(cfg.max_grad_norm),
        "ss_fp8_base": _s(cfg.fp8_base),
        "ss_full_fp16": "False",
        "ss_full_bf16": "False",
        "ss_weighting_scheme": _s(cfg.weighting_scheme),
        "ss_logit_mean": _s(cfg.logit_mean),
        "ss_logit_std": _s(cfg.logit_std),
        "ss_mode_scale": _s(cfg.mode_scale),
        "ss_guidance_scale": "1.0",
        "ss_timestep_sampling": _s(cfg.timestep_sampling),
        "ss_sigmoid_scale": _s(cfg.sigmoid_scale),
        "ss_discrete_flow_shift": _s(cfg.discrete_flow_shift),
        "ss_sd_model_name": os.path.basename(cfg.dit) if cfg.dit else "None",
        "ss_vae_name": os.path.basename(cfg.vae) if cfg.vae else "None",
    }
    if net_args:
        meta["ss_network_args"] = json.dumps({k: _s(v) for k, v in net_args.items()})
    meta.update({k: _s(v) if not isinstance(v, (dict, list)) else json.dumps(v) for k, v in (stats or {}).items()})
    if cfg.no_metadata:
        meta = {k: v for k, v in meta.items() if k in MINIMAL_KEYS}
    meta.update(modelspec(variant, title or cfg.output_name or "LoRA", now, cfg))
    return meta


def _optimizer_text(cfg) -> str:
    """kohya's "module.Class(args)" form."""
    name = cfg.optimizer_type
    full = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
            "adafactor": "transformers.optimization.Adafactor"}.get(name.lower(), name)
    return f"{full}({','.join(cfg.optimizer_args)})" if cfg.optimizer_args else full


def modelspec(variant, title: str, timestamp: float, cfg=None, is_lora: bool = True) -> dict[str, str]:
    """SAI model spec 1.0.0 as musubi writes it for Qwen-Image."""
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": variant.modelspec_arch + ("/lora" if is_lora else ""),
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": variant.modelspec_reso,
        "modelspec.date": datetime.fromtimestamp(timestamp).isoformat(),
    }
    lo, hi = getattr(cfg, "min_timestep", None), getattr(cfg, "max_timestep", None)
    if lo is not None or hi is not None:
        spec["modelspec.timestep_range"] = f"{lo if lo is not None else 0},{hi if hi is not None else 1000}"
    return spec


def add_hashes(state: dict, metadata: dict[str, str]) -> dict[str, str]:
    """kohya's sshs_model_hash (sha256 of the tensor bytes of the file written with only ss_* metadata) and
    sshs_legacy_hash (sha256 of 64 KiB at offset 1 MiB, 8 hex digits), so tools that index LoRAs by hash agree."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in state.items()}, ss_only or None)
    buf = io.BytesIO(data)
    header_len = int.from_bytes(buf.read(8), "little")
    metadata = dict(metadata)
    metadata["sshs_model_hash"] = hashlib.sha256(data[8 + header_len:]).hexdigest()
    metadata["sshs_legacy_hash"] = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return metadata
