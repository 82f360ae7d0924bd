"""`python -m engine check_dataset --dataset_config X [--model_version V] [--json]`.

Prints every problem (file, what is wrong, the fix), the items per dataset and a bucket histogram, without
loading a model. Exits with code 2 when there are errors. `--json` prints the report as one JSON line (the
GUI can also call `report(plan)` directly: this module does not import torch).
"""

from __future__ import annotations

import json
import sys

from engine.spec.dataset.plan import Plan, build_plan
from engine.spec.errors import DatasetError, OptionError


def report(plan: Plan) -> dict:
    """The plan as plain data: problems, per-dataset counts, bucket histogram."""
    return {
        "dataset_config": str(plan.config.path),
        "model_version": plan.model_version,
        "ok": not plan.errors,
        "errors": len(plan.errors),
        "warnings": len(plan.warnings),
        "problems": [p.as_dict() for p in plan.problems],
        "datasets": [{
            "index": d.spec.index,
            "source": str(d.spec.image_directory or d.spec.image_jsonl_file),
            "cache_directory": str(d.spec.cache_directory),
            "control_directory": str(d.spec.control_directory) if d.spec.control_directory else None,
            "resolution": list(d.spec.resolution),
            "batch_size": d.spec.batch_size,
            "num_repeats": d.spec.num_repeats,
            "items": len(d.items),
            "skipped": [str(it.image_path) for it in d.skipped],
            "controls": sum(len(it.control_buckets) for it in d.items),
        } for d in plan.datasets],
        "buckets": plan.histogram(),
    }


def format_text(rep: dict) -> str:
    lines = [f"dataset config: {rep['dataset_config']} (model version: {rep['model_version'] or 'not given'})"]
    for d in rep["datasets"]:
        lines.append(f"  datasets[{d['index']}] {d['source']}: {d['items']} items, {d['controls']} control images, "
                     f"resolution {d['resolution'][0]}x{d['resolution'][1]}, batch {d['batch_size']}, "
                     f"repeats {d['num_repeats']}, cache {d['cache_directory']}")
    if rep["buckets"]:
        lines.append("buckets (items x repeats):")
        width = max(rep["buckets"].values())
        for bucket, count in rep["buckets"].items():
            bar = "#" * max(1, round(30 * count / width))
            lines.append(f"  {bucket:>11}  {count:5d}  {bar}")
    for p in rep["problems"]:
        lines.append(f"{p['level'].upper()}: {p['file']}: {p['message']}\n  fix: {p['fix']}")
    verdict = "OK" if rep["ok"] else f"{rep['errors']} error(s)"
    lines.append(f"{verdict}, {rep['warnings']} warning(s).")
    return "\n".join(lines)


def run(cfg, events) -> list[str]:
    if not cfg.dataset_config:
        raise OptionError("check_dataset needs --dataset_config.", "Pass the dataset TOML file.")
    version = cfg.model_version or ("edit-2509" if cfg.edit_plus else "edit" if cfg.edit else None)
    events.phase("checking")
    plan = build_plan(cfg.dataset_config, version)
    rep = report(plan)
    out = json.dumps(rep, ensure_ascii=False) if cfg.json else format_text(rep)
    print(out, file=sys.stdout, flush=True)
    if plan.errors:
        raise DatasetError(f"{cfg.dataset_config}: {len(plan.errors)} dataset problem(s) found (listed above).",
                           "Fix each file named above, then run check_dataset again.")
    return []
