"""The event stream contract (docs/architecture.md, "The event stream")."""

import io
import json
import logging

from engine.spec.events import EVENT_TYPES, EventLogHandler, EventWriter, human, parse_line


def test_every_event_is_one_json_line_with_type_and_time(tmp_path):
    out = io.StringIO()
    w = EventWriter(stream=out, events_file=str(tmp_path / "ev.jsonl"), json_stdout=True)
    w.start("cmd", ["--x"], None)
    w.phase("loading")
    w.progress(1, 10, "step", eta_s=3.0)
    w.metric(1, loss=0.5, lr=1e-4)
    w.vram(1.0, 2.0, 3.0, 4.0)
    w.estimate(10.0, 20.0, {"load": {}})
    w.sample("s.png")
    w.image("i.png")
    w.checkpoint("c.safetensors", 5)
    w.log("info", "hello")
    w.error("model_file", "bad", "fix it")
    w.done(["o"], 1.5)
    w.close()
    lines = out.getvalue().splitlines()
    assert lines == (tmp_path / "ev.jsonl").read_text().splitlines()
    events = [parse_line(line) for line in lines]
    assert [e["type"] for e in events] == list(EVENT_TYPES)
    assert all(isinstance(e["time"], float) for e in events)
    assert events[2] == {**events[2], "step": 1, "total": 10, "unit": "step", "eta_s": 3.0}
    assert events[10]["hint"] == "fix it"


def test_terminal_output_is_readable_not_json():
    out = io.StringIO()
    EventWriter(stream=out, json_stdout=False).error("dataset", "a.png has no caption", "add a.txt")
    text = out.getvalue()
    assert "ERROR" in text and "fix: add a.txt" in text and not text.startswith("{")


def test_logging_becomes_log_events():
    out = io.StringIO()
    handler = EventLogHandler(EventWriter(stream=out, json_stdout=True))
    logger = logging.getLogger("test_events")
    logger.addHandler(handler)
    logger.warning("careful %s", "now")
    logger.removeHandler(handler)
    event = json.loads(out.getvalue())
    assert event["type"] == "log" and event["level"] == "warning" and event["message"] == "careful now"


def test_parse_line_ignores_plain_output():
    assert parse_line("Loading weights...") is None
    assert parse_line('{"not": "an event"}') is None
    assert parse_line("{broken") is None
    assert human({"type": "phase", "time": 0.0, "name": "loading"}).endswith("name=loading")
