"""Fault suite: the event stream and the dispatcher. Events stay strict JSON, a traceback reaches the log, an
OSError anywhere in a command is a disk error naming the path, and a bad --events_file is a refusal."""

from __future__ import annotations

import errno
import io
import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _fault_util import one_clear_error, run_engine_process
from engine.__main__ import main, run_command
from engine.spec.events import EventWriter

pytestmark = pytest.mark.fault("events")


@dataclass
class NoOptions:
    """A command config without options (run_command validates its config first)."""


def _strict(line: str) -> dict:
    return json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(f"UNCLEAR: bare {c}")))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_become_null(value):
    buf = io.StringIO()
    w = EventWriter(stream=buf, json_stdout=True)
    w.metric(3, loss=value, lr=np.float32(value), avg_loss=torch.tensor(value), lrs={"a": [value, 1.0]})
    ev = _strict(buf.getvalue())
    assert ev["loss"] is None and ev["lr"] is None and ev["avg_loss"] is None and ev["lrs"] == {"a": [None, 1.0]}


def test_traceback_reaches_the_log():
    buf = io.StringIO()
    events = EventWriter(stream=buf, json_stdout=True)

    def broken(cfg, ev):
        return {}["missing key"]

    cmd = SimpleNamespace(name="fake", target="test_faults_events:_broken_target")
    globals()["_broken_target"] = broken
    rc = run_command(cmd, NoOptions(), events, [])
    lines = [_strict(x) for x in buf.getvalue().splitlines()]
    assert rc == 1
    logged = [e["message"] for e in lines if e["type"] == "log" and e["level"] == "error"]
    assert logged and "Traceback (most recent call last)" in logged[0] and "KeyError: 'missing key'" in logged[0]
    assert [e["kind"] for e in lines if e["type"] == "error"] == ["internal"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_os_error_inside_a_command_is_a_disk_error(code, tmp_path):
    target = tmp_path / "out" / "file.bin"

    def failing(cfg, ev):
        raise OSError(code, "simulated", str(target))

    globals()["_failing_target"] = failing
    buf = io.StringIO()
    rc = run_command(SimpleNamespace(name="fake", target="test_faults_events:_failing_target"), NoOptions(),
                     EventWriter(stream=buf, json_stdout=True), [])
    events = [_strict(x) for x in buf.getvalue().splitlines()]
    err = one_clear_error(rc, events, str(target), kind="disk")
    assert errno.errorcode[code] in err["message"]


def test_events_file_in_a_missing_folder_is_a_refusal(tmp_path, capsys):
    bad = tmp_path / "no" / "such" / "folder" / "events.jsonl"
    rc = main(["generate_image", "--prompt", "x", "--save_path", str(tmp_path), "--events_file", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2, "INTERNAL: exit code " + str(rc)
    assert str(bad) in err and "fix:" in err and "Traceback" not in err


def test_events_are_strict_json_in_a_real_process(tmp_path, demo_manifest):
    """The real CLI on a bad input: every line of its events file parses with NaN/Infinity refused."""
    missing = tmp_path / "missing.safetensors"
    rc, events = run_engine_process(["generate_image", "--dit", missing, "--vae", demo_manifest["vae"],
                                     "--text_encoder", demo_manifest["text_encoder"], "--prompt", "x",
                                     "--save_path", tmp_path / "out"], tmp_path / "ev.jsonl")
    one_clear_error(rc, events, missing)
