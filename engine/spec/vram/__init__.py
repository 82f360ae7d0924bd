"""Analytic VRAM/RAM estimator: `python -m engine estimate_vram --for <command> [its options]`.

Pure Python (no torch import), so the GUI can recompute an estimate on every form change. The model:
engine/spec/vram/params.py (exact parameter counts), memory.py (bytes per component), estimate.py (phases),
constants.py (every constant with its source; docs/vram-constants.md explains them).
"""

from __future__ import annotations

import json
import sys

from engine.spec.vram.estimate import PARTS, estimate, estimate_options, phases_for, workload_from_config  # noqa: F401
from engine.spec.vram.memory import Workload  # noqa: F401


def estimate_config(cfg, command: str | None = None, source: str = "options", **values) -> dict:
    """The estimate for a config: a train_network / train / generate_image config or an EstimateVramConfig, with
    `values` on top (estimate_options, the one builder of the estimator's input)."""
    return estimate(workload_from_config(estimate_options(cfg, command, source, **values)))


def run(cfg, events) -> list[str]:
    result = estimate_config(cfg)
    events.estimate(result["vram_gib"], result["ram_gib"], result["phases"], peak_phase=result["peak_phase"],
                    parts=result["parts"])
    print(json.dumps(result, indent=None), file=sys.stdout, flush=True)
    return []
