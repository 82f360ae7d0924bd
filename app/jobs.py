"""The job manager: engine commands run as separate processes whose lifetime the GUI owns, not Gradio events.

Decisions:
- A job is an argument list, `[sys.executable, "-m", "engine", <command>, *args]`, never a shell string, so the
  command shown in the Jobs tab is exactly what ran and a user can copy it.
- Each job starts in its own session (process group). A browser refresh, a cancelled Gradio event or closing
  the GUI does not stop it: jobs keep running when the GUI exits, and the next start re-attaches to them.
- The child's stdout+stderr go straight into `jobs/<id>/log.txt`, not into a pipe: a pipe would break (EPIPE)
  the moment the GUI exits and take the job down with it, while the file keeps the whole log whatever happens
  to the GUI. One watcher thread per running job follows that file, keeps a bounded tail in memory and parses
  the JSON event lines (engine.spec.events) into the job's state. A fresh job and a re-attached one go through the
  same code, because both are just "follow this log file while this pid lives".
- The job list is persisted in `jobs/jobs.json` (atomic writes; app/job_store.py rebuilds it from the job folders
  when it is lost or damaged, and a failed write never stops a watcher or the queue). On start-up a job marked running whose pid is
  still alive *and* is the same process (psutil create_time and command line) is followed again; one whose
  process has gone is settled from its log: a `done` event without an error means it finished while the GUI
  was closed, anything else marks it failed, keeping its last log lines.
- Stop is graceful first (SIGINT to the process group: the engine raises KeyboardInterrupt, may save, and emits
  an error event "interrupted"), then the whole process tree is killed if it has not ended after a timeout
  (120 s by default: a full-finetune save can take that long; "Force kill" does not wait).
- One exclusive (GPU) job at a time; later ones queue and start when it ends. Cheap commands run beside it.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from app.job_store import load_records, save_index, save_job_file
from engine.spec.diskio import disk_error
from engine.spec.events import human, parse_line
from engine.spec.naming import EVENTS_ENV, EVENTS_ENV_JSON

log = logging.getLogger(__name__)
FINAL = ("done", "failed", "stopped")
CHEAP_COMMANDS = frozenset({"inspect_model", "make_demo", "check_dataset", "estimate_vram"})
TAIL_LINES = 500          # lines kept in memory per job (the file keeps everything)
LAST_LINES = 20           # lines kept with a failed job in jobs.json
MAX_METRICS = 4000        # chart points kept per job; older ones are thinned 2:1 beyond this
POLL_S = 0.2
READ_CHUNK = 4 << 20      # bytes per watcher pass, so a long log re-read after a restart never holds the lock long
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def engine_argv(command: str, args: list[str]) -> list[str]:
    """The argument list of an engine command. QIS_ENGINE_MODULE swaps the module (tests use a scripted fake)."""
    return [sys.executable, "-m", os.environ.get("QIS_ENGINE_MODULE", "engine"), command, *map(str, args)]


def command_line(argv: list[str]) -> str:
    return subprocess.list2cmdline(argv) if os.name == "nt" else shlex.join(argv)


@dataclass
class JobState:
    """What the event stream has told us so far. Rebuilt from the log file, so it is never persisted."""
    phase: str | None = None
    progress: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    vram: dict | None = None
    estimate: dict | None = None
    images: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    error: dict | None = None
    done: dict | None = None

    def apply(self, ev: dict) -> None:
        t = ev["type"]
        if t == "phase":
            self.phase = ev.get("name")
        elif t == "progress":
            self.progress = {k: ev.get(k) for k in ("step", "total", "unit", "eta_s")}
        elif t == "metric":
            self.metrics.append({k: v for k, v in ev.items() if k not in ("type", "time")})
            if len(self.metrics) > MAX_METRICS:
                self.metrics = self.metrics[::2]
        elif t == "vram":
            self.vram = {k: v for k, v in ev.items() if k != "type"}
        elif t == "estimate":
            self.estimate = {k: v for k, v in ev.items() if k not in ("type", "time")}
        elif t in ("image", "sample"):
            (self.images if t == "image" else self.samples).append(ev.get("path"))
        elif t == "checkpoint":
            self.checkpoints.append({"path": ev.get("path"), "step": ev.get("step")})
        elif t == "error":
            self.error = {k: ev.get(k) for k in ("kind", "message", "hint")}
        elif t == "done":
            self.done = {"outputs": ev.get("outputs", []), "seconds": ev.get("seconds")}


@dataclass
class Job:
    """One row of jobs.json plus the in-memory view of its log."""
    id: str
    command: str
    argv: list[str]
    title: str = ""
    exclusive: bool = True
    status: str = "queued"
    pid: int | None = None
    create_time: float | None = None      # psutil's, to tell our process from a recycled pid
    queued_at: float = 0.0
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    stop_requested: bool = False
    error: dict | None = None
    last_lines: list[str] = field(default_factory=list)
    final_progress: dict | None = None    # progress when it ended, for the list without reading its log
    replayed: bool = field(default=True, repr=False)   # False: state/tail not read from the log yet
    state: JobState = field(default_factory=JobState, repr=False)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES), repr=False)

    RECORD = ("id", "command", "argv", "title", "exclusive", "status", "pid", "create_time", "queued_at",
              "started", "ended", "exit_code", "stop_requested", "error", "last_lines", "final_progress")

    def record(self) -> dict:
        return {k: getattr(self, k) for k in self.RECORD}

    @property
    def cmdline(self) -> str:
        return command_line(self.argv)

    def feed(self, line: str) -> None:
        ev = parse_line(line)
        if ev is None:
            self.tail.append(line)
            return
        self.state.apply(ev)
        self.tail.append(human(ev))

    def view(self) -> dict:
        """A plain snapshot for the UI (safe to hand to another thread)."""
        out = self.record()
        out.update(asdict(self.state), cmdline=self.cmdline, tail=list(self.tail))
        out["error"] = self.error or self.state.error
        return out


class LogFollower:
    """Reads complete lines appended to a file since the last call. `\\r` progress redraws collapse to the
    last one; ANSI colour codes are dropped; bytes decode as UTF-8 with replacement."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self, final: bool = False) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(-1 if final else READ_CHUNK)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        chunks = (self.partial + data).split(b"\n")
        self.partial = chunks.pop()
        if final and self.partial:
            chunks.append(self.partial)
            self.partial = b""
        return [clean_line(c.decode("utf-8", errors="replace")) for c in chunks]


