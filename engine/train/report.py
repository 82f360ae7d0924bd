"""What a training run reports besides the loop's own progress: the resolved run config saved next to its
outputs, the VRAM/RAM `estimate` event at the start (engine.spec.vram, from the run's own options and the dataset's
largest bucket) and `vram` events with the measured peak, so the job log shows measured against estimated."""

from __future__ import annotations

import logging
import resource
from dataclasses import replace
from pathlib import Path

import torch

from engine.spec import naming
from engine.spec.config import save_toml
from engine.spec.errors import EngineError
from engine.spec.vram import estimate_config

log = logging.getLogger(__name__)
GIB = 1024 ** 3


def write_run_config(cfg, command: str) -> Path:
    """`<output_dir>/<output_name>_config.toml`: the full resolved config (loadable with --config_file). This
    job's event file and resume folder are left out: a run started again from it is a new run."""
    path = naming.run_toml(cfg.output_dir, cfg.output_name)
    save_toml(replace(cfg, events_file=None, resume=None), path)
    log.info("%s: run config saved to %s", command, path)
    return path


def emit_estimate(cfg, data, events, full: bool) -> dict | None:
    """The estimator's answer for this run (largest bucket, largest batch, caches ready)."""
    largest = max(data.items, key=lambda it: _pixels(it.key))
    h, w = _latent_hw(largest.key[0])
    try:
        result = estimate_config(cfg, "train" if full else "train_network", resolution=[w * 8, h * 8],
                                 batch_size=max(data.batch_sizes.values()), caches_ready=True,
                                 num_control_images=sum(1 for k in largest.key if "control" in k))
    except EngineError as e:     # e.g. a size the estimator does not model; the run itself is fine
        log.warning("no VRAM estimate for this run: %s", e.message)
        return None
    events.estimate(result["vram_gib"], result["ram_gib"], result["phases"], peak_phase=result["peak_phase"],
                    parts=result["parts"])
    return result


def _latent_hw(key: str) -> tuple[int, int]:
    """`latents_1x8x8` → (8, 8)."""
    _, h, w = key.rsplit("_", 1)[1].split("x")
    return int(h), int(w)


def _pixels(key: tuple) -> int:
    h, w = _latent_hw(key[0])
    return h * w


def report_memory(events, device: torch.device, phase: str) -> None:
    """A `vram` event: CUDA allocated/reserved/peak (zeros on the CPU) and the process's peak RSS."""
    ram = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB     # Linux reports KiB
    if device.type == "cuda":
        events.vram(round(torch.cuda.memory_allocated(device) / GIB, 3),
                    round(torch.cuda.memory_reserved(device) / GIB, 3),
                    round(torch.cuda.max_memory_allocated(device) / GIB, 3), round(ram, 3), phase=phase)
    else:
        events.vram(0.0, 0.0, 0.0, round(ram, 3), phase=phase, device="cpu")
