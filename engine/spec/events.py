"""The event stream: JSON lines, one object per line, each with "type" and "time" (docs/architecture.md lists
the types and their fields). The GUI builds its progress bars, charts, galleries and error panels from it alone.

Events go to stdout for the GUI (as JSON, or as readable text when stdout is a terminal) and to
--events_file; a command whose result is data sends them to stderr instead. The engine's logging is routed
through `log` events, so a terminal shows plain lines and the GUI gets structured ones from the same call.

Both sides use the typed classes below: the engine writes them (`EventWriter.write`), the app reads them back
(`parse_event`), so a field name is spelled once. Fields a class does not declare travel in `extra`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TextIO

from engine.spec.naming import EVENTS_ENV, EVENTS_ENV_JSON

EVENT_TYPES = ("start", "phase", "progress", "metric", "vram", "estimate", "sample", "image", "checkpoint",
               "log", "error", "done")

# What an `image` event's picture is: a result, a live preview (never a result), or an RCM debug mask.
IMAGE_OUTPUT, IMAGE_PREVIEW, IMAGE_RCM_MASK = "output", "preview", "rcm_mask"


# ------------------------------------------------------------------ typed events

@dataclass
class Event:
    TYPE: ClassVar[str] = ""
    extra: dict = field(default_factory=dict, kw_only=True)     # fields this class does not declare
    time: float | None = field(default=None, kw_only=True)     # set when written or read

    def fields(self) -> dict:
        """The event's fields as they go on the wire (after "type" and "time"), declared ones first."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "time")}
        return {**out, **self.extra}

    @classmethod
    def of(cls, data: dict) -> "Event":
        names = {f.name for f in fields(cls)} - {"extra", "time"}
        return cls(**{k: v for k, v in data.items() if k in names}, time=data.get("time"),
                   extra={k: v for k, v in data.items() if k not in names | {"type", "time"}})


@dataclass
class Start(Event):
    TYPE = "start"
    command: str
    argv: list
    config_path: str | None = None


@dataclass
class Phase(Event):
    TYPE = "phase"
    name: str


@dataclass
class Progress(Event):
    TYPE = "progress"
    step: int
    total: int
    unit: str = "step"
    eta_s: float | None = None


@dataclass
class Metric(Event):
    TYPE = "metric"
    step: int
    loss: float | None = None
    lr: float | None = None


@dataclass
class Vram(Event):
    TYPE = "vram"
    allocated_gib: float
    reserved_gib: float
    peak_gib: float
    ram_gib: float


@dataclass
class Estimate(Event):
    TYPE = "estimate"
    vram_gib: float
    ram_gib: float
    phases: dict


@dataclass
class Sample(Event):
    TYPE = "sample"
    path: str


@dataclass
class Image(Event):
    TYPE = "image"
    path: str
    kind: str | None = None            # IMAGE_OUTPUT, IMAGE_PREVIEW or IMAGE_RCM_MASK


@dataclass
class Preview(Image):
    """generate_image --preview_every: the model's estimate of the final image after `step` of `total`."""
    kind: str | None = IMAGE_PREVIEW
    step: int = 0
    total: int = 0
    index: int = 0                     # the job (prompt) of the run it belongs to


@dataclass
class RcmStep(Image):
    """One denoising step of the Reference Consistency Mask (--rcm_debug_save): the token mask saved at `path`
    and the statistics of the difference it was cut from, with the threshold applied."""
    kind: str | None = IMAGE_RCM_MASK
    step: int = 0
    index: int = 0
    min: float = 0.0
    max: float = 0.0
    mean: float = 0.0
    threshold: float = 0.0


@dataclass
class Checkpoint(Event):
    TYPE = "checkpoint"
    path: str
    step: int


@dataclass
class Log(Event):
    TYPE = "log"
    level: str
    message: str


@dataclass
class Error(Event):
    TYPE = "error"
    kind: str
    message: str
    hint: str = ""


@dataclass
class Done(Event):
    TYPE = "done"
    outputs: list
    seconds: float


EVENT_CLASSES: dict[str, type[Event]] = {c.TYPE: c for c in (Start, Phase, Progress, Metric, Vram, Estimate, Sample,
                                                             Image, Checkpoint, Log, Error, Done)}
