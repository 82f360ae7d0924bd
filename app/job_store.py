"""Where the job manager (app/jobs.py) keeps its records, and how it gets them back whatever happened to the disk.

- `jobs/jobs.json` is the index (atomic writes, engine/spec/diskio.py). Each job's folder also holds its own
  record, `jobs/<id>/job.json`, written when it starts and when it ends, and its whole log, `log.txt`.
- On start-up the index is read; if it is missing, unreadable or damaged (a disk that filled up, a crash, a
  hand edit) the list is rebuilt from the job folders, and a folder the index does not know (its index write
  failed) is added too. A rebuilt job that is not verifiably still running is settled from its log (a `done`
  event without an error: done; anything else: failed) and is never started again.
- A failed write never takes the manager down: `save_index` raises a DiskError naming the file for the caller
  that must know (a submission is refused and forgotten); the background paths log it and retry on the next save.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

from engine.spec.diskio import atomic_write_text, disk_error
from engine.spec.events import parse_line

log = logging.getLogger(__name__)
INDEX = "jobs.json"
JOB_FILE = "job.json"
LOG = "log.txt"
HEAD_BYTES = 64 << 10      # enough of a log to find its command line
TAIL_BYTES = 256 << 10     # enough of a log's end to find its last events


def save_index(root: Path, records: list[dict]) -> None:
    """Write the index atomically; a DiskError (naming the file) when the disk refuses."""
    try:
        atomic_write_text(root / INDEX, json.dumps({"version": 1, "jobs": records}, indent=1))
    except OSError as e:
        raise disk_error(e, root / INDEX, "save the job list to") from e


def save_job_file(root: Path, record: dict) -> None:
    """Best effort: the per-job copy of a record, for rebuilding the list."""
    try:
        atomic_write_text(root / record["id"] / JOB_FILE, json.dumps(record, indent=1))
    except OSError as e:
        log.warning("could not write the record of job %s: %s", record["id"], e)


def load_records(root: Path) -> tuple[list[dict], list[str]]:
    """(records, notes): the index's records plus any job folder it lacks, rebuilt; notes say what was rebuilt."""
    notes: list[str] = []
    records = _read_index(root / INDEX, notes)
    known = {r.get("id") for r in records}
    for folder in sorted(p for p in _folders(root) if p.name not in known):
        rec = rebuild_record(folder)
        if rec is not None:
            records.append(rec)
            notes.append(f"job {folder.name} rebuilt from its folder")
    return records, notes


def _read_index(path: Path, notes: list[str]) -> list[dict]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        jobs = data["jobs"]
        if not isinstance(jobs, list) or not all(isinstance(r, dict) and isinstance(r.get("id"), str) for r in jobs):
            raise ValueError("'jobs' is not a list of job records")
        return jobs
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        notes.append(f"{path} could not be read ({type(e).__name__}: {e}); the job list was rebuilt from the "
                     "job folders")
        return []


def _folders(root: Path) -> list[Path]:
    try:
        return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []


def rebuild_record(folder: Path) -> dict | None:
    """A job's record from its folder: its own job.json when readable, else what its log says."""
    try:
        rec = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
        if isinstance(rec, dict) and rec.get("id") == folder.name and isinstance(rec.get("argv"), list):
            return rec
    except (OSError, ValueError, RecursionError):
        pass
    head, tail = _log_ends(folder / LOG)
    if head is None:
        return None
    first = head.split("\n", 1)[0]
    try:
        argv = shlex.split(first[2:]) if first.startswith("$ ") else []
    except ValueError:
        argv = []
    command = argv[3] if len(argv) > 3 and argv[1] == "-m" else folder.name.split("-", 2)[-1].rsplit("-", 1)[0]
    error, done = _last_outcome(tail)
    rec = {"id": folder.name, "command": command, "argv": argv, "title": command, "exclusive": True,
           "status": "done" if done and not error else "failed", "pid": None, "queued_at": _mtime(folder),
           "error": error}
    if rec["status"] == "failed" and error is None:
        rec["error"] = {"kind": "exit", "message": f"{command} has no record of how it ended (the job list was lost "
                        "while it ran).", "hint": "Its log below shows how far it got."}
    return rec


def _log_ends(path: Path) -> tuple[str | None, str]:
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
            size = fh.seek(0, 2)
            fh.seek(max(0, size - TAIL_BYTES))
            tail = fh.read()
    except OSError:
        return None, ""
    return head.decode("utf-8", "replace"), tail.decode("utf-8", "replace")


def _last_outcome(text: str) -> tuple[dict | None, bool]:
    error, done = None, False
    for line in text.splitlines():
        ev = parse_line(line)
        if ev and ev["type"] == "error":
            error = {k: ev.get(k) for k in ("kind", "message", "hint")}
        elif ev and ev["type"] == "done":
            done = True
    return error, done


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
