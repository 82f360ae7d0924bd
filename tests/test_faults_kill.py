"""Fault suite: kill -9 at the save points of a training run and of a cache run. A real engine process is killed
(SIGKILL, no handler runs) at its N-th os.fsync / os.replace: after each write of a temp file, before and after each
rename into place. Afterwards every visible file must be whole (each safetensors file loads, each state folder is
complete, the run TOML parses) and the next run must clean up what the killed one left and succeed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from safetensors.torch import load_file

from _fault_util import ENV, ROOT, ok, run_engine
from _train_harness import cached_dataset, train_argv

pytestmark = pytest.mark.fault("kill9")

# Runs the engine with os.<fn> replaced by a version that SIGKILLs this process on its N-th call.
KILLER = r'''
import os, signal, sys
fn, n = sys.argv[1], int(sys.argv[2])
real, calls = getattr(os, fn), [0]
def hooked(*a, **k):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
setattr(os, fn, hooked)
from engine.__main__ import main
sys.exit(main(sys.argv[3:]))
'''


def killed_at(fn: str, n: int, argv: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-c", KILLER, fn, str(n), *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, timeout=240)
    return proc.returncode


def corrupt_files(folder: Path) -> list[str]:
    """Visible files a person (or --resume) would use that are not whole."""
    bad = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue                                  # hidden temp files and folders: never used, cleaned later
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            elif path.name.endswith("_config.toml"):
                tomllib.loads(path.read_text(encoding="utf-8"))
            elif path.is_dir() and path.name.endswith("-state") and not (path / "train_state.json").is_file():
                bad.append(f"{path.name}: no train_state.json")
        except Exception as e:  # noqa: BLE001  (any failure to read is corruption)
            bad.append(f"{path.name}: {type(e).__name__}: {e}")
    return bad


@pytest.fixture(scope="module")
def data(demo_manifest, tmp_path_factory) -> Path:
    return cached_dataset(demo_manifest, tmp_path_factory.mktemp("fault_kill") / "data")


# the run TOML's temp written; the step-1 LoRA's temp written; its rename; inside the state save; a later rename
TRAIN_POINTS = [("fsync", 1), ("fsync", 2), ("replace", 2), ("fsync", 6), ("replace", 5)]


@pytest.mark.parametrize("fn,n", TRAIN_POINTS, ids=[f"{f}{n}" for f, n in TRAIN_POINTS])
def test_kill_during_training_saves(fn, n, demo_manifest, data, tmp_path, record_property):
    out = tmp_path / "run"
    argv = train_argv(demo_manifest, data, out, "--max_train_steps", "3", "--save_every_n_steps", "1",
                      "--save_state")
    rc = killed_at(fn, n, argv)
    assert rc == -9, f"the run ended (exit {rc}) before os.{fn} call {n}: the kill point was not reached"
    record_property("kill_points", 1)
    bad = corrupt_files(out)
    record_property("corrupt_files", len(bad))
    assert not bad, f"CORRUPT: {bad}"
    again = train_argv(demo_manifest, data, out, "--max_train_steps", "2", "--save_state", "--overwrite")
    ok(*run_engine(again, out / "again.jsonl"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "leftovers of the killed run remain"
    assert not corrupt_files(out)


CACHE_POINTS = [("replace", 3)]


@pytest.mark.parametrize("fn,n", CACHE_POINTS, ids=[f"{f}{n}" for f, n in CACHE_POINTS])
def test_kill_during_caching(fn, n, demo_manifest, data, tmp_path, record_property):
    cache = tmp_path / "cache"
    toml = tmp_path / "dataset.toml"
    toml.write_text(data.read_text().replace(str(data.parent / "cache"), str(cache)))
    argv = ["cache_latents", "--vae", demo_manifest["vae"], "--dataset_config", toml, "--device", "cpu",
            "--num_workers", "0"]
    rc = killed_at(fn, n, argv)
    assert rc == -9, f"the cache run ended (exit {rc}) before os.{fn} call {n}"
    record_property("kill_points", 1)
    bad = corrupt_files(cache)
    record_property("corrupt_files", len(bad))
    assert not bad, f"CORRUPT: {bad}"
    ok(*run_engine([*argv, "--skip_existing", "--events_file", tmp_path / "x.jsonl"][:-2], tmp_path / "again.jsonl"))
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]
    assert len(list(cache.glob("*_qi.safetensors"))) == 8 and not corrupt_files(cache)
    shutil.rmtree(cache)