IMAGE_CLASSES: dict[str, type[Image]] = {IMAGE_PREVIEW: Preview, IMAGE_RCM_MASK: RcmStep}


def typed(event: dict) -> Event:
    """The typed view of a parsed event dict."""
    cls = EVENT_CLASSES[event["type"]]
    if cls is Image:
        cls = IMAGE_CLASSES.get(event.get("kind"), Image)
    return cls.of(event)


class EventWriter:
    def __init__(self, stream: TextIO | None = None, events_file: str | None = None,
                 json_stdout: bool | None = None):
        self.stream = stream if stream is not None else sys.stdout
        if json_stdout is None:
            json_stdout = os.environ.get(EVENTS_ENV) == EVENTS_ENV_JSON or not _isatty(self.stream)
        self.json_stdout = json_stdout
        self._file = open(events_file, "a", encoding="utf-8", buffering=1) if events_file else None
        self._lock = threading.Lock()

    def write(self, event: Event) -> dict:
        return self.emit(event.TYPE, **event.fields())

    def emit(self, type: str, **fields: Any) -> dict:
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        event = {"type": type, "time": round(time.time(), 3), **fields}
        line = json.dumps(finite(event), default=_jsonable, ensure_ascii=False, allow_nan=False)
        with self._lock:
            if self._file:
                self._file.write(line + "\n")
            self.stream.write((line if self.json_stdout else human(event)) + "\n")
            self.stream.flush()
        return event

    # One method per type keeps call sites short; each builds its typed event.
    def start(self, command: str, argv: list[str], config_path: str | None = None):
        return self.write(Start(command, argv, config_path))

    def phase(self, name: str, **extra):
        return self.write(Phase(name, extra=extra))

    def progress(self, step: int, total: int, unit: str = "step", eta_s: float | None = None, **extra):
        return self.write(Progress(step, total, unit, eta_s, extra=extra))

    def metric(self, step: int, loss: float | None = None, lr: float | None = None, **extra):
        return self.write(Metric(step, loss, lr, extra=extra))

    def vram(self, allocated_gib: float, reserved_gib: float, peak_gib: float, ram_gib: float, **extra):
        return self.write(Vram(allocated_gib, reserved_gib, peak_gib, ram_gib, extra=extra))

    def estimate(self, vram_gib: float, ram_gib: float, phases: dict, **extra):
        return self.write(Estimate(vram_gib, ram_gib, phases, extra=extra))

    def sample(self, path: str, **extra):
        return self.write(Sample(str(path), extra=extra))

    def image(self, path: str, kind: str | None = None, **extra):
        return self.write(Image(str(path), kind, extra=extra))

    def checkpoint(self, path: str, step: int, **extra):
        return self.write(Checkpoint(str(path), step, extra=extra))

    def log(self, level: str, message: str):
        return self.write(Log(level, message))

    def error(self, kind: str, message: str, hint: str = ""):
        return self.write(Error(kind, message, hint))

    def done(self, outputs: list[str] | None = None, seconds: float = 0.0, **extra):
        return self.write(Done([str(o) for o in outputs or []], round(seconds, 3), extra=extra))

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
            message = record.getMessage()
            if record.exc_info:          # log.exception(...): the traceback is what the user sends with a bug
                message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            elif record.exc_text:
                message += "\n" + record.exc_text
            self.writer.log(record.levelname.lower(), message)
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


def parse_event(line: str) -> Event | None:
    """The GUI side, typed: an Event, or None for a plain (non-event) output line."""
    event = parse_line(line)
    return None if event is None else typed(event)


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


def finite(v: Any) -> Any:
    """`v` with every NaN / infinity (also inside lists and dicts, and numpy/torch scalars) as None: JSON has no
    NaN, and a bare `NaN` in a line makes strict parsers (jq, browsers' JSON.parse) reject the whole event."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    if hasattr(v, "item"):             # numpy / torch scalars
        try:
            return finite(v.item())
        except (TypeError, ValueError, RuntimeError):
            return v
    return v


def _jsonable(v: Any):
    if hasattr(v, "item"):
        return finite(v.item())
    return str(v)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
