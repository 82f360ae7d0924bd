"""The job manager with real subprocesses: a scripted event emitter and the real engine CLI."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import psutil
import pytest

from app.jobs import JobManager, clean_line

SCRIPT = r'''
import json, signal, subprocess, sys, time
mode, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

def ev(type, **kw):
    print(json.dumps({"type": type, "time": time.time(), **kw}), flush=True)

ev("start", command="fake", argv=sys.argv[1:], config_path=None)
if mode == "stubborn":   # ignores SIGINT, and so does its own child: only a tree kill ends them
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c",
                              "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"])
    print(f"grandchild {child.pid}", flush=True)
try:
    ev("phase", name="training")
    for i in range(1, n + 1):
        ev("progress", step=i, total=n, unit="step", eta_s=float(n - i))
        ev("metric", step=i, loss=1.0 / i, lr=1e-4)
        print(f"plain line {i}", flush=True)
        sys.stdout.write(f"bar 0%\rbar 50%\rbar {i}/{n}\n")
        sys.stdout.flush()
        time.sleep(delay)
    ev("vram", allocated_gib=1.5, reserved_gib=2.0, peak_gib=2.5, ram_gib=3.0)
    ev("image", path="/tmp/out.png")
    ev("checkpoint", path="/tmp/lora.safetensors", step=n)
    if mode == "fail":
        ev("error", kind="dataset", message="no images in /data", hint="Add images.")
        sys.exit(2)
    ev("done", outputs=["/tmp/lora.safetensors"], seconds=0.1)
except KeyboardInterrupt:
    print("saving before exit", flush=True)
    ev("error", kind="interrupted", message="stopped by the user", hint="")
    sys.exit(130)
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "fake_engine.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture
def manager(tmp_path):
    jm = JobManager(tmp_path / "jobs", stop_timeout_s=10)
    yield jm
    for job in jm.list():
        if job["status"] == "running":
            jm.kill(job["id"])
    jm.close()


def fake(jm, script, mode, n=3, delay=0.0, exclusive=None):
    argv = [sys.executable, str(script), mode, str(n), str(delay)]
    return jm.submit_argv(argv, "fake_" + mode, exclusive=exclusive).id


def wait_for(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def running_with_progress(jm, job_id):
    return wait_for(lambda: (v := jm.get(job_id))["status"] == "running" and v["progress"] and v)


def test_events_parsed_and_full_log_on_disk(manager, script):
    job_id = fake(manager, script, "ok", n=3)
    view = manager.wait(job_id, timeout=30)
    assert view["status"] == "done" and view["exit_code"] == 0
    assert view["phase"] == "training"
    assert view["progress"] == {"step": 3, "total": 3, "unit": "step", "eta_s": 0.0}
    assert [m["step"] for m in view["metrics"]] == [1, 2, 3] and view["metrics"][2]["loss"] == pytest.approx(1 / 3)
    assert view["vram"]["peak_gib"] == 2.5
    assert view["images"] == ["/tmp/out.png"]
    assert view["checkpoints"] == [{"path": "/tmp/lora.safetensors", "step": 3}]
    assert view["done"]["outputs"] == ["/tmp/lora.safetensors"] and view["error"] is None
    # the file keeps every raw line; the tail is human-readable with \r redraws collapsed
    raw = manager.log_path(job_id).read_bytes().decode()
    assert raw.startswith("$ ") and raw.count('"type": "progress"') == 3 and "bar 0%\rbar 50%\rbar 1/3" in raw
    assert "bar 2/3" in view["tail"] and not any("\r" in line for line in view["tail"])
    assert any("progress 3/3 step" in line for line in view["tail"])
    saved = json.loads((manager.root / "jobs.json").read_text())["jobs"]
    assert saved[0]["id"] == job_id and saved[0]["status"] == "done" and saved[0]["argv"][1] == str(script)


def test_clean_line_collapses_redraws_and_colours():
    assert clean_line("a 10%\ra 20%\r") == "a 20%"
    assert clean_line("\x1b[32mgreen\x1b[0m") == "green"


def test_error_event_and_exit_code_mark_failed(manager, script):
    view = manager.wait(fake(manager, script, "fail", n=1), timeout=30)
    assert view["status"] == "failed" and view["exit_code"] == 2
    assert view["error"] == {"kind": "dataset", "message": "no images in /data", "hint": "Add images."}
    assert any("no images" in line for line in view["last_lines"])


def test_real_engine_command_runs_as_argument_list(manager, tmp_path):
    missing = tmp_path / "no such model.safetensors"   # a space: proves there is no shell in between
    job = manager.submit("inspect_model", [str(missing), "--json"])
    assert job.argv[1:4] == ["-m", "engine", "inspect_model"] and job.argv[4] == str(missing)
    assert not job.exclusive    # inspect is cheap: it may run beside a GPU job
    view = manager.wait(job.id, timeout=60)
    raw = manager.log_path(job.id).read_text()
    assert '"type": "start"' in raw     # QIS_EVENTS=json reached the engine: events, not terminal text
    assert view["status"] == "done" and view["exit_code"] == 0 and view["done"] is not None
    assert json.dumps(str(missing)) in raw    # the engine got the path as one argument and reported on it


def test_exclusive_jobs_queue_and_cheap_jobs_run_beside(manager, script):
    first = fake(manager, script, "slow", n=1000, delay=0.05)
    second = fake(manager, script, "ok", n=2)
    cheap = fake(manager, script, "ok", n=2, exclusive=False)
    running_with_progress(manager, first)
    assert manager.get(second)["status"] == "queued"
    assert manager.wait(cheap, timeout=30)["status"] == "done"
    assert manager.get(second)["status"] == "queued"
    manager.stop(first)
    assert manager.wait(first, timeout=30)["status"] == "stopped"
    assert manager.wait(second, timeout=30)["status"] == "done"


def test_stop_is_graceful_first(manager, script):
    job_id = fake(manager, script, "slow", n=1000, delay=0.05)
    running_with_progress(manager, job_id)
    manager.stop(job_id, timeout_s=60)
    view = manager.wait(job_id, timeout=30)
    assert view["status"] == "stopped" and view["exit_code"] == 130      # it exited by itself, not killed
    assert view["error"]["kind"] == "interrupted"
    assert "saving before exit" in manager.log_path(job_id).read_text()


def test_stop_kills_the_process_tree_after_the_timeout(manager, script):
    job_id = fake(manager, script, "stubborn", n=1000, delay=0.05)
    running_with_progress(manager, job_id)
    grandchild = int(next(l.split()[1] for l in manager.get(job_id)["tail"] if l.startswith("grandchild")))
    manager.stop(job_id, timeout_s=1.0)
    view = manager.wait(job_id, timeout=30)
    assert view["status"] == "stopped" and view["exit_code"] == -signal.SIGKILL
    wait_for(lambda: not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == "zombie")
    assert any("killing its process tree" in line for line in view["tail"])


def test_killed_job_is_marked_failed_with_its_last_lines(manager, script):
    job_id = fake(manager, script, "slow", n=1000, delay=0.05)
    view = running_with_progress(manager, job_id)
    wait_for(lambda: any("plain line 2" in l for l in manager.get(job_id)["tail"]))
    os.kill(view["pid"], signal.SIGKILL)      # e.g. the kernel's OOM killer
    view = manager.wait(job_id, timeout=30)
    assert view["status"] == "failed" and view["exit_code"] == -signal.SIGKILL
    assert "code -9" in view["error"]["message"]
    assert any("plain line" in line for line in view["last_lines"])
    saved = json.loads((manager.root / "jobs.json").read_text())["jobs"][0]
    assert saved["status"] == "failed" and saved["last_lines"] == view["last_lines"]


def test_restart_reattaches_running_jobs_and_settles_ended_ones(tmp_path, script):
    first = JobManager(tmp_path / "jobs")
    alive = fake(first, script, "slow", n=1000, delay=0.05, exclusive=False)
    dying = fake(first, script, "slow", n=1000, delay=0.05, exclusive=False)
    finishing = fake(first, script, "ok", n=20, delay=0.05, exclusive=False)
    for job_id in (alive, dying, finishing):
        running_with_progress(first, job_id)
    pids = {j: first.get(j)["pid"] for j in (alive, dying, finishing)}
    first.close()                         # the GUI exits; its jobs keep running
    os.kill(pids[dying], signal.SIGKILL)  # one of them dies while nobody watches
    wait_for(lambda: psutil.Process(pids[finishing]).status() == "zombie")  # one ends normally meanwhile

    second = JobManager(tmp_path / "jobs")
    try:
        assert second.get(dying)["status"] == "failed"
        assert any("plain line" in line for line in second.get(dying)["last_lines"])
        assert second.get(finishing)["status"] == "done"     # its log ends with a done event
        view = second.get(alive)
        assert view["status"] == "running" and view["pid"] == pids[alive]
        step = wait_for(lambda: second.get(alive)["progress"])["step"]
        wait_for(lambda: second.get(alive)["progress"]["step"] > step)   # followed live, not only replayed
        second.stop(alive)
        assert second.wait(alive, timeout=30)["status"] == "stopped"
    finally:
        for job_id in (alive, dying):
            if second.get(job_id)["status"] == "running":
                second.kill(job_id)
        second.close()


def test_a_recycled_pid_is_not_taken_for_our_job(tmp_path, script):
    jm = JobManager(tmp_path / "jobs")
    job_id = fake(jm, script, "ok", n=1)
    jm.wait(job_id, timeout=30)
    jm.close()
    index = tmp_path / "jobs" / "jobs.json"
    data = json.loads(index.read_text())
    data["jobs"][0].update(status="running", pid=os.getpid(), create_time=None)   # our pid, another program
    index.write_text(json.dumps(data))
    again = JobManager(tmp_path / "jobs")
    assert again.get(job_id)["status"] == "done"   # settled from its log, never followed as "running"
    again.close()


def test_finished_jobs_are_read_back_from_their_logs_on_demand(tmp_path, script):
    first = JobManager(tmp_path / "jobs")
    job_id = fake(first, script, "ok", n=3)
    first.wait(job_id, timeout=30)
    first.close()
    second = JobManager(tmp_path / "jobs")
    try:
        listed = next(v for v in second.list() if v["id"] == job_id)
        assert listed["status"] == "done" and listed["progress"]["step"] == 3   # from jobs.json, no log read
        view = second.get(job_id)
        assert [m["step"] for m in view["metrics"]] == [1, 2, 3] and "bar 3/3" in view["tail"]
        assert second.get(job_id)["metrics"] == view["metrics"]             # read once, not appended twice
    finally:
        second.close()


def test_one_manager_per_jobs_folder(tmp_path):
    from app.jobs import JobDirBusy

    first = JobManager(tmp_path / "jobs")
    with pytest.raises(JobDirBusy, match="already running"):
        JobManager(tmp_path / "jobs")
    first.close()
    JobManager(tmp_path / "jobs").close()     # free again once the first lets go


def test_job_ids_are_safe_folder_names(manager):
    job = manager.submit("../../etc/x", [])          # typed into "Run an engine command"
    assert "/" not in job.id and manager.log_path(job.id).parent.parent == manager.root
    assert manager.wait(job.id, timeout=60)["status"] == "failed"     # the engine: unknown command
