"""Helpers of the fault suite (tests/test_faults_*.py, run and counted by scripts/fault_report.py).

Every scenario feeds one bad input or fault to the real engine (in-process `python -m engine ...` with an events
file, or a real subprocess where the process itself matters) and asserts what the person gets: exactly one
`error` event, of a user-facing kind (not "internal"), whose message names the file or option and which carries
a fix, and that nothing they own changed. The assertion messages start with a tag the report counts:
`INTERNAL:` (an unexpected failure reached the user), `UNCLEAR:` (an error without the path or the fix),
`HANG:` (no answer in time), `CORRUPT:` (a visible file that does not load after a kill -9).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from engine.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": str(ROOT), "QIS_EVENTS": "json"}


def run_engine(argv: list[str], events_file: Path) -> tuple[int, list[dict]]:
    """`python -m engine ...` in this process; (exit code, its events). Every line must be strict JSON."""
    events_file.parent.mkdir(parents=True, exist_ok=True)
    events_file.unlink(missing_ok=True)
    rc = main([*map(str, argv), "--events_file", str(events_file)])
    return rc, read_events(events_file)


def run_engine_captured(argv: list[str]) -> tuple[int, list[dict], str]:
    """For commands without --events_file (check_dataset, inspect_model): (exit code, the event lines of its
    stdout and stderr, its stdout)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*map(str, argv)])
    lines = (out.getvalue() + err.getvalue()).splitlines()
    return rc, [json.loads(x, parse_constant=_no_constants) for x in lines if x.startswith('{"type"')], out.getvalue()


def run_engine_process(argv: list[str], events_file: Path, timeout: float = 180, **popen) -> tuple[int, list[dict]]:
    """The same as a real subprocess (a hang is a test failure tagged HANG)."""
    events_file.parent.mkdir(parents=True, exist_ok=True)
    events_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "engine", *map(str, argv), "--events_file", str(events_file)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, timeout=timeout, **popen)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"HANG: {' '.join(cmd[:4])} gave no answer in {timeout} s") from None
    return proc.returncode, read_events(events_file)


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        out.append(json.loads(line, parse_constant=_no_constants))    # NaN / Infinity are not JSON
    return out


def _no_constants(name: str):
    raise AssertionError(f"UNCLEAR: an event line holds the bare constant {name}, which is not JSON")


def one_clear_error(rc: int, events: list[dict], *names: str, kind: str | None = None) -> dict:
    """The run was refused with exactly one clear error naming each of `names`; returns it."""
    errors = [e for e in events if e["type"] == "error"]
    internal = [e for e in errors if e["kind"] == "internal"]
    if internal or rc == 1:
        logs = [e["message"][-600:] for e in events if e["type"] == "log" and e["level"] == "error"]
        raise AssertionError(f"INTERNAL: {internal[0]['message'] if internal else f'exit {rc}'}  {logs[-1:]}")
    assert len(errors) == 1, f"UNCLEAR: {len(errors)} error events: {errors}"
    err = errors[0]
    assert rc == 2, f"UNCLEAR: exit code {rc} for a refusal"
    missing = [n for n in names if str(n) not in err["message"]]
    assert not missing, f"UNCLEAR: the error does not name {missing}: {err['message']}"
    assert err.get("hint"), f"UNCLEAR: no fix given: {err}"
    if kind is not None:
        assert err["kind"] == kind, f"UNCLEAR: kind {err['kind']}, expected {kind}: {err['message']}"
    return err


def ok(rc: int, events: list[dict]) -> list[dict]:
    errors = [e for e in events if e["type"] == "error"]
    if rc != 0:
        tag = "INTERNAL" if rc == 1 or any(e["kind"] == "internal" for e in errors) else "UNCLEAR"
        raise AssertionError(f"{tag}: exit {rc}: {errors}")
    return events


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative name → sha256): "nothing the person owns changed"."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- crafted files

def safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from a header (dict or raw JSON bytes) and data; `length` overrides the length field."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def png_header_only(width: int, height: int, bit_depth: int = 8, color: int = 2) -> bytes:
    """A PNG whose header claims width × height pixels, with one tiny (truncated) data chunk: a decompression bomb
    as it reaches a reader (the reader must refuse it from the size, before decoding)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
