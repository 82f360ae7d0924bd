"""The event stream (design.md §2.3): JSON lines, one object per line, each with "type" and "time".

Events go to stdout for the GUI (as JSON, or as readable text when stdout is a terminal) and to
--events_file. The engine's logging is routed through `log` events, so a terminal shows plain lines and
the GUI gets structured ones from the same call.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

EVENT_TYPES = ("start", "phase", "progress", "metric", "vram", "estimate", "sample", "image", "checkpoint",
               "log", "error", "done")


class EventWriter:
    def __init__(self, stream: TextIO | None = None, events_file: str | None = None,
                 json_stdout: bool | None = None):
        self.stream = stream if stream is not None else sys.stdout
        if json_stdout is None:
            json_stdout = os.environ.get("QIS_EVENTS") == "json" or not _isatty(self.stream)
        self.json_stdout = json_stdout
        self._file = open(events_file, "a", encoding="utf-8", buffering=1) if events_file else None
        self._lock = threading.Lock()

    def emit(self, type: str, **fields: Any) -> dict:
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        event = {"type": type, "time": round(time.time(), 3), **fields}
        line = json.dumps(event, default=_jsonable, ensure_ascii=False)
        with self._lock:
            if self._file:
                self._file.write(line + "\n")
            self.stream.write((line if self.json_stdout else human(event)) + "\n")
            self.stream.flush()
        return event

    # One method per type keeps call sites short and the field names consistent.
    def start(self, command: str, argv: list[str], config_path: str | None = None):
        return self.emit("start", command=command, argv=argv, config_path=config_path)

    def phase(self, name: str, **extra):
        return self.emit("phase", name=name, **extra)

    def progress(self, step: int, total: int, unit: str = "step", eta_s: float | None = None, **extra):
        return self.emit("progress", step=step, total=total, unit=unit, eta_s=eta_s, **extra)

    def metric(self, step: int, loss: float | None = None, lr: float | None = None, **extra):
        return self.emit("metric", step=step, loss=loss, lr=lr, **extra)

    def vram(self, allocated_gib: float, reserved_gib: float, peak_gib: float, ram_gib: float, **extra):
        return self.emit("vram", allocated_gib=allocated_gib, reserved_gib=reserved_gib, peak_gib=peak_gib,
                         ram_gib=ram_gib, **extra)

    def estimate(self, vram_gib: float, ram_gib: float, phases: dict, **extra):
        return self.emit("estimate", vram_gib=vram_gib, ram_gib=ram_gib, phases=phases, **extra)

    def sample(self, path: str, **extra):
        return self.emit("sample", path=str(path), **extra)

    def image(self, path: str, **extra):
        return self.emit("image", path=str(path), **extra)

    def checkpoint(self, path: str, step: int, **extra):
        return self.emit("checkpoint", path=str(path), step=step, **extra)

    def log(self, level: str, message: str):
        return self.emit("log", level=level, message=message)

    def error(self, kind: str, message: str, hint: str = ""):
        return self.emit("error", kind=kind, message=message, hint=hint)

    def done(self, outputs: list[str] | None = None, seconds: float = 0.0, **extra):
        return self.emit("done", outputs=[str(o) for o in outputs or []], seconds=round(seconds, 3), **extra)

    def close(self):
        if self._file:
            self._file.close()
            self._file = None


class EventLogHandler(logging.Handler):
    """Routes Python logging into `log` events."""

    def __init__(self, writer: EventWriter):
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.log(record.levelname.lower(), record.getMessage())
        except Exception:  # logging must never take the engine down
            self.handleError(record)


def human(event: dict) -> str:
    """One readable line for a terminal."""
    t = event["type"]
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    if t == "log":
        return f"{stamp} {event['level'].upper():7s} {event['message']}"
    if t == "progress":
        eta = f" eta {event['eta_s']:.0f}s" if event.get("eta_s") is not None else ""
        return f"{stamp} progress {event['step']}/{event['total']} {event['unit']}{eta}"
    if t == "error":
        hint = f"\n  fix: {event['hint']}" if event.get("hint") else ""
        return f"{stamp} ERROR   [{event['kind']}] {event['message']}{hint}"
    rest = {k: v for k, v in event.items() if k not in ("type", "time")}
    return f"{stamp} {t:8s} " + " ".join(f"{k}={_short(v)}" for k, v in rest.items())


def parse_line(line: str) -> dict | None:
    """The GUI side: an event dict, or None for a plain (non-event) output line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(event, dict) and event.get("type") in EVENT_TYPES and "time" in event:
        return event
    return None


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=_jsonable)
    return s if len(s) <= 120 else s[:117] + "..."


def _jsonable(v: Any):
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