def clean_line(text: str) -> str:
    text = _ANSI.sub("", text.rstrip("\r"))
    return text.rsplit("\r", 1)[-1]


class JobDirBusy(RuntimeError):
    """Another Studio process manages this jobs folder: two managers would start and settle the same jobs."""


def _claim(root: Path):
    """An exclusive lock on root/.lock, held while this manager lives (POSIX flock; released if we die).
    Jobs do not inherit it (Popen closes other fds), so a job outliving the GUI does not keep the folder."""
    try:
        import fcntl
    except ImportError:        # Windows: no flock; one Studio per data dir is then up to the user
        return None
    fh = open(root / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise JobDirBusy(f"another Qwen-Image Studio is already running with the jobs folder {root}. "
                         "Use that one (its address is in its terminal), or start this one with another "
                         "--data_dir.") from None
    return fh


class JobManager:
    def __init__(self, root: str | os.PathLike, stop_timeout_s: float = 120.0, cwd: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stop_timeout_s = stop_timeout_s
        self.cwd = cwd or str(Path(__file__).resolve().parent.parent)   # the repo root: `-m engine` resolves
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._jobs: dict[str, Job] = {}
        self._procs: dict[str, Any] = {}     # id -> Popen (our child) or psutil.Process (re-attached)
        self._threads: dict[str, threading.Thread] = {}
        self.store_error: str | None = None     # the last failed index write, for the UI
        self.load_notes: list[str] = []         # what start-up had to rebuild
        self._owner = _claim(self.root)
        self._load()
        self._schedule()

    # ---- public API --------------------------------------------------------------------------------
    def submit(self, command: str, args: list[str] = (), title: str = "", exclusive: bool | None = None) -> Job:
        """Queue an engine command; it starts now unless an exclusive job is running."""
        return self.submit_argv(engine_argv(command, list(args)), command, title, exclusive)

    def submit_argv(self, argv: list[str], command: str, title: str = "", exclusive: bool | None = None) -> Job:
        if exclusive is None:
            exclusive = command not in CHEAP_COMMANDS
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", command).strip("._")[:40] or "job"   # the id names a folder
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{secrets.token_hex(2)}"
        job = Job(id=job_id, command=command, argv=[str(a) for a in argv], title=title or command,
                  exclusive=exclusive, queued_at=time.time())
        with self._lock:
            self._jobs[job.id] = job
            try:
                self._save(strict=True)
            except OSError:               # reported to the caller as failed: it must never run later
                del self._jobs[job.id]
                raise
            self._schedule()
        return job

    def list(self) -> list[dict]:
        """Newest first; the records with phase and progress (get() has the tail, metrics and outputs too)."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.queued_at, reverse=True)
            return [{**j.record(), "phase": j.state.phase, "progress": j.state.progress or j.final_progress,
                     "cmdline": j.cmdline} for j in jobs]

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if not job.replayed:
                self._replay(job)
            return _view(job)

    def log_path(self, job_id: str) -> Path:
        return self.root / job_id / "log.txt"

    def wait(self, job_id: str, timeout: float | None = None) -> dict:
        """Block until the job reaches a final status (or the timeout); returns its view."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._jobs[job_id].status not in FINAL:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._changed.wait(left if left is not None else 1.0)
            return _view(self._jobs[job_id])

    def stop(self, job_id: str, timeout_s: float | None = None) -> dict:
        """Ask the job to stop (SIGINT to its group); kill its process tree if it is still alive after the timeout."""
        with self._lock:
            job = self._jobs[job_id]
            if job.status == "queued":
                self._settle(job, "stopped", None)
                return _view(job)
            if job.status != "running":
                return _view(job)
            job.stop_requested = True
            self._save()
            self._signal_group(job, signal.SIGINT)
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        killer = threading.Timer(timeout_s, self._kill_if_running, args=(job_id, timeout_s))
        killer.daemon = True
        killer.start()
        return self.get(job_id)

    def kill(self, job_id: str) -> dict:
        """Force: SIGKILL the whole process tree now."""
        with self._lock:
            job = self._jobs[job_id]
            if job.status == "queued":
                self._settle(job, "stopped", None)
            elif job.status == "running":
                job.stop_requested = True
                self._save()
                self._kill_tree(job)
            return _view(job)

    def close(self) -> None:
        """Stop following jobs (the GUI is exiting). The jobs themselves keep running."""
        self._closing.set()
        for t in list(self._threads.values()):
            t.join(timeout=5)
        if self._owner is not None:
            self._owner.close()    # releases the claim on the folder
            self._owner = None

    # ---- starting and following --------------------------------------------------------------------
    def _schedule(self) -> None:
        with self._lock:
            busy = any(j.status == "running" and j.exclusive for j in self._jobs.values())
            for job in sorted(self._jobs.values(), key=lambda j: j.queued_at):
                if job.status != "queued" or (job.exclusive and busy):
                    continue
                self._start(job)
                busy = busy or (job.exclusive and job.status == "running")

    def _start(self, job: Job) -> None:
        log = self.log_path(job.id)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", EVENTS_ENV: EVENTS_ENV_JSON, "PYTHONIOENCODING": "utf-8"}
        action = "create the job log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as fh:
                fh.write(f"$ {job.cmdline}\n".encode())
                fh.flush()
                action = "start the program"
                proc = subprocess.Popen(job.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.cwd, env=env, **_new_group_kwargs())
        except OSError as e:     # no log folder (disk full, unwritable data dir) or no interpreter: this job fails,
            job.started = time.time()                               # the queue goes on
            error = disk_error(e, e.filename or (log if action != "start the program" else job.argv[0]), action)
            self._settle(job, "failed", None, {"kind": "start", "message": error.message, "hint": error.hint})
            return
        job.pid, job.status, job.started = proc.pid, "running", time.time()
        job.create_time = _create_time(proc.pid)
        self._procs[job.id] = proc
        self._save()
        save_job_file(self.root, job.record())
        self._follow(job)

    def _follow(self, job: Job) -> None:
        t = threading.Thread(target=self._watch, args=(job,), name=f"job-{job.id}", daemon=True)
        self._threads[job.id] = t
        t.start()

    def _watch(self, job: Job) -> None:
        """Follow the job until its process ends. Any failure of one pass (the log unreadable, a disk error while
        saving) is noted in the job's tail and the next pass tries again: a dead watcher would leave the job
        "running" forever and stall the queue behind it."""
        reader = LogFollower(self.log_path(job.id))
        while not self._closing.is_set():
            try:
                if self._watch_once(job, reader):
                    return
            except Exception as e:  # noqa: BLE001  (the thread must outlive any one failure)
                with self._lock:
                    note = f"[studio] following this job failed once ({type(e).__name__}: {e}); retrying"
                    if not job.tail or job.tail[-1] != note:
                        job.tail.append(note)
            self._closing.wait(POLL_S)

    def _watch_once(self, job: Job, reader: LogFollower) -> bool:
        """One pass: new log lines, then the process; True once the job is settled."""
        while True:
            lines = reader.read()
            with self._lock:
                for line in lines:
                    job.feed(line)
            if len(lines) <= 1000:  # catching up on a long log: read on before polling
                break
        ended, code = self._poll(job)
        if not ended:
            return False
        lines = reader.read(final=True)
        with self._lock:
            for line in lines:
                job.feed(line)
            self._finish(job, code)
        return True

    def _poll(self, job: Job) -> tuple[bool, int | None]:
        proc = self._procs.get(job.id)
        if isinstance(proc, subprocess.Popen):
            code = proc.poll()
            return code is not None, code
        try:  # re-attached: psutil reaps and reports the code if it is our child, else None
            return True, proc.wait(timeout=0)
        except psutil.TimeoutExpired:
            pass
        try:
            return proc.status() == psutil.STATUS_ZOMBIE, None
        except psutil.NoSuchProcess:
            return True, None

    def _finish(self, job: Job, code: int | None) -> None:
        self._procs.pop(job.id, None)
        self._threads.pop(job.id, None)
        finished = code == 0 or (code is None and job.state.done is not None and not job.state.error)
        if finished:            # also after Stop: it finished before the signal arrived, and its outputs are whole
            status = "done"
        elif job.stop_requested:
            status = "stopped"
        else:
            status = "failed"
        self._settle(job, status, code)
        self._schedule()

    def _settle(self, job: Job, status: str, code: int | None, error: dict | None = None) -> None:
        job.status, job.exit_code, job.ended = status, code, time.time()
        job.error = error or job.state.error
        job.final_progress = job.state.progress
        if status in ("failed", "stopped"):
            job.last_lines = list(job.tail)[-LAST_LINES:]
        if status == "failed":
            if job.error is None:
                why = f"exited with code {code}" if code is not None else "its process ended without a result"
                job.error = {"kind": "exit", "message": f"{job.command} {why}.",
                             "hint": "The last log lines below show what happened."}
        self._save()
        if job.started is not None:
            save_job_file(self.root, job.record())
        self._changed.notify_all()

    # ---- signals -----------------------------------------------------------------------------------
    def _signal_group(self, job: Job, sig: int) -> None:
        try:
            if os.name == "nt":
                os.kill(job.pid, signal.CTRL_BREAK_EVENT)
            else:
                os.killpg(job.pid, sig)   # the job leads its own session, so its pgid is its pid
        except (ProcessLookupError, PermissionError):
            pass  # already gone; the watcher settles it

    def _kill_if_running(self, job_id: str, waited_s: float) -> None:
        with self._lock:
            job = self._jobs[job_id]
            if job.status == "running":
                job.tail.append(f"[studio] still running {waited_s:g} s after stop: killing its process tree")
                self._kill_tree(job)

    def _kill_tree(self, job: Job) -> None:
        if not self._alive(job):
            return
        try:
            root = psutil.Process(job.pid)
            procs = root.children(recursive=True) + [root]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if os.name != "nt":  # anything else left in the job's group, e.g. a grandchild that re-parented
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _alive(self, job: Job) -> bool:
        """True when job.pid is still the process we started (not a recycled pid, not a zombie)."""
        if job.pid is None:
            return False
        try:
            p = psutil.Process(job.pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                return False
            if job.create_time is not None and abs(p.create_time() - job.create_time) > 0.05:
                return False
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return cmd[-(len(job.argv) - 1):] == job.argv[1:] if len(job.argv) > 1 else True

    # ---- persistence -------------------------------------------------------------------------------
    def _save(self, strict: bool = False) -> bool:
        """Write the index. A failure raises only when `strict` (a submission must know); elsewhere it is logged,
        kept in `store_error` for the UI, and the next save tries again: the jobs themselves go on."""
        records = [j.record() for j in sorted(self._jobs.values(), key=lambda j: j.queued_at)]
        try:
            save_index(self.root, records)
        except OSError as e:
            self.store_error = str(e)
            if strict:
                raise
            log.warning("%s", e)
            return False
        self.store_error = None
        return True

    def _load(self) -> None:
        records, self.load_notes = load_records(self.root)
        for note in self.load_notes:
            log.warning("%s", note)
        for rec in records:
            try:
                job = Job(**{k: rec[k] for k in Job.RECORD if k in rec})
            except TypeError:
                continue              # a record without id/command/argv: nothing to show or run
            self._jobs[job.id] = job
            # a running job's watcher re-reads its log; a finished one is read on demand (get), not at start-up
            job.replayed = job.status in ("running", "queued")
        with self._lock:
            for job in self._jobs.values():
                if job.status == "running":
                    self._reattach(job)
            if self.load_notes:
                self._save()

    def _replay(self, job: Job) -> None:
        """Rebuild state and tail from the log file (the file is the source of truth)."""
        job.state, job.replayed = JobState(), True
        job.tail.clear()
        for line in LogFollower(self.log_path(job.id)).read(final=True):
            job.feed(line)

    def _reattach(self, job: Job) -> None:
        if self._alive(job):
            self._procs[job.id] = psutil.Process(job.pid)
            self._follow(job)   # reads the log from offset 0: state is rebuilt by the same code path
        else:
            self._replay(job)
            self._finish(job, None)


def _view(job: Job) -> dict:
    return job.view()


def _new_group_kwargs() -> dict:
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
