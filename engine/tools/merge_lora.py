"""`python -m engine merge_lora --dit D --lora_weight L... --lora_multiplier M... --save_merged_model OUT`:
bake LoRAs into the DiT (musubi-tuner's option names), streamed into a new single-file DiT.

Each DiT tensor is read on its own (the loader's reader), the LoRA deltas of its layer are added in float32 on the
compute device (the same LoraMerger generate_image applies while loading, so a merged file generates what the LoRA
applied at load time generates), then it is cast (or quantised) and written straight to the output: the DiT is
never whole in memory. The output is ComfyUI's layout with the architecture config as JSON in the metadata, the
Edit-2511 marker key kept, and the list of merged LoRAs in `qis_merged_loras`.

Precision (--merged_precision): bf16 (default), fp16, fp32; fp8 = the block Linear weights in float8_e4m3fn with
block-wise scales (engine/models/fp8.py's layout, marked for our loader: engine/models/fp8_files.py); fp8_e4m3fn =
the same weights cast without scales.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from engine.models.fp8 import is_target, quantize_weight, scale_shape
from engine.models.fp8_files import MARKER_KEY, PLAIN, SCALED, scale_key
from engine.models.lora_formats import LoraMerger, read_lora
from engine.models.runtime import resolve_device
from engine.models.safetensors_io import dtype_name, write_streamed
from engine.spec.errors import ModelFileError, OptionError
from engine.spec.lora_keys import check_version, summarize
from engine.spec.vram.tools import estimate_merge
from engine.tools.dit_stream import MARKER_KEY_2511, DitSource, merged_metadata, out_key
from engine.tools.lora_io import check_output

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                    "fp8": torch.bfloat16, "fp8_e4m3fn": torch.bfloat16}   # fp8: the dtype of what stays unquantised
FP8_KINDS = {"fp8": SCALED, "fp8_e4m3fn": PLAIN}


def multipliers(cfg) -> list[float]:
    """One per LoRA: none given → 1.0 each; one given → that one for all (generate_image's rule)."""
    given, n = list(cfg.lora_multiplier), len(cfg.lora_weight)
    if not given:
        return [1.0] * n
    if len(given) == 1:
        return given * n
    if len(given) != n:
        raise OptionError(f"--lora_multiplier has {len(given)} values for {n} --lora_weight files.",
                          "Give one multiplier per LoRA, or a single one for all.")
    return given


def run(cfg, events) -> list[str]:
    if not cfg.lora_weight:
        raise OptionError("merge_lora needs at least one --lora_weight.", "Add --lora_weight FILE.safetensors.")
    out = check_output(cfg.save_merged_model, [cfg.dit or "", *cfg.lora_weight], "--save_merged_model")
    mults = multipliers(cfg)
    version = cfg.resolved_version()
    events.phase("checking")
    for path in cfg.lora_weight:
        check_version(summarize(path), version, "--lora_weight")        # headers only: fails in milliseconds
    source = DitSource(cfg.dit, version)
    device = resolve_device(cfg.device)
    est = estimate_merge(source.headers.values(), cfg.lora_weight, device.type == "cuda")
    events.estimate(est["vram_gib"], est["ram_gib"], est["phases"], peak_phase=est["peak_phase"], parts=est["parts"])
    merger = LoraMerger([(read_lora(p), m) for p, m in zip(cfg.lora_weight, mults)])
    check_fits(merger, source)
    started = time.time()
    events.phase("merging")
    try:
        write_merged(source, merger, out, cfg.merged_precision, device, events, mults, cfg.lora_weight)
    finally:
        source.close()
    log.info("merged %d LoRA file(s) into %d weights of %s in %.1f s: %s", len(cfg.lora_weight), len(merger.used),
             cfg.dit, time.time() - started, out)
    return [str(out)]


def check_fits(merger: LoraMerger, source: DitSource) -> None:
    """Every LoRA module must meet a DiT weight of its shape — checked on the headers, before anything is written."""
    for key, entries in merger.by_key.items():
        lora = entries[0][0]
        if key not in source.names:
            raise ModelFileError(f"LoRA file {lora.path}: module {key.removesuffix('.weight')} is not in the DiT "
                                 f"{source.path}.", "The LoRA was made for a model with more blocks.")
        shape = tuple(source.info(key).shape)
        for lora, factor, _ in entries:
            if tuple(factor.out_in()) != shape:
                raise ModelFileError(f"LoRA file {lora.path}: {key} gives a {tuple(factor.out_in())} delta but the "
                                     f"DiT weight is {shape}.", "The LoRA was made for a model of another size.")


def plan(source: DitSource, precision: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """The output header: every tensor in file order (a scale right after its fp8 weight), then the marker."""
    keep = dtype_name(PRECISION_DTYPES[precision])
    fp8 = FP8_KINDS.get(precision)
    entries = []
    for name in source.names:
        info = source.info(name)
        shape = tuple(info.shape)
        floating = info.dtype in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
        if fp8 and _quantised(name, shape):
            entries.append((out_key(name), "F8_E4M3", shape))
            if fp8 == SCALED:
                entries.append((out_key(scale_key(name)), keep, scale_shape(shape)))
        else:
            entries.append((out_key(name), keep if floating else info.dtype, shape))
    if source.has_2511_marker or source.variant.zero_cond_t:
        entries.append((MARKER_KEY_2511, keep, (0,)))
    return entries


def _quantised(name: str, shape: tuple) -> bool:
    return is_target(name) and len(shape) == 2


def tensors(source: DitSource, merger: LoraMerger, precision: str, device, events):
    """(output key, tensor) in plan order: read, merge in float32, cast or quantise, hand to the writer."""
    keep = PRECISION_DTYPES[precision]
    fp8 = FP8_KINDS.get(precision)
    total = len(source.names)
    every = max(1, total // 100)
    for i, name in enumerate(source.names, 1):
        t = source.read(name, device)
        if name in merger.by_key:
            t = merger.transform(name, t.float())
        if fp8 and _quantised(name, tuple(t.shape)):
            q, scale = quantize_weight(t.to(keep), scaled=fp8 == SCALED, key=name)
            yield out_key(name), q
            if scale is not None:
                yield out_key(scale_key(name)), scale
        else:
            yield out_key(name), t.to(keep) if t.is_floating_point() else t
        if i % every == 0 or i == total:
            events.progress(i, total, unit="tensor")
    if source.has_2511_marker or source.variant.zero_cond_t:
        yield MARKER_KEY_2511, torch.zeros(0, dtype=keep)


def write_merged(source: DitSource, merger: LoraMerger, out: Path, precision: str, device, events,
                 mults: list[float], paths: list[str]) -> None:
    merged = [{"file": Path(p).name, "multiplier": m} for p, m in zip(paths, mults)]
    extra = {"qis_merged_loras": json.dumps(merged), "qis_merged_from": source.path.name}
    if precision in FP8_KINDS:
        extra[MARKER_KEY] = FP8_KINDS[precision]
    entries = plan(source, precision)
    write_streamed(out, entries, tensors(source, merger, precision, device, events),
                   merged_metadata(source, extra))
    merger.check_all_used()
