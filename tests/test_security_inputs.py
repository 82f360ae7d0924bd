"""What a request can make the app do (docs/security.md): no endpoint takes a command line, nothing a person types
becomes an engine option of its own, the plumbing options are the app's, and files are read only from allowed
places. Plus the launch flags (--no-token, --auth-file, QIS_AUTH, the browser start page) and the guard's own
answers that need no server (websocket refusal, the throttle). Every case is marked `fault("security")`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import launch
from _app_util import REPO, studio  # noqa: F401  (studio is a fixture)
from app.context import AppContext
from app.jobs import JobManager, engine_argv
from app.rerun import run_again, typed_job
from app.security import Guard, Throttle
from engine.spec import config as C
from engine.spec.naming import PNG_PARAMETERS_KEY

pytestmark = pytest.mark.fault("security")

HOSTILE = ["--events_file=/tmp/qis-pwned", "--events_file", "-h", "--config_file=/etc/passwd", "--", "-"]


def client_for(studio):
    from gradio_client import Client
    return Client(studio["url"], headers=studio["headers"], verbose=False)


# ---------------------------------------------------------------------------------------------- to_argv

@pytest.mark.parametrize("item", HOSTILE)
def test_a_list_item_never_becomes_an_option(item):
    cfg = C.TrainNetworkConfig(dit="d.safetensors", network_args=["conv_dim=4", item])
    with pytest.raises(C.ConfigError, match="network_args"):
        C.to_argv(cfg)
    with pytest.raises(C.ConfigError, match="optimizer_args"):
        C.to_argv(C.TrainNetworkConfig(dit="d.safetensors", optimizer_args=[item]))
    with pytest.raises(C.ConfigError, match="files"):
        C.to_argv(C.InspectModelConfig(files=["model.safetensors", item]))       # a positional


@pytest.mark.parametrize("value", [v for v in HOSTILE if v != "--"] + ["--seed 1 --events_file /tmp/x", "-1"])
def test_a_string_value_stays_one_value(value):
    cfg = C.GenerateImageConfig(prompt=value, negative_prompt=value, save_path=value, dit="d.safetensors")
    argv = C.to_argv(cfg)
    back = C.parse_args(C.GenerateImageConfig, argv, "generate_image")
    assert (back.prompt, back.negative_prompt, back.save_path) == (value, value, value)
    assert back.events_file is None and back.config_file is None


def test_a_bare_double_dash_value_is_refused():
    with pytest.raises(C.ConfigError, match="prompt"):          # argparse would drop it: the job would fail later
        C.to_argv(C.GenerateImageConfig(prompt="--", dit="d.safetensors"))


def test_negative_numbers_in_lists_still_work():
    cfg = C.GenerateImageConfig(dit="d.safetensors", image_size=[64, 64], seed=-1)
    assert C.parse_args(C.GenerateImageConfig, C.to_argv(cfg), "generate_image").seed == -1


def test_network_args_smuggling_through_the_train_tab_is_refused(studio, tmp_path):
    from test_train_tab import form_values, start_args

    client = client_for(studio)
    before = {r[0] for r in client.predict(None, api_name="/jobs_refresh")[0]["data"]}
    values = form_values(client, network_args=f"conv_dim=4\n--events_file={tmp_path / 'bashrc'}",
                         output_dir=str(tmp_path), output_name="smuggle")
    command, _ = client.predict(*values.values(), api_name="/train_preview")
    assert "cannot build the command" in command and "network_args" in command
    _, message, *_ = client.predict(*start_args(values), api_name="/train_start")
    assert "network_args" in message and "starts with '-'" in message
    after = {r[0] for r in client.predict(None, api_name="/jobs_refresh")[0]["data"]}
    assert after == before and not (tmp_path / "bashrc").exists()


@pytest.mark.parametrize("name", ["../escape", "sub/run", ".hidden"])
def test_an_output_name_that_leaves_its_folder_is_refused_before_a_job(studio, tmp_path, name):
    from test_train_tab import form_values, start_args

    client = client_for(studio)
    before = {r[0] for r in client.predict(None, api_name="/jobs_refresh")[0]["data"]}
    values = form_values(client, output_dir=str(tmp_path / "runs"), output_name=name)
    _, message, *_ = client.predict(*start_args(values), api_name="/train_start")
    assert "output_name" in message and "plain file name" in message and "my_lora" in message
    after = {r[0] for r in client.predict(None, api_name="/jobs_refresh")[0]["data"]}
    assert after == before and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- jobs

def test_no_endpoint_takes_a_command_line(studio):
    endpoints = client_for(studio).view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert "/jobs_run" not in endpoints
    again = endpoints["/jobs_run_again"]["parameters"]
    assert len(again) == 1 and again[0]["component"] == "Dropdown"     # a job id, nothing else


@pytest.fixture
def ctx(tmp_path):
    context = AppContext(data_dir=tmp_path, jobs=JobManager(tmp_path / "jobs"))
    yield context
    context.jobs.close()


def recorded(ctx, *args: str, command: str = "inspect_model") -> str:
    """A job record as if it had run (its process fails at once on the missing file)."""
    job = ctx.jobs.submit_argv(engine_argv(command, list(args)), command)
    ctx.jobs.wait(job.id, timeout=60)
    return job.id


@pytest.mark.parametrize("injected", [["--events_file", "EVENTS"], ["--events_file=EVENTS"],
                                      ["--config_file", "EVENTS"], ["--", "--events_file=EVENTS"]])
def test_run_again_refuses_plumbing_in_a_job_record(ctx, tmp_path, injected):
    """A tampered jobs.json (another local user, an old version): its record is never replayed as it stands."""
    events = str(tmp_path / "bashrc")
    job_id = recorded(ctx, str(tmp_path / "missing.safetensors"), "--json", *[a.replace("EVENTS", events)
                                                                             for a in injected])
    count = len(ctx.jobs.list())
    with pytest.raises(C.ConfigError) as refused:
        run_again(ctx, job_id)
    assert any(word in str(refused.value) for word in ("events_file", "config_file", "starts with '-'"))
    assert len(ctx.jobs.list()) == count


def test_run_again_refuses_what_is_not_an_engine_command(ctx):
    job_id = recorded(ctx, "1000", command="slow_job")
    with pytest.raises(C.ConfigError, match="not an engine command"):
        run_again(ctx, job_id)
    with pytest.raises(C.ConfigError, match="do not parse"):
        typed_job(engine_argv("inspect_model", ["x.safetensors", "--no_such_option"]))


def test_run_again_rebuilds_the_job_from_its_typed_config(ctx, tmp_path):
    job_id = recorded(ctx, str(tmp_path / "a b.safetensors"), "--json")
    job = run_again(ctx, job_id)
    assert job.argv == engine_argv("inspect_model", [str(tmp_path / "a b.safetensors"), "--json"])


def test_submit_config_refuses_plumbing_options(ctx, tmp_path):
    for cfg in (C.GenerateImageConfig(dit="d", events_file=str(tmp_path / "bashrc")),
                C.GenerateImageConfig(dit="d", config_file=str(tmp_path / "x.toml"))):
        with pytest.raises(C.ConfigError, match="set by the app itself"):
            ctx.submit_config("generate_image", cfg)
    assert ctx.jobs.list() == []


# ---------------------------------------------------------------------------------------------- files

def outputs_text(outputs) -> str:
    return json.dumps(outputs, default=str)


@pytest.mark.parametrize("target", ["/etc/passwd", "/etc/hostname", "OUTSIDE", "LINK", "BIG", "NOT_TOML"])
def test_dataset_open_returns_no_file_from_outside_the_allowed_places(studio, tmp_path, target):
    data = studio["data_dir"]
    secret = tmp_path / "secret.toml"
    secret.write_text('[general]\nresolution = [64, 64]\n# SECRET-MARKER\n')
    name = tmp_path.name
    paths = {"OUTSIDE": secret, "LINK": data / "datasets" / f"{name}-link.toml",
             "BIG": data / "datasets" / f"{name}-big.toml", "NOT_TOML": data / "settings.json"}
    path = paths.get(target, Path(target))
    if target == "LINK":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(secret)
    if target == "BIG":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# SECRET-MARKER\n" + "#" * (1 << 20))
    outputs = client_for(studio).predict(str(path), "edit", api_name="/dataset_open")
    text = outputs_text(outputs)
    assert "SECRET-MARKER" not in text and "root:" not in text
    message = outputs[2]
    assert str(path) in message or path.name in message
    assert any(word in message for word in ("only from", "too large", ".toml file", "no such file"))


def test_dataset_open_still_opens_a_config_in_the_data_dir(studio, demo_manifest):
    data = studio["data_dir"] / "datasets"
    data.mkdir(exist_ok=True)
    own = data / "own.toml"
    own.write_text(Path(demo_manifest["dataset_config"]["edit"]).read_text())
    outputs = client_for(studio).predict(str(own), "edit", api_name="/dataset_open")
    assert outputs[0].strip() == own.read_text().strip() and "Opened" in outputs[2]


def png_with_parameters(path: Path, params: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, json.dumps(params))
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path, pnginfo=info)
    return path


def test_png_parameters_never_pull_in_a_file_from_outside(studio, tmp_path):
    from gradio_client import handle_file
    from test_generate_tab import config, form_fields, values

    secret = tmp_path / "private_photo.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(secret)
    inside = studio["data_dir"] / "generate" / "inputs" / f"{tmp_path.name}" / "control.png"
    inside.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (4, 5, 6)).save(inside)
    base = config(studio, "edit")
    for controls, mask, loaded in (([str(secret), "/etc/passwd"], str(secret), False), ([str(inside)], None, True)):
        params = {"prompt": "p", "seed": 5, "model_version": "edit", "control_image_path": controls,
                  "mask_path": mask}
        png = png_with_parameters(tmp_path / "crafted.png", params)
        out = client_for(studio).predict(handle_file(str(png)), *values(base), api_name="/generate_load_params")
        editor, note = out[len(form_fields())], out[-1]
        assert "Loaded the parameters" in note
        assert (editor is not None) == loaded
        assert str(secret) not in outputs_text(out) and "root:" not in outputs_text(out)
        if not loaded:
            assert "Not loaded" in note and "private_photo.png" in note and "passwd" in note


# ---------------------------------------------------------------------------------------------- launch flags

@pytest.mark.parametrize("args", [["--listen"], ["--host", "0.0.0.0"], ["--host", "192.168.1.5"]])
def test_no_token_is_refused_off_loopback(tmp_path, args):
    proc = subprocess.run([sys.executable, "launch.py", "--no-browser", "--no-token", "--auth", "a:b",
                           "--data_dir", str(tmp_path), *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--no-token cannot be used with --listen" in proc.stderr
    assert "fix:" in proc.stderr and not (tmp_path / "jobs").exists()


def test_qis_auth_is_removed_from_the_environment_once_read(monkeypatch):
    monkeypatch.setenv("QIS_AUTH", "ann:env-secret")
    assert launch.read_auth(launch.parse_args([])) == ("ann", "env-secret")
    assert "QIS_AUTH" not in os.environ                 # engine subprocesses do not inherit the password


def test_auth_file_wins_and_a_bad_one_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("QIS_AUTH", raising=False)
    good = tmp_path / "login"
    good.write_text("ann:file-secret\nignored\n")
    assert launch.read_auth(launch.parse_args(["--auth-file", str(good)])) == ("ann", "file-secret")
    with pytest.raises(SystemExit, match="cannot read --auth-file"):
        launch.read_auth(launch.parse_args(["--auth-file", str(tmp_path / "missing")]))
    (tmp_path / "empty").write_text("")
    with pytest.raises(SystemExit, match="USER:PASSWORD"):
        launch.read_auth(launch.parse_args(["--auth-file", str(tmp_path / "empty")]))


def test_the_browser_gets_a_private_start_page_not_the_token(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(launch.webbrowser, "open", opened.append)
    url = "http://127.0.0.1:7860/?token=abc_DEF-123"
    launch.open_browser(url, launch.private_dir(tmp_path / "private"))
    page = tmp_path / "private" / "open.html"
    assert opened == [page.as_uri()] and "abc_DEF-123" not in opened[0]
    assert page.stat().st_mode & 0o777 == 0o600 and (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    assert url in page.read_text()


# ---------------------------------------------------------------------------------------------- the guard itself

def guarded(token: str | None = "T" * 43, throttle: Throttle | None = None) -> TestClient:
    async def ws(websocket):
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    app = Starlette(routes=[Route("/", lambda r: PlainTextResponse("ok"), methods=["GET", "POST"]),
                            WebSocketRoute("/ws", ws)],
                    middleware=[Middleware(Guard, token=token, throttle=throttle)])
    return TestClient(app, base_url="http://127.0.0.1:7860")


def test_a_websocket_needs_the_token_and_the_own_origin():
    client = guarded()
    good = {"authorization": "token " + "T" * 43, "origin": "http://127.0.0.1:7860"}
    with client.websocket_connect("ws://127.0.0.1:7860/ws", headers=good) as ws:
        assert ws.receive_text() == "hello"
    for url, headers in (("ws://127.0.0.1:7860/ws", {**good, "origin": "http://evil.example"}),
                         ("ws://127.0.0.1:7860/ws", {"origin": good["origin"]}),
                         ("ws://127.0.0.1:7860/ws", {**good, "authorization": "token wrong"}),
                         ("ws://evil.example:7860/ws", {**good, "origin": "http://evil.example:7860"})):
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect(url, headers=headers) as ws:
                ws.receive_text()


def test_wrong_tokens_are_slowed_and_serialised():
    throttle = Throttle(free=3, base_delay_s=0.05, max_delay_s=0.4)
    assert [throttle.delay_for("k", now=0.0)] == [0.0]
    for i in range(6):
        throttle._failures["k"].append(float(i))
    assert throttle.delay_for("k", now=6.0) == 0.2                 # 3 over: 0.05, 0.1, 0.2
    assert throttle.delay_for("k", now=100.0) == 0.0               # outside the window
    client = guarded(throttle=Throttle(free=2, base_delay_s=0.05, max_delay_s=0.4))
    start = time.monotonic()
    answers = [client.get("/", headers={"authorization": "token wrong"}).status_code for _ in range(6)]
    assert answers == [401] * 6 and time.monotonic() - start >= 0.6        # 0.05 + 0.1 + 0.2 + 0.4
    start = time.monotonic()
    assert client.get("/", headers={"authorization": "token " + "T" * 43}).status_code == 200
    assert time.monotonic() - start < 0.3                                  # the right token is never slowed


def test_a_wrong_host_is_refused_by_the_guard_before_the_token():
    client = guarded()
    assert client.get("/", headers={"host": "evil.example"}).status_code in (403,)
    assert client.post("/", headers={"authorization": "token " + "T" * 43, "sec-fetch-site": "cross-site"}
                       ).status_code == 403
