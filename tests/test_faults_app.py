"""Fault suite: the Train tab's same-name rule, as plain Python (app/train_runs.py). A run whose output name is
taken, by files of an earlier run or by a queued/running twin, is refused before queueing, with a free name to
offer; a twin is refused even with --overwrite."""

from __future__ import annotations

import pytest

from app import train_runs as R
from engine.spec import config as C

pytestmark = pytest.mark.fault("training")


def cfg(out, name="lora", **kw):
    return C.from_dict(C.TrainNetworkConfig, {"output_dir": str(out), "output_name": name, **kw}, source="test")


def view(out, name, status="running", job_id="job-1"):
    return {"id": job_id, "command": "train_network", "status": status,
            "argv": ["python", "-m", "engine", "train_network", "--output_dir", str(out), "--output_name", name]}


def test_earlier_outputs_offer_a_free_name_and_overwrite(tmp_path):
    (tmp_path / "lora.safetensors").write_bytes(b"earlier")
    (tmp_path / "lora_2_config.toml").write_text("")            # lora_2 is taken too: lora_3 is proposed
    text, free, can_overwrite = R.name_conflict(cfg(tmp_path), [])
    assert "lora.safetensors" in text and free == "lora_3" and can_overwrite
    assert R.name_conflict(cfg(tmp_path, overwrite=True), []) is None
    assert R.name_conflict(cfg(tmp_path, resume=str(tmp_path)), []) is None


def test_queued_twin_is_refused_even_with_overwrite(tmp_path):
    views = [view(tmp_path, "lora", "queued"), view(tmp_path, "lora_2", "running", "job-2")]
    text, free, can_overwrite = R.name_conflict(cfg(tmp_path, overwrite=True), views)
    assert "queued" in text and "job-1" in text and free == "lora_3" and not can_overwrite


def test_finished_twin_counts_through_its_files_only(tmp_path):
    assert R.name_conflict(cfg(tmp_path), [view(tmp_path, "lora", "failed")]) is None
