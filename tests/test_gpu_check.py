"""benchmarks/gpu_check.py --dry: on the CPU at reduced size it starts, runs every row through the engine's own
setup with each preset's options applied, writes the table and JSON, and claims no GPU figure."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from engine.models import dit_setup
from engine.spec.presets import list_presets

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load()


def test_dry_run_runs_every_row_and_claims_no_gpu_figures(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dit_setup, "load", dit_setup.load)      # main() replaces it for its run: undone after
    out = tmp_path / "dry"
    assert gpu_check.main(["--dry", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    presets = {p.path.stem: p for p in list_presets()}
    assert set(presets) <= set(rows) and {"cache-text-fp8_vl", "cache-text-bf16", "cache-latents"} <= set(rows)
    assert [r["row"] for r in data["rows"]][:3] == ["lora-12gb", "lora-16gb", "lora-24gb"]   # by value
    assert data["meta"]["dry"] is True and all(r["status"] == "dry" for r in rows.values())
    for r in rows.values():                       # a CPU run never claims GPU numbers
        assert not {"measured_gib", "allocated_gib", "reserved_gib", "step_s", "utilisation"} & set(r), r
        assert r["ram_peak_gib"] is None and r["estimate_gib"] > 0
    # each training preset's memory options were applied by the engine's setup (swap scaled to 4 blocks)
    for name, preset in presets.items():
        if preset.kind == "generate_image":
            continue
        applied, fields = rows[name]["applied"], preset.fields
        assert applied["blocks_to_swap"] == gpu_check.scaled_swap(fields.get("blocks_to_swap", 0), 4), name
        assert applied["fp8"] == bool(fields.get("fp8_base")), name
        assert applied["gradient_checkpointing"] == bool(fields.get("gradient_checkpointing")), name
        if preset.kind == "train" and fields.get("full_bf16"):
            assert applied["weight_dtype"] == "bfloat16", name
    table = out.with_suffix(".md").read_text()
    assert "Dry run on the CPU at reduced size: no GPU figures" in table
    assert table.count("| dry |") == len(rows) and table in capsys.readouterr().out


def test_budget_skips_rows_and_only_picks_rows(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(dit_setup, "load", dit_setup.load)
    out = tmp_path / "some"
    assert gpu_check.main(["--dry", "--only", "cache-latents,lora-12gb", "--budget_s", "0.001", "--out",
                           str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["lora-12gb", "cache-latents"]
    assert all(r["status"].startswith("skipped: budget") for r in rows)
    with pytest.raises(SystemExit, match="unknown row"):
        gpu_check.main(["--dry", "--only", "nope"])


def test_card_peak_comes_from_the_device_name(gpu_check):
    assert gpu_check.card_peak("NVIDIA H200") == 989.0
    assert gpu_check.card_peak("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.card_peak("NVIDIA GeForce RTX 4090") == 165.0
    assert gpu_check.card_peak("Some Future Card") is None
