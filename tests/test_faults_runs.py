"""Fault suite: training runs never lose work. Same-name runs, NaN losses, leftovers of interrupted saves, disk
errors at save time, Stop from a process that ignores SIGINT. Real runs of the demo models on the CPU."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from _fault_util import ENV, ROOT, digest, ok, one_clear_error, read_events, run_engine, run_engine_process
from _train_harness import cached_dataset, train_argv
from engine.train import checkpoints as ckpt

pytestmark = pytest.mark.fault("training")


@pytest.fixture(scope="module")
def data(demo_manifest, tmp_path_factory) -> Path:
    return cached_dataset(demo_manifest, tmp_path_factory.mktemp("fault_runs") / "data")


def lora_run(demo_manifest, data, out: Path, *extra) -> tuple[int, list[dict]]:
    argv = train_argv(demo_manifest, data, out, "--max_train_steps", "2", *extra)
    return run_engine(argv, out / "events.jsonl")


def all_finite(folder: Path) -> bool:
    """Every visible safetensors file under `folder` loads and holds finite numbers only."""
    for path in folder.rglob("*.safetensors"):
        if not path.name.startswith("."):
            if not all(bool(torch.isfinite(t).all()) for t in load_file(path).values() if t.is_floating_point()):
                return False
    return True


def test_same_output_name_is_refused_and_the_first_run_kept(demo_manifest, data, tmp_path):
    out = tmp_path / "run"
    ok(*lora_run(demo_manifest, data, out))
    kept = {p.name: digest(p) for p in out.iterdir() if p.name != "events.jsonl"}
    assert "lora.safetensors" in kept and "lora_config.toml" in kept
    rc, events = lora_run(demo_manifest, data, out, "--learning_rate", "5e-3")
    err = one_clear_error(rc, events, "lora", str(out), kind="option")
    assert "--overwrite" in err["hint"] and "lora_2" in err["hint"] and "--resume" in err["hint"]
    assert {p.name: digest(p) for p in out.iterdir() if p.name != "events.jsonl"} == kept      # nothing replaced
    ok(*lora_run(demo_manifest, data, out, "--learning_rate", "5e-3", "--overwrite"))         # on purpose: replaced
    assert digest(out / "lora.safetensors") != kept["lora.safetensors"]


def test_an_intermediate_save_alone_makes_the_name_taken(demo_manifest, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lora-step00000005.safetensors").write_bytes(b"earlier work")
    rc, events = lora_run(demo_manifest, data, out)
    one_clear_error(rc, events, "lora-step00000005.safetensors", kind="option")
    assert (out / "lora-step00000005.safetensors").read_bytes() == b"earlier work"


def _poisoned(data: Path, tmp_path: Path, which: int = 2) -> Path:
    """A copy of the cached dataset whose `which`-th latent cache holds NaN (a cache written from a broken VAE)."""
    cache = tmp_path / "cache"
    shutil.copytree(data.parent / "cache", cache)
    text = data.read_text().replace(json.dumps(str(data.parent / "cache")), json.dumps(str(cache)))
    toml = tmp_path / "dataset.toml"
    toml.write_text(text)
    victim = sorted(cache.glob("*_qi.safetensors"))[which]
    with safetensors.safe_open(str(victim), "pt") as f:
        meta = f.metadata()
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(victim).items()}, str(victim), meta)
    return toml


def test_nan_loss_stops_the_run_before_anything_nan_is_saved(demo_manifest, data, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(demo_manifest, _poisoned(data, tmp_path), out, "--max_train_steps", "8",
                      "--save_every_n_steps", "1")
    rc, events = run_engine(argv, out / "events.jsonl")
    err = one_clear_error(rc, events, "NaN", kind="numeric")
    assert "--skip_nan_steps" in err["hint"]
    assert not (out / "lora.safetensors").exists()                     # the final file of a broken run: never
    assert all_finite(out)                                             # earlier step saves: whole and finite


def test_skip_nan_steps_counts_and_reports(demo_manifest, data, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(demo_manifest, _poisoned(data, tmp_path), out, "--max_train_steps", "8", "--skip_nan_steps")
    events = ok(*run_engine(argv, out / "events.jsonl"))
    metrics = [e for e in events if e["type"] == "metric"]
    skipped = [m for m in metrics if m["loss"] is None]
    assert len(metrics) == 8 and len(skipped) == 1 and metrics[-1]["skipped_nan_steps"] == 1
    assert any("1 of 8 steps were skipped" in e["message"] for e in events if e["type"] == "log")
    assert all_finite(out) and (out / "lora.safetensors").is_file()


def test_leftovers_of_an_interrupted_state_save_are_cleaned(demo_manifest, data, tmp_path):
    out = tmp_path / "run"
    for name in (".lora-state.old", ".lora-state.tmp", ".lora-step00000001-state.tmp"):
        (out / name).mkdir(parents=True)
        (out / name / "model.safetensors").write_bytes(b"half written")
    events = ok(*lora_run(demo_manifest, data, out, "--save_state", "--save_every_n_steps", "1"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "lora-state" / "train_state.json").is_file()
    assert any("interrupted" in e["message"] for e in events if e["type"] == "log")


def test_state_save_over_a_leftover_old_folder(demo_manifest, data, tmp_path, monkeypatch):
    """An `.old` folder appearing between the start and the end of a run (another interrupted process) must not
    crash the end of this one."""
    out = tmp_path / "run"
    original = ckpt.save_state

    def with_leftover(accelerator, path, progress, *extra):
        (Path(path).with_name(f".{Path(path).name}.old") / "junk").mkdir(parents=True, exist_ok=True)
        Path(path).mkdir(exist_ok=True)
        return original(accelerator, path, progress, *extra)

    monkeypatch.setattr(ckpt, "save_state", with_leftover)
    ok(*lora_run(demo_manifest, data, out, "--save_state"))
    assert (out / "lora-state" / "train_state.json").is_file() and not (out / ".lora-state.old").exists()


RUST_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"   # its real wording


def test_disk_full_while_saving_the_lora(demo_manifest, data, tmp_path, monkeypatch):
    """safetensors' writer reports a full disk as its own error type with the OS error in the text."""
    def full(*a, **k):
        raise safetensors.SafetensorError(RUST_ENOSPC)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    rc, events = lora_run(demo_manifest, data, out)
    err = one_clear_error(rc, events, str(out / "lora.safetensors"), kind="disk")
    assert "ENOSPC" in err["message"] and "Free disk space" in err["hint"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]          # no temp file left behind


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_disk_error_writing_the_run_config(code, demo_manifest, data, tmp_path, monkeypatch):
    real = os.replace

    def refuse(src, dst, *a, **k):
        if str(dst).endswith("_config.toml"):
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", refuse)
    out = tmp_path / "run"
    rc, events = lora_run(demo_manifest, data, out)
    one_clear_error(rc, events, "lora_config.toml", errno.errorcode[code], kind="disk")
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_file_size_limit_in_a_real_process(demo_manifest, data, tmp_path):
    """A real OS refusal (EFBIG under ulimit -f) while the LoRA is written: one disk error naming the file, and
    no partial LoRA visible."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    out = tmp_path / "run"
    argv = train_argv(demo_manifest, data, out, "--max_train_steps", "1")
    rc, events = run_engine_process(argv, out / "events.jsonl", preexec_fn=limit)
    one_clear_error(rc, events, str(out / "lora.safetensors"), "EFBIG", kind="disk")
    assert not (out / "lora.safetensors").exists() and not [p for p in out.iterdir() if ".tmp" in p.name]


def test_stop_works_when_the_app_ignores_sigint(demo_manifest, data, tmp_path):
    """A GUI started from a script with SIGINT ignored passes SIG_IGN to its jobs; the engine restores the default
    handler, so Stop (SIGINT) still saves the last finished step and ends the run."""
    out = tmp_path / "run"
    argv = train_argv(demo_manifest, data, out, "--max_train_steps", "5000", "--save_state")
    events_file = out / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "engine", *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 240
        while not any(e["type"] == "progress" for e in read_events(events_file)):
            assert proc.poll() is None and time.monotonic() < deadline, "HANG: the run never started"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("HANG: SIGINT did not stop the run") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    events = read_events(events_file)
    assert rc == 130 and events[-1]["kind"] == "interrupted"
    saved = [e["path"] for e in events if e["type"] == "checkpoint" and e.get("kind") == "model"]
    assert saved and Path(saved[-1]).is_file() and load_file(saved[-1])


@pytest.mark.parametrize("bad", ["../escape", "sub/name", ".hidden"])
def test_output_name_that_is_a_path(bad, demo_manifest, data, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(demo_manifest, data, out, "--max_train_steps", "1")
    argv[argv.index("--output_name") + 1] = bad
    rc, events = run_engine(argv, out / "events.jsonl")
    one_clear_error(rc, events, bad, kind="option")


def test_resume_from_a_folder_that_is_not_a_state(demo_manifest, data, tmp_path):
    junk = tmp_path / "not-a-state"
    junk.mkdir()
    rc, events = lora_run(demo_manifest, data, tmp_path / "run", "--resume", junk)
    one_clear_error(rc, events, str(junk), kind="option")
