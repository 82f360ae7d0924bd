"""Helpers for the GUI tests (test_app.py, test_browser.py): one Studio server per test session, started the
way a user starts it (`python launch.py --demo --no-browser --port N`) on a temporary data dir.

Every route needs the launch's access token (app/security.py): the fixture reads it from the address launch.py
prints, like a person copying it from the terminal. gradio_client passes it as a header
(`Client(studio["url"], headers=studio["headers"])`), a browser opens `studio["open_url"]` (the printed address)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Jobs are real subprocesses; this module stands in for `engine` (QIS_ENGINE_MODULE) so that a job can run as
# long as a test needs: any command given a dataset config named slow_job.toml becomes a slow scripted job (the
# app has no way to start an arbitrary command, so the tests start it through a real typed form: start_slow_job).
# Every other command goes to the real engine, so the demo and inspect are real.
FAKE_ENGINE = r'''
import json, runpy, sys, time

def ev(type, **kw):
    print(json.dumps({"type": type, "time": time.time(), **kw}), flush=True)

if len(sys.argv) > 1 and any(a.endswith("slow_job.toml") for a in sys.argv[2:]):
    steps = 1000
    ev("start", command=sys.argv[1], argv=sys.argv[2:], config_path=None)
    try:
        ev("phase", name="training")
        for i in range(1, steps + 1):
            ev("progress", step=i, total=steps, unit="step", eta_s=float(steps - i) * 0.1)
            ev("metric", step=i, loss=1.0 / i, lr=1e-4)
            time.sleep(0.1)
        ev("done", outputs=[], seconds=0.0)
    except KeyboardInterrupt:
        ev("error", kind="interrupted", message="stopped by the user", hint="")
        sys.exit(130)
else:
    sys.path.insert(0, ".")
    runpy.run_module("engine", run_name="__main__", alter_sys=True)
'''


def start_slow_job(client, folder: Path) -> str:
    """Start a long fake job (see FAKE_ENGINE) with the Cache tab's latents button; returns its job id."""
    config = folder / "slow_job.toml"
    config.write_text("", encoding="utf-8")
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/cache_latents"]["parameters"]
    values = [p.get("parameter_default") for p in params]
    values[0] = str(config)
    outputs = client.predict(*values, api_name="/cache_latents")
    message = next(o for o in outputs if isinstance(o, str) and o.startswith("Started"))
    return re.search(r"\*\*(\S+)\*\*", message).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRINTED_URL = re.compile(r"http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]+)")


def wait_printed_url(log_path: Path, proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """(the printed address, its token) once launch.py has printed it, i.e. once it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"launch.py exited with code {proc.returncode}: {log_path.read_text()[-2000:]}")
        m = PRINTED_URL.search(log_path.read_text(errors="replace"))
        if m:
            return m.group(0), m.group(2)
        time.sleep(0.3)
    raise AssertionError(f"launch.py printed no address within {timeout} s")


def auth_headers(token: str) -> dict:
    return {"Authorization": f"token {token}"}


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 600, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"launch.py exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def get(url: str, headers: dict | None = None, method: str = "GET", data: bytes | None = None):
    """(status, headers, body) of one request; an HTTP error status is an answer, not an exception. The headers
    are read case-insensitively (headers["set-cookie"] == headers["Set-Cookie"])."""
    req = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@contextlib.contextmanager
def launched(data_dir: Path, *args: str, env: dict | None = None, timeout: float = 120):
    """A Studio of its own for one test (`launch.py --no-browser --port N --data_dir DIR ARGS`), stopped after:
    yields dict(url, open_url, token, headers, proc, log). Its data dir should name a DiT in settings.json (or
    link a demo), so no demo is built."""
    port = free_port()
    log_path = data_dir.parent / f"launch-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "launch.py", "--no-browser", "--port", str(port), "--data_dir",
                                 str(data_dir), *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})})
        try:
            open_url, token = wait_printed_url(log_path, proc, timeout)
            yield {"url": f"http://127.0.0.1:{port}/", "open_url": open_url, "token": token,
                   "headers": auth_headers(token), "proc": proc, "log": log_path}
        finally:
            interrupt(proc)


def interrupt(proc: subprocess.Popen) -> None:
    """Stop a Studio as Ctrl+C does (it stops its timers and queue), killing it after 20 s if it hangs."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_jobs(data_dir: Path) -> None:
    """Jobs outlive the GUI by design; a test session must not leave any behind."""
    index = data_dir / "jobs" / "jobs.json"
    if not index.exists():
        return
    for job in json.loads(index.read_text())["jobs"]:
        if job["status"] == "running" and job["pid"]:
            try:
                os.killpg(job["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="session")
def studio(tmp_path_factory, demo_dir):
    """A running Studio: dict(url, data_dir, manifest). Its data dir links the session's demo set (conftest's
    `demo_dir`), which the app finds complete, so it is not built a second time."""
    base = tmp_path_factory.mktemp("studio")
    fake_dir = base / "fake"
    fake_dir.mkdir()
    (fake_dir / "qis_fake_engine.py").write_text(FAKE_ENGINE)
    data_dir = base / "data"
    data_dir.mkdir()
    (data_dir / "demo").symlink_to(demo_dir, target_is_directory=True)
    port = free_port()
    env = {**os.environ, "QIS_ENGINE_MODULE": "qis_fake_engine", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": os.pathsep.join([str(fake_dir), str(REPO)])}
    log = open(base / "launch.log", "wb")
    proc = subprocess.Popen([sys.executable, "launch.py", "--demo", "--no-browser", "--port", str(port),
                             "--data_dir", str(data_dir)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        open_url, token = wait_printed_url(base / "launch.log", proc)
        wait_http(url, proc, headers=auth_headers(token))
        manifest = json.loads((data_dir / "demo" / "demo.json").read_text())
        yield {"url": url, "open_url": open_url, "token": token, "headers": auth_headers(token),
               "data_dir": data_dir, "manifest": manifest, "log": base / "launch.log"}
    finally:
        interrupt(proc)
        log.close()
        kill_jobs(data_dir)


def demo_model_paths(manifest: dict) -> list[str]:
    """The Models tab's boxes, in order (app.context.ROLES)."""
    from app.context import ROLES, demo_paths

    paths = demo_paths(manifest)
    return [paths.get(r.key, "") for r in ROLES]


# ---------------------------------------------------------------------------------------------- browser

CHROMIUM = "/usr/bin/chromium"       # Debian's; `./test.sh` installs it as root (never `playwright install`)
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def paint_stroke(page, editor) -> None:
    """One brush stroke across the middle of a painter (app/mask_painter.py), from a little left of its centre;
    the brush is the painter's default tool, clicked anyway as a person would."""
    editor.get_by_role("button", name="Brush", exact=True).click()
    box = editor.locator("canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2 - 40, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x + 8 * i, y + 2 * i)
    page.mouse.up()


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 1000):
    """A page in headless chromium with the flags below (no sandbox, GPU or network chatter); the calling test is skipped when chromium is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install -y chromium` (./test.sh does it as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()
