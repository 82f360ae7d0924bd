"""The server as an attacker meets it (issue: no web page can drive the app): real HTTP requests against a
launched Studio (`launch.py`, tests/_app_util.py). Each case is one attack of docs/security.md and is marked
`fault("security")`, so scripts/fault_report.py counts them.

- Host: a name that is not loopback (DNS rebinding) is refused on every route, even with the token.
- Origin: cross-origin state-changing requests (gradio's upload route, the queue, websockets) are refused.
- Token: every route needs it; wrong and missing tokens get a short page without the API description or paths;
  header, cookie and ?token= work; the ?token= page sets an HttpOnly SameSite=Strict cookie and drops the token.
- Login (--auth): the login page leaks nothing, failures are slowed, the password comes from a file or QIS_AUTH.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid

import pytest
from _app_util import REPO, auth_headers, browser_page, free_port, get, launched, studio, wait_http  # noqa: F401

pytestmark = pytest.mark.fault("security")

ROUTES = ["", "config", "gradio_api/info", "gradio_api/openapi.json", "theme.css", "gradio_api/queue/data",
          "gradio_api/file=SETTINGS", "gradio_api/upload_progress", "manifest.json", "favicon.ico"]


def route(studio, path: str) -> str:
    return studio["url"] + path.replace("SETTINGS", str(studio["data_dir"] / "settings.json"))


def asset_path(studio) -> str:
    """A static file the page loads (a script under assets/), taken from the page itself."""
    html = get(studio["url"], studio["headers"])[2].decode()
    start = html.index("assets/")
    return html[start:html.index('"', start)]


def leaks(body: bytes, studio) -> list[str]:
    """What a refused answer must never contain: the API description, the app's config, absolute paths."""
    text = body.decode(errors="replace")
    markers = ["gradio_api_info", "named_endpoints", "dependencies", "models_inspect", str(studio["data_dir"]),
               str(studio["data_dir"].parent), "/work/", "/tmp/"]
    return [m for m in markers if m in text]


def multipart(name: str, content: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def uploaded_names(studio) -> set[str]:
    return {p.name for p in (studio["data_dir"] / "uploads").rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- Host

@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}",
                                  "localhost.evil.example:{port}", "0.0.0.0:{port}", "192.168.1.5:{port}", ""])
def test_a_host_that_is_not_loopback_is_refused_even_with_the_token(studio, host):
    port = studio["url"].rsplit(":", 1)[1].strip("/")
    for path in ("", "config", "gradio_api/info"):
        status, _, body = get(route(studio, path), {**studio["headers"], "Host": host.format(port=port)})
        assert status == 403, (host, path)
        assert not leaks(body, studio)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "127.0.0.2:{port}"])
def test_loopback_names_are_served(studio, host):
    port = studio["url"].rsplit(":", 1)[1].strip("/")
    status, _, _ = get(studio["url"] + "config", {**studio["headers"], "Host": host.format(port=port)})
    assert status == 200


# ---------------------------------------------------------------------------------------------- Origin

@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Origin": "null"},
                                     {"Origin": "http://localhost:1"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "same-site"}])
def test_a_cross_origin_upload_is_refused_and_nothing_is_stored(studio, headers):
    before = uploaded_names(studio)
    name = f"cross-{uuid.uuid4().hex[:8]}.txt"
    body, content_type = multipart(name, b"attacker text")
    status, _, answer = get(studio["url"] + "gradio_api/upload", {**studio["headers"], **headers,
                            "Content-Type": content_type}, "POST", body)
    assert status == 403 and not leaks(answer, studio)
    assert uploaded_names(studio) == before


def test_a_same_origin_upload_is_accepted(studio):
    name = f"own-{uuid.uuid4().hex[:8]}.txt"
    body, content_type = multipart(name, b"my text")
    origin = studio["url"].rstrip("/")
    status, _, answer = get(studio["url"] + "gradio_api/upload", {**studio["headers"], "Origin": origin,
                            "Sec-Fetch-Site": "same-origin", "Content-Type": content_type}, "POST", body)
    assert status == 200 and name in uploaded_names(studio)
    assert json.loads(answer)[0].startswith(str(studio["data_dir"] / "uploads"))   # gradio's uploads: in the data dir


def test_a_cross_origin_queue_join_is_refused(studio):
    payload = json.dumps({"data": [], "fn_index": 0, "session_hash": "x" * 11}).encode()
    status, _, _ = get(studio["url"] + "gradio_api/queue/join", {**studio["headers"], "Origin": "http://evil.example",
                       "Content-Type": "application/json"}, "POST", payload)
    assert status == 403


