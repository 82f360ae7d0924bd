"""Crash safety and resume of a real `python -m engine train_network` process: kill -9 while it is
writing a checkpoint, then `--resume` from the newest state it left.

- Nothing a user would load is corrupt: every visible `*.safetensors` is complete (parses, all LoRA keys), every
  visible `*-state` folder is complete (`train_state.json`, written last); half-written saves exist only as hidden
  temp entries, and the resumed run clears them (a killed model write's temp, named after the dead pid, at start;
  a killed state's temp folder when it saves that state again).
- The resumed loss curve is the uninterrupted run's, exactly, and so are the saved LoRA files (step and final).
  Exact equality is the right bar here: same process count and thread count (OMP_NUM_THREADS=1), float32 on CPU
  with deterministic kernels, noise/timesteps seeded by the batch's place in the run, the epoch order by
  (seed + epoch), and model/optimizer/scheduler state restored from the state folder tensor for tensor.

The run has 8 batches per epoch and 12 steps, saving every 3 steps, so the resume crosses an epoch boundary.
(tests/test_train_options.py covers the in-process resume; this one is the crash.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from _train_harness import ENV, PYTHON, ROOT, cached_dataset, metrics, read_events, run_engine, train_argv

pytestmark = pytest.mark.slow
STEPS, EVERY = 12, 3
RUN = ("--max_train_steps", str(STEPS), "--save_every_n_steps", str(EVERY), "--save_state")


@pytest.fixture(scope="module")
def dataset(demo_manifest, tmp_path_factory):
    return cached_dataset(demo_manifest, tmp_path_factory.mktemp("resume_data"), batch_size=1)


def kill_during_a_save(argv: list[str], out: Path, after_step: int, timeout: float = 240) -> tuple[str, int]:
    """Start the command; SIGKILL it as soon as a state save after `after_step` has begun (its hidden temp folder
    appears). Returns where the kill landed (for failure messages) and the dead pid."""
    proc = subprocess.Popen([PYTHON, "-m", "engine", *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            saving = sorted(p.name for p in out.glob(".lora-step*-state.tmp"))
            if saving and int(saving[-1][len(".lora-step"):][:8]) > after_step:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return f"killed while writing {saving[-1]}", proc.pid
            time.sleep(0.001)
        raise AssertionError(f"no state save after step {after_step} seen (rc {proc.poll()}):\n"
                             f"{proc.stderr.read()[-3000:] if proc.poll() is not None else 'still running'}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def check_nothing_corrupt(out: Path) -> list[Path]:
    """Every visible model file loads whole; every visible state is complete. Returns the states by step."""
    from safetensors.torch import load_file

    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        assert len(tensors) == 3 * 28, f"{path.name}: {len(tensors)} tensors"  # down, up, alpha × 14 × 2 blocks
    states = sorted(out.glob("lora-step*-state"))
    for state in states:
        assert (state / "train_state.json").is_file(), f"{state.name} is visible but incomplete"
    assert not [p for p in out.iterdir() if not p.name.startswith(".") and "tmp" in p.name]
    return states


def test_kill_9_during_a_save_then_resume_gives_the_same_curve(demo_manifest, dataset, tmp_path):
    from safetensors.torch import load_file

    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    run_engine(train_argv(demo_manifest, dataset, ref_out, *RUN))
    ref = metrics(read_events(ref_out / "events.jsonl"))
    assert sorted(ref) == list(range(1, STEPS + 1))

    where, pid = kill_during_a_save(train_argv(demo_manifest, dataset, out, *RUN), out, after_step=EVERY)
    # What a kill during a model file's write leaves (the state save above comes after the model file): its temp.
    (out / f".lora-step00000009.safetensors.tmp-{pid}").write_bytes(b"\0" * 1000)
    states = check_nothing_corrupt(out)
    assert states, f"{where}: no complete state to resume from"
    state = states[-1]
    resumed_from = int(state.name[len("lora-step"):][:8])
    assert EVERY <= resumed_from < STEPS, where
    assert not (out / "lora.safetensors").exists()                  # it never reached the end

    resume_events = out / "events-resume.jsonl"
    argv = train_argv(demo_manifest, dataset, out, *RUN, "--resume", str(state))
    argv[argv.index("--events_file") + 1] = str(resume_events)
    run_engine(argv)
    resumed = metrics(read_events(resume_events))
    assert sorted(resumed) == list(range(resumed_from + 1, STEPS + 1)), where
    assert [resumed[s]["loss"] for s in resumed] == [ref[s]["loss"] for s in resumed], where

    # The files a user loads: the final LoRA and every step save after the resume point, bit for bit.
    for name in ["lora.safetensors"] + [f"lora-step{s:08d}.safetensors" for s in range(EVERY, STEPS, EVERY)
                                        if s > resumed_from]:
        a, b = load_file(ref_out / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs ({where})"
    check_nothing_corrupt(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "the killed save's temp files remain"
