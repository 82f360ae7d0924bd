"""Fault suite: the job manager survives disk errors and a lost job list. No dead watcher, no stalled queue, no
job left "running" for a dead process, a submission reported as failed never runs later, and a job that finished
normally after Stop is recorded as done."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import app.job_store as store
from app.jobs import JobManager, LogFollower
from engine.spec.diskio import DiskError

pytestmark = pytest.mark.fault("jobs")

SCRIPT = r'''
import json, signal, sys, time
def ev(type, **kw):
    print(json.dumps({"type": type, "time": time.time(), **kw}), flush=True)
mode = sys.argv[1]
if mode == "finish_despite_stop":          # busy in a part that cannot be interrupted, then ends normally
    signal.signal(signal.SIGINT, signal.SIG_IGN)
ev("start", command="fake", argv=sys.argv[1:], config_path=None)
ev("progress", step=1, total=2, unit="step")
time.sleep(float(sys.argv[2]))
if mode == "fail":
    ev("error", kind="dataset", message="no images", hint="Add images.")
    sys.exit(2)
ev("done", outputs=["/tmp/x"], seconds=0.1)
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture
def managers(tmp_path):
    made = []

    def make(root=None):
        jm = JobManager(root or tmp_path / "jobs", stop_timeout_s=30)
        made.append(jm)
        return jm
    yield make
    for jm in made:
        for job in jm.list():
            if job["status"] == "running":
                jm.kill(job["id"])
        jm.close()


def submit(jm, script, mode="ok", delay=0.0):
    return jm.submit_argv([sys.executable, str(script), mode, str(delay)], "fake_" + mode).id


def finished_jobs(managers, script, tmp_path):
    jm = managers()
    done, failed = submit(jm, script), submit(jm, script, "fail")
    assert jm.wait(done, 30)["status"] == "done" and jm.wait(failed, 30)["status"] == "failed"
    jm.close()
    return done, failed


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_types", "deleted"])
def test_job_list_rebuilt_from_the_job_folders(damage, managers, script, tmp_path):
    done, failed = finished_jobs(managers, script, tmp_path)
    index = tmp_path / "jobs" / "jobs.json"
    if damage == "garbage":
        index.write_bytes(b"\x00\xff not json")
    elif damage == "truncated":
        index.write_text(index.read_text()[:40])
    elif damage == "wrong_types":
        index.write_text(json.dumps({"version": 1, "jobs": [1, "two", None]}))
    else:
        index.unlink()
    jm = managers()
    views = {v["id"]: v for v in jm.list()}
    assert views[done]["status"] == "done" and views[failed]["status"] == "failed"
    assert jm.get(failed)["error"]["message"] == "no images"
    if damage != "deleted":
        assert jm.load_notes and "rebuilt" in jm.load_notes[0]
    assert json.loads(index.read_text())["jobs"]            # the rebuilt list was written back


def test_job_folder_with_a_damaged_record_is_rebuilt_from_its_log(managers, script, tmp_path):
    done, _ = finished_jobs(managers, script, tmp_path)
    (tmp_path / "jobs" / done / "job.json").write_text("{broken")
    (tmp_path / "jobs" / "jobs.json").unlink()
    view = managers().get(done)
    assert view["status"] == "done" and view["argv"][-2:] == ["ok", "0.0"]


def test_failed_submission_never_runs_later(managers, script, tmp_path, monkeypatch):
    jm = managers()
    real = store.atomic_write_text

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store, "atomic_write_text", disk_full)
    with pytest.raises(DiskError) as caught:
        submit(jm, script)
    assert "jobs.json" in str(caught.value) and "ENOSPC" in str(caught.value)
    assert jm.list() == []
    monkeypatch.setattr(store, "atomic_write_text", real)
    later = submit(jm, script)
    assert jm.wait(later, 30)["status"] == "done"
    assert [v["id"] for v in jm.list()] == [later]                      # the refused one never appeared


def test_a_job_that_cannot_start_fails_alone_and_the_queue_goes_on(managers, script, tmp_path, monkeypatch):
    jm = managers()
    real_mkdir = Path.mkdir
    blocked = {"n": 0}

    def mkdir(self, *a, **k):
        if self.parent == tmp_path / "jobs" and blocked["n"] == 0:
            blocked["n"] += 1
            raise OSError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    first = submit(jm, script)
    second = submit(jm, script)
    view = jm.wait(first, 30)
    assert view["status"] == "failed" and "permission denied" in view["error"]["message"] \
        and "EACCES" in view["error"]["message"]
    assert jm.wait(second, 30)["status"] == "done"


def test_watcher_survives_a_failing_log_read(managers, script, tmp_path, monkeypatch):
    jm = managers()
    real = LogFollower.read
    calls = {"n": 0}

    def flaky(self, final=False):
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise OSError(errno.EIO, "Input/output error", str(self.path))
        return real(self, final)

    monkeypatch.setattr(LogFollower, "read", flaky)
    job = submit(jm, script, delay=0.6)
    view = jm.wait(job, 30)
    assert view["status"] == "done", "HANG: the watcher died and the job stayed running"
    assert any("retrying" in line for line in view["tail"])


def test_disk_full_while_a_job_ends_does_not_lose_it(managers, script, tmp_path, monkeypatch):
    jm = managers()
    job = submit(jm, script, delay=0.5)
    real = store.atomic_write_text

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store, "atomic_write_text", disk_full)
    view = jm.wait(job, 30)
    assert view["status"] == "done" and jm.store_error and "ENOSPC" in jm.store_error
    monkeypatch.setattr(store, "atomic_write_text", real)
    nxt = submit(jm, script)                                        # the next save writes everything
    assert jm.wait(nxt, 30)["status"] == "done" and jm.store_error is None
    saved = {r["id"]: r["status"] for r in json.loads((tmp_path / "jobs" / "jobs.json").read_text())["jobs"]}
    assert saved[job] == "done"


def test_job_finished_normally_after_stop_is_done(managers, script):
    jm = managers()
    job = submit(jm, script, "finish_despite_stop", delay=2.0)
    jm.get(job)
    deadline = time.monotonic() + 30
    while not (jm.get(job)["progress"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    jm.stop(job, timeout_s=60)
    view = jm.wait(job, 30)
    assert view["status"] == "done" and view["exit_code"] == 0 and view["stop_requested"]


def test_running_job_of_a_dead_process_is_settled_at_start(managers, script, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    root = tmp_path / "jobs"
    (root / "20250101-000000-fake-0001").mkdir(parents=True)
    (root / "20250101-000000-fake-0001" / "log.txt").write_text("$ python fake.py\nhalf a line")
    rec = {"id": "20250101-000000-fake-0001", "command": "fake", "argv": [sys.executable, "fake.py"],
           "status": "running", "pid": pid, "create_time": 1.0, "queued_at": 1.0, "started": 1.0}
    (root / "jobs.json").write_text(json.dumps({"version": 1, "jobs": [rec]}))
    view = managers(root).get(rec["id"])
    assert view["status"] == "failed" and view["error"]["kind"] == "exit"
