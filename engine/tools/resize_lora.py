"""`python -m engine resize_lora --model IN --save_to OUT --new_rank R [--dynamic_method sv_fro --dynamic_param
0.9]`: lower a LoRA's rank by SVD (kohya's resize_lora.py option names).

Per module the delta ΔW = scale · up @ down is decomposed without forming it: QR of up and of downᵀ, then the SVD of
the small r×r core gives ΔW's singular values and vectors exactly. The new rank is --new_rank, or with
--dynamic_method the smallest rank meeting the threshold (capped at --new_rank):
- sv_fro: the kept share of Σσ² (kept energy, the squared Frobenius norm) reaches --dynamic_param;
- sv_cumulative: the kept share of Σσ reaches --dynamic_param;
- sv_ratio: keep σ ≥ σ_max / --dynamic_param.
The factors are `up = U·√S`, `down = √S·Vh` with alpha = the new rank (scale 1). Each module's relative error
‖ΔW − ΔW_new‖_F / ‖ΔW‖_F is reported (progress events, the log's worst and mean, metadata `qis_resize`).
"""

from __future__ import annotations

import json
import logging

import torch

from engine.models.runtime import resolve_device
from engine.spec.errors import OptionError
from engine.tools.lora_io import HASH_KEYS, Module, Plain, check_output, read_plain, write_lora

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_options(cfg) -> None:
    if not cfg.model:
        raise OptionError("--model is required: the LoRA file to resize.", "Add --model FILE.safetensors.")
    if cfg.dynamic_method and cfg.dynamic_param is None:
        raise OptionError(f"--dynamic_method {cfg.dynamic_method} needs --dynamic_param.",
                          "e.g. --dynamic_method sv_fro --dynamic_param 0.9 (keep 90 % of the energy).")
    if cfg.dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < cfg.dynamic_param <= 1:
        raise OptionError(f"--dynamic_param {cfg.dynamic_param}: {cfg.dynamic_method} takes a share in (0, 1].",
                          "e.g. --dynamic_param 0.9.")
    if cfg.dynamic_method == "sv_ratio" and cfg.dynamic_param < 1:
        raise OptionError(f"--dynamic_param {cfg.dynamic_param}: sv_ratio takes a ratio ≥ 1 (σ_max / σ_min kept).",
                          "e.g. --dynamic_param 4.")


def run(cfg, events) -> list[str]:
    check_options(cfg)
    out = check_output(cfg.save_to, [cfg.model], "--save_to")
    events.phase("loading")
    plain = read_plain(cfg.model, "--model")
    device = resolve_device(cfg.device)
    events.phase("resizing")
    resized, report = resize(plain, cfg, device, events)
    meta = {k: v for k, v in plain.metadata.items() if k not in HASH_KEYS}
    ranks = sorted({m.rank for m in resized.modules.values()})
    meta["ss_network_dim"] = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
    meta["ss_network_alpha"] = meta["ss_network_dim"]
    errors = [r["error"] for r in report.values()]
    summary = {"method": cfg.dynamic_method or "fixed", "param": cfg.dynamic_param, "new_rank": cfg.new_rank,
               "max_error": round(max(errors), 6), "mean_error": round(sum(errors) / len(errors), 6),
               "modules": {k: {"rank": r["rank"], "error": round(r["error"], 6)} for k, r in report.items()}}
    meta["qis_resize"] = json.dumps(summary)
    resized.metadata = meta
    write_lora(resized, out, "kohya", PRECISIONS[cfg.save_precision])
    log.info("resized %d modules to rank %s: relative error max %.4f, mean %.4f -> %s", len(report),
             "/".join(map(str, ranks)), summary["max_error"], summary["mean_error"], out)
    return [str(out)]


@torch.no_grad()
def resize(plain: Plain, cfg, device, events) -> tuple[Plain, dict]:
    out = Plain(plain.path, "kohya", metadata=dict(plain.metadata), alpha_dtype=torch.float32)
    report = {}
    total = len(plain.modules)
    for i, (module, m) in enumerate(plain.modules.items(), 1):
        u, s, vh = delta_svd(m, device)
        rank = choose_rank(s, cfg.new_rank, cfg.dynamic_method, cfg.dynamic_param)
        energy = float((s ** 2).sum())
        error = (float((s[rank:] ** 2).sum()) / energy) ** 0.5 if energy > 0 else 0.0
        root = s[:rank].sqrt()
        out.modules[module] = Module((root[:, None] * vh[:rank]).cpu(), (u[:, :rank] * root).cpu(), float(rank))
        report[module] = {"rank": rank, "error": error, "from_rank": m.rank}
        events.progress(i, total, unit="module", module=module, rank=rank, error=round(error, 6))
    return out, report


def delta_svd(m: Module, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of scale · up @ down via QR of both factors: only r×r matrices are decomposed."""
    up = m.up.to(device, torch.float32) * m.scale
    down = m.down.to(device, torch.float32)
    qu, ru = torch.linalg.qr(up)              # up = qu ru,   qu (out, r)
    qd, rd = torch.linalg.qr(down.T)          # downᵀ = qd rd, qd (in, r)
    uc, s, vhc = torch.linalg.svd(ru @ rd.T)
    return qu @ uc, s, vhc @ qd.T


def choose_rank(s: torch.Tensor, new_rank: int, method: str | None, param: float | None) -> int:
    """The kept rank for singular values `s` (descending), at least 1 and at most new_rank and len(s)."""
    limit = min(new_rank, s.numel())
    if method is None:
        return limit
    if method == "sv_ratio":
        wanted = int((s >= s[0] / param).sum())
    else:
        values = s ** 2 if method == "sv_fro" else s
        total = float(values.sum())
        shares = torch.cumsum(values, 0) / total if total > 0 else torch.ones_like(values)
        wanted = int((shares < param - 1e-7).sum()) + 1
    return max(1, min(limit, wanted))