def websocket_status(studio, headers: dict) -> int:
    """The HTTP status a websocket handshake gets (101: accepted)."""
    host, port = "127.0.0.1", int(studio["url"].rsplit(":", 1)[1].strip("/"))
    lines = ["GET /gradio_api/queue/join HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             *[f"{k}: {v}" for k, v in headers.items()]]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return int(s.recv(100).split()[1])


def test_a_cross_origin_websocket_is_never_upgraded(studio):
    """gradio talks over HTTP + server-sent events; a websocket handshake from another origin is refused (the
    Guard's own websocket answer is tested in process: test_security_inputs.py)."""
    assert websocket_status(studio, {**studio["headers"], "Origin": "http://evil.example"}) == 403
    assert websocket_status(studio, {"Origin": studio["url"].rstrip("/")}) == 401      # no token


# ---------------------------------------------------------------------------------------------- token

@pytest.mark.parametrize("path", ROUTES + ["ASSET"])
def test_every_route_needs_the_token(studio, path):
    url = studio["url"] + asset_path(studio) if path == "ASSET" else route(studio, path)
    for headers in ({}, {"Accept": "text/html"}):
        status, _, body = get(url, headers)
        assert status == 401, (path, status)
        assert not leaks(body, studio), (path, leaks(body, studio))


@pytest.mark.parametrize("method,path", [("POST", "gradio_api/upload"), ("POST", "gradio_api/queue/join"),
                                         ("POST", "gradio_api/run/predict"), ("POST", "login")])
def test_every_post_route_needs_the_token(studio, method, path):
    status, _, body = get(studio["url"] + path, {"Content-Type": "application/json"}, method, b"{}")
    assert status == 401 and not leaks(body, studio)


def test_the_token_page_says_what_to_do_and_nothing_else(studio):
    status, headers, body = get(studio["url"], {"Accept": "text/html"})
    text = body.decode()
    assert status == 401 and "Authorization: token" in text and "?token=" in text
    assert headers["Cache-Control"] == "no-store" and not leaks(body, studio) and len(body) < 2000


@pytest.mark.parametrize("where", ["header", "bearer", "query", "cookie"])
def test_a_wrong_token_is_refused_wherever_it_is_sent(studio, where):
    wrong = studio["token"][:-2] + ("AA" if not studio["token"].endswith("AA") else "BB")
    port = studio["url"].rsplit(":", 1)[1].strip("/")
    headers = {"header": {"Authorization": f"token {wrong}"}, "bearer": {"Authorization": f"Bearer {wrong}"},
               "query": {}, "cookie": {"Cookie": f"qis-token-{port}={wrong}"}}[where]
    url = studio["url"] + "config" + (f"?token={wrong}" if where == "query" else "")
    status, _, body = get(url, headers)
    assert status == 401 and not leaks(body, studio)


@pytest.mark.parametrize("where", ["header", "bearer", "query", "cookie"])
def test_the_token_works_as_header_cookie_or_query(studio, where):
    token = studio["token"]
    port = studio["url"].rsplit(":", 1)[1].strip("/")
    headers = {"header": {"Authorization": f"token {token}"}, "bearer": {"Authorization": f"Bearer {token}"},
               "query": {}, "cookie": {"Cookie": f"other=1; qis-token-{port}={token}"}}[where]
    url = studio["url"] + "config" + (f"?token={token}" if where == "query" else "")
    status, _, body = get(url, headers)
    assert status == 200 and b"components" in body


def test_the_printed_address_sets_a_strict_cookie_and_drops_the_token(studio):
    status, headers, body = get(studio["open_url"], {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"})
    port = studio["url"].rsplit(":", 1)[1].strip("/")
    cookie = headers["Set-Cookie"]
    assert status == 200 and cookie.startswith(f"qis-token-{port}={studio['token']};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert 'content="0;url=/"' in body.decode() and studio["token"] not in body.decode()
    assert headers["Referrer-Policy"] == "no-referrer"
    status, _, page = get(studio["url"], {"Cookie": cookie.split(";")[0], "Accept": "text/html"})
    assert status == 200 and b"Qwen-Image Studio" in page


def test_the_launch_prints_the_address_with_a_fresh_token(studio):
    log = studio["log"].read_text()
    assert f"{studio['url']}?token={studio['token']}" in log and "Authorization: token" in log
    assert len(studio["token"]) >= 40           # secrets.token_urlsafe(32): 256 bits


def test_gradio_client_works_with_the_header_and_not_without(studio):
    from gradio_client import Client

    client = Client(studio["url"], headers=studio["headers"], verbose=False)
    assert "/models_inspect" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    with pytest.raises(Exception):
        Client(studio["url"], verbose=False)


def test_files_are_served_only_from_the_data_dir_and_never_settings(studio, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"\x89PNG not really")
    inside = studio["data_dir"] / "outputs" / "served.txt"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_text("served")
    assert get(studio["url"] + f"gradio_api/file={inside}", studio["headers"])[0] == 200
    for path in (outside, studio["data_dir"] / "settings.json", "/etc/passwd"):
        status, _, body = get(studio["url"] + f"gradio_api/file={path}", studio["headers"])
        assert status in (403, 404) and b"root:" not in body and b"models" not in body, path


def test_the_upload_folder_is_private(studio):
    assert (studio["data_dir"] / "uploads").stat().st_mode & 0o777 == 0o700


# ---------------------------------------------------------------------------------------------- no token, login

def configured(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "settings.json").write_text(json.dumps({"models": {"dit": "/models/dit.safetensors"}}))
    return data


def test_no_token_serves_loopback_without_a_token_but_keeps_the_host_check(tmp_path):
    data = configured(tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "launch.py", "--no-browser", "--no-token", "--port", str(port),
                             "--data_dir", str(data)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url + "config", proc, timeout=120)
        assert get(url + "config", {"Host": "evil.example"})[0] == 403
        assert get(url + "gradio_api/upload", {"Origin": "http://evil.example"}, "POST", b"")[0] == 403
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def login(url: str, headers: dict, user: str, password: str) -> tuple[int, float]:
    body = f"username={user}&password={password}".encode()
    start = time.monotonic()
    status = get(url + "login", {**headers, "Content-Type": "application/x-www-form-urlencoded"}, "POST", body)[0]
    return status, time.monotonic() - start


def test_login_page_leaks_nothing_and_failed_logins_are_slowed(tmp_path):
    data = configured(tmp_path)
    secret = tmp_path / "login.txt"
    secret.write_text("ann:s3cret-Pass\n")
    with launched(data, "--listen", "--auth-file", str(secret)) as app:
        url, headers = app["url"], app["headers"]
        status, _, page = get(url, {**headers, "Accept": "text/html"})
        text = page.decode()
        assert status == 200 and "password" in text and len(page) < 4000
        for marker in ("gradio_api_info", "dependencies", "models_inspect", str(data), "/tmp/", "/work/"):
            assert marker not in text, marker
        for path in ("config", "gradio_api/info", "gradio_api/openapi.json", "theme.css"):
            status, _, body = get(url + path, headers)
            assert status == 401 and b"models_inspect" not in body, path
        times = [login(url, headers, "ann", f"wrong{i}") for i in range(7)]
        assert all(s == 400 for s, _ in times)
        assert times[0][1] < 0.5 and times[-1][1] >= 0.7 and sum(t for _, t in times) >= 1.4   # 0.1, 0.2, 0.4, 0.8
        status, took = login(url, headers, "ann", "s3cret-Pass")
        assert status == 200 and took < 1.0         # the right password is never slowed
        assert "s3cret-Pass" not in " ".join(app["proc"].args)     # not on the command line (ps)


def test_the_password_from_qis_auth_works_and_argv_stays_clean(tmp_path):
    data = configured(tmp_path)
    with launched(data, "--listen", env={"QIS_AUTH": "bob:env-Pass"}) as app:
        assert login(app["url"], app["headers"], "bob", "env-Pass")[0] == 200
        assert login(app["url"], app["headers"], "bob", "nope")[0] == 400
        assert "env-Pass" not in " ".join(app["proc"].args)


def test_listen_requires_the_token_too(tmp_path):
    """A login is not enough: every route but the password check itself still needs the token."""
    data = configured(tmp_path)
    with launched(data, "--listen", env={"QIS_AUTH": "bob:env-Pass"}) as app:
        body = b"username=bob&password=env-Pass"
        status, headers, _ = get(app["url"] + "login", {"Content-Type": "application/x-www-form-urlencoded"},
                                 "POST", body)
        session = "; ".join(c.split(";")[0] for c in headers.get_all("Set-Cookie"))
        assert status == 200 and "access-token" in session
        assert get(app["url"] + "config", {"Cookie": session})[0] == 401
        assert get(app["url"] + "config", {**auth_headers("x" * 43), "Cookie": session})[0] == 401
        assert get(app["url"] + "config", {**app["headers"], "Cookie": session})[0] == 200


@pytest.mark.browser
def test_a_browser_opens_the_printed_address_and_the_token_leaves_the_address_bar(studio):
    from playwright.sync_api import expect

    with browser_page() as page:
        page.goto(studio["url"])                                  # without the token: our page, not the app
        expect(page.get_by_text("needs its access token")).to_be_visible()
        page.goto(studio["open_url"])
        expect(page.get_by_role("tab", name="Models")).to_be_visible(timeout=60_000)
        assert studio["token"] not in page.url and page.url.rstrip("/") == studio["url"].rstrip("/")
        cookie = next(c for c in page.context.cookies() if c["name"].startswith("qis-token-"))
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.reload()                                             # the cookie carries on without the token
        expect(page.get_by_role("tab", name="Jobs")).to_be_visible(timeout=60_000)


@pytest.mark.browser
def test_a_browser_logs_in_through_the_login_page(tmp_path):
    from playwright.sync_api import expect

    data = configured(tmp_path)
    secret = tmp_path / "login.txt"
    secret.write_text("ann:s3cret-Pass\n")
    with launched(data, "--listen", "--auth-file", str(secret)) as app, browser_page() as page:
        page.goto(app["open_url"])
        page.get_by_label("User").fill("ann")
        page.get_by_label("Password").fill("wrong")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_text("Wrong user or password.")).to_be_visible()
        page.get_by_label("Password").fill("s3cret-Pass")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("tab", name="Models")).to_be_visible(timeout=60_000)
