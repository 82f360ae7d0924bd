"""Analytic VRAM/RAM estimator (issue 6): `python -m engine estimate_vram --for <command> [its options]`.

Pure Python (no torch import), so the GUI can recompute an estimate on every form change. The model:
engine/spec/vram/params.py (exact parameter counts), memory.py (bytes per component), estimate.py (phases),
constants.py (every constant with its source; docs/vram-constants.md explains them).
"""

from __future__ import annotations

import json
import sys

from engine.spec.vram.estimate import PARTS, estimate, phases_for, workload_from_config  # noqa: F401
from engine.spec.vram.memory import Workload  # noqa: F401


def estimate_config(cfg) -> dict:
    """The estimate for a parsed config (EstimateVramConfig or a train/generate config)."""
    return estimate(workload_from_config(cfg))


def run(cfg, events) -> list[str]:
    result = estimate_config(cfg)
    events.estimate(result["vram_gib"], result["ram_gib"], result["phases"], peak_phase=result["peak_phase"],
                    parts=result["parts"])
    print(json.dumps(result, indent=None), file=sys.stdout, flush=True)
    return []
