"""`python -m engine extract_lora --model_org BASE --model_tuned TUNED --save_to OUT --dim R`: a LoRA from the
difference of a finetuned DiT and its base (musubi-tuner's qwen_extract_lora.py option names).

Per Linear layer (the 14 of every block and the top-level ones: engine/spec/lora_keys.py), the two weights are
read on their own (the loaders' reader), ΔW = tuned − base is formed in float32 on the compute device (the GPU
when there is one) and decomposed by SVD; the best rank-R approximation is kept as `lora_up = U·√S`,
`lora_down = √S·Vh` with alpha = R (scale 1). The share of ΔW's energy it keeps (Σ kept σ² / Σ σ², the squared
Frobenius norm) is reported per module in the progress events and in the file's metadata `qis_kept_energy`.
Layers that did not change are left out; other tensors that changed (biases, norms) cannot be expressed as a LoRA
and are reported.
"""

from __future__ import annotations

import json
import logging

import torch

from engine.models.runtime import resolve_device
from engine.models.safetensors_io import save_file_atomic
from engine.spec.errors import ModelFileError, OptionError
from engine.spec.lora_keys import kohya_name, known_path
from engine.spec.vram.tools import estimate_extract
from engine.tools.dit_stream import DitSource
from engine.tools.lora_io import check_output, lora_variant_metadata

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run(cfg, events) -> list[str]:
    if not cfg.model_org or not cfg.model_tuned:
        raise OptionError("extract_lora needs --model_org (the base DiT) and --model_tuned (the finetuned DiT).",
                          "Add both paths.")
    out = check_output(cfg.save_to, [cfg.model_org, cfg.model_tuned], "--save_to")
    version = cfg.resolved_version()
    events.phase("checking")
    base = DitSource(cfg.model_org, version, "--model_org")
    tuned = DitSource(cfg.model_tuned, version, "--model_tuned")
    linears = check_pair(base, tuned)
    device = resolve_device(cfg.device)
    est = estimate_extract(base.headers.values(), tuned.headers.values(), device.type == "cuda")
    events.estimate(est["vram_gib"], est["ram_gib"], est["phases"], peak_phase=est["peak_phase"], parts=est["parts"])
    events.phase("extracting")
    try:
        state, kept = extract(base, tuned, linears, cfg, device, events)
        report_other_changes(base, tuned, linears)
    finally:
        base.close()
        tuned.close()
    if not state:
        raise ModelFileError(f"--model_tuned {cfg.model_tuned}: no Linear weight differs from --model_org "
                             f"{cfg.model_org}.", "Pass the finetuned DiT and the base it was trained from.")
    meta = {**lora_variant_metadata(version, out.stem), "ss_network_dim": str(cfg.dim),
            "ss_network_alpha": str(float(cfg.dim)), "qis_extracted_from": json.dumps(
                {"model_org": base.path.name, "model_tuned": tuned.path.name}),
            "qis_kept_energy": json.dumps({k: round(v, 6) for k, v in kept.items()})}
    save_file_atomic(state, out, meta)
    shares = list(kept.values())
    log.info("extracted %d modules at rank %d: kept energy min %.4f, mean %.4f -> %s", len(kept), cfg.dim,
             min(shares), sum(shares) / len(shares), out)
    return [str(out)]


def check_pair(base: DitSource, tuned: DitSource) -> list[str]:
    """The Linear weights to compare; both files must hold the same tensors with the same shapes."""
    if set(base.names) != set(tuned.names):
        only = sorted(set(base.names) ^ set(tuned.names))
        raise ModelFileError(f"--model_org {base.path} and --model_tuned {tuned.path} hold different tensors "
                             f"(e.g. {only[0]}).", "Both must be the same Qwen-Image DiT architecture.")
    for name in base.names:
        if tuple(base.info(name).shape) != tuple(tuned.info(name).shape):
            raise ModelFileError(f"--model_tuned {tuned.path}: {name} has shape {list(tuned.info(name).shape)}, "
                                 f"the base has {list(base.info(name).shape)}.", "Pass DiTs of the same size.")
    return [n for n in base.names if n.endswith(".weight") and known_path(n[: -len(".weight")])]


@torch.no_grad()
def extract(base: DitSource, tuned: DitSource, linears: list[str], cfg, device, events):
    dtype = PRECISIONS[cfg.save_precision]
    state, kept = {}, {}
    for i, name in enumerate(linears, 1):
        delta = tuned.read(name, device).float() - base.read(name, device).float()
        module = name[: -len(".weight")]
        if torch.count_nonzero(delta) == 0:
            events.progress(i, len(linears), unit="module", module=module, kept_energy=None)
            continue
        up, down, share = low_rank(delta, cfg.dim, cfg.clamp_quantile)
        stem = kohya_name(module)
        state[f"{stem}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
        state[f"{stem}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
        state[f"{stem}.alpha"] = torch.tensor(float(up.shape[1]), dtype=dtype)
        kept[module] = share
        events.progress(i, len(linears), unit="module", module=module, kept_energy=round(share, 6))
    return state, kept


def low_rank(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None):
    """(up (out, r), down (r, in), kept energy share) of the best rank-r approximation of `delta`."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    energy = (s ** 2).sum()
    share = float((s[:r] ** 2).sum() / energy) if energy > 0 else 1.0
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    if clamp_quantile is not None:      # musubi's outlier clamp, on both factors together
        values = torch.cat([up.flatten(), down.flatten()]).abs()
        limit = torch.quantile(values.float().cpu(), clamp_quantile).item() if values.numel() <= 2 ** 24 else \
            values.float().kthvalue(max(1, int(clamp_quantile * values.numel()))).values.item()
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    return up, down, share


def report_other_changes(base: DitSource, tuned: DitSource, linears: list[str]) -> None:
    """Biases, norms and other non-Linear tensors that changed: a LoRA cannot carry them, so say so."""
    changed = []
    for name in base.names:
        if name in linears:
            continue
        a, b = base.read(name), tuned.read(name)
        if a.is_floating_point() and not torch.equal(a, b):
            changed.append(name)
    if changed:
        log.warning("%d non-Linear tensors also changed and are not in the LoRA (e.g. %s); a LoRA only carries "
                    "Linear weight deltas.", len(changed), ", ".join(changed[:3]))
