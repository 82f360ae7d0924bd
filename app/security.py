"""The guard in front of every route of the Gradio app: an ASGI middleware, the way Jupyter's server protects a
local notebook.

Why: a server on 127.0.0.1 is reachable by every web page the person visits (the browser sends the requests)
and by every other user of the machine. Without a guard any page could drive the app through DNS rebinding (a
hostile name that resolves to 127.0.0.1, so the browser sends `Host: evil.example`) or a cross-origin POST, and
the app starts engine processes and reads files. So, for every HTTP request and websocket:

1. Host: when bound to loopback, the `Host` header must name a loopback address (localhost, 127.0.0.0/8, [::1],
   with any port). Anything else is 403: that is the DNS-rebinding precondition.
2. Origin: a state-changing request (any method but GET/HEAD/OPTIONS) and every websocket must come from the
   app's own origin: `Origin`, when sent, equals `http://<Host>`; `Sec-Fetch-Site` other than same-origin/none
   is refused. 403.
3. Token: a per-launch random token (secrets.token_urlsafe) is required on every route, static files included.
   It is accepted as `Authorization: token <t>` (or `Bearer <t>`; scripts, gradio_client), as the HttpOnly,
   SameSite=Strict cookie set when the page was opened with `?token=<t>`, or as `?token=<t>` itself. A page
   opened with `?token=` gets the cookie and is sent on to the same address without the token (so it does not
   stay in the address bar or the history). Compared in constant time; wrong tokens are throttled.
4. Login (`--auth`): until gradio's session cookie is valid, the only things served are our own login page
   (no API description, no paths, no config) and gradio's POST /login, whose failures are throttled. POST
   /login is the one route that does not need the token (gradio_client sends it without its headers); it
   only answers whether a password is right, and the Host and Origin checks still apply to it.

A refused request gets a short page or JSON saying what to do, never the API description or a path.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import ipaddress
import json
import secrets
import time
import urllib.parse
from collections import defaultdict, deque

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAME_SITE_FETCH = frozenset({"same-origin", "none"})
LOGIN_PATHS = frozenset({"/login", "/login/"})
# gradio's launch() itself GETs this (without our token) to run its start-up hooks once; the answer is a bare
# true/false and calling it again does nothing, so it is the one route without the token
NO_TOKEN_GET = frozenset({"/gradio_api/startup-events"})
TOKEN_PARAM = "token"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cookie_name(port: int | None) -> str:
    """One cookie per port: cookies ignore ports, and two Studios on one machine must not evict each other."""
    return f"qis-token-{port}" if port else "qis-token"


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> str:
    """The host part of a `Host` header value: `[::1]:7860` -> `::1`, `localhost:7860` -> `localhost`."""
    value = value.strip()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Throttle:
    """Slows repeated failures from one client: after `free` failures within `window_s`, each further failure is
    answered only after a delay that doubles (up to `max_delay_s`), one at a time, so parallel guessing does not
    help. Successful requests are never delayed."""

    def __init__(self, free: int = 3, window_s: float = 60.0, base_delay_s: float = 0.1, max_delay_s: float = 2.0):
        self.free, self.window_s, self.base, self.max = free, window_s, base_delay_s, max_delay_s
        self._failures: dict[str, deque] = defaultdict(deque)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def delay_for(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        times = self._failures[key]
        while times and now - times[0] > self.window_s:
            times.popleft()
        over = len(times) - self.free
        return 0.0 if over <= 0 else min(self.base * 2 ** (over - 1), self.max)

    async def failed(self, key: str) -> None:
        self._failures[key].append(time.monotonic())
        delay = self.delay_for(key)
        if delay:
            async with self._locks[key]:
                await asyncio.sleep(delay)


class Guard:
    """ASGI middleware (see the module docstring). `token=None` turns the token off (--no-token, loopback only);
    `loopback_only` turns the Host check on; `auth` says gradio was given a login."""

    def __init__(self, app, token: str | None, loopback_only: bool = True, auth: bool = False,
                 throttle: Throttle | None = None):
        self.app, self.token, self.loopback_only, self.auth = app, token, loopback_only, auth
        self.throttle = throttle or Throttle()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self.refusal(request)
        # with a login, gradio's POST /login is a credential check of its own (throttled below): gradio_client
        # sends it without its other headers, so it cannot carry the token
        exempt = (request.method == "GET" and request.path in NO_TOKEN_GET) or (self.auth and request.is_login_post())
        if refusal is None and self.token is not None and not exempt:
            refusal = await self.check_token(request, scope, receive, send)
            if refusal == "answered":
                return
        if refusal is None and self.auth and not (exempt or request.logged_in() or request.is_login_post()):
            refusal = (401, "login", "Log in first.")
        if refusal is not None:
            await refuse(request, scope, receive, send, *refusal)
            return
        if self.auth and request.is_login_post():
            send = self.throttled_login(request, send)
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> tuple[int, str, str] | None:
        """Host and origin checks (1 and 2 in the module docstring)."""
        if self.loopback_only and not is_loopback_host(split_host(request.host)):
            return 403, "host", (f"This address ({request.host or 'no Host header'}) is not this computer. "
                                 "Qwen-Image Studio answers only http://127.0.0.1 or http://localhost.")
        if request.websocket or request.upgrade or request.method not in SAFE_METHODS:
            site = request.header("sec-fetch-site")
            origin = request.header("origin")
            if site and site not in SAME_SITE_FETCH:
                return 403, "origin", "Requests from other web sites are refused."
            if origin is not None and not same_origin(origin, request):
                return 403, "origin", "Requests from other web sites are refused."
        return None

    async def check_token(self, request: Request, scope, receive, send) -> tuple[int, str, str] | str | None:
        given, where = request.token_given(cookie_name(request.port))
        if given is None:
            return 401, "token", "This Qwen-Image Studio needs its access token."
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            await self.throttle.failed(request.client)
            return 401, "token", "The access token is wrong."
        if where == "query" and request.method == "GET" and request.wants_page():
            await send_page(send, 200, "Opening Qwen-Image Studio",
                            "<p>Opening Qwen-Image Studio…</p>", refresh_to=request.path_without_token(),
                            cookie=f"{cookie_name(request.port)}={self.token}; Path=/; HttpOnly; SameSite=Strict")
            return "answered"
        return None

    def throttled_login(self, request: Request, send):
        async def send_after_delay(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                await self.throttle.failed("login:" + request.client)
            await send(message)
        return send_after_delay


class Request:
    """The parts of an ASGI scope the guard reads."""

    def __init__(self, scope):
        self.scope = scope
        self.headers = {}
        for k, v in scope.get("headers") or []:
            self.headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        self.method = scope.get("method", "GET")
        self.websocket = scope["type"] == "websocket"
        self.upgrade = "upgrade" in self.headers      # a handshake (websocket) the server may not speak: same rule
        self.path = scope.get("path", "/")
        self.query = urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        self.client = (scope.get("client") or ("?", 0))[0]
        self.port = (scope.get("server") or (None, None))[1]

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def host(self) -> str:
        return self.headers.get("host", "")

    def cookies(self) -> dict[str, str]:
        out = {}
        for part in self.headers.get("cookie", "").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep:
                out.setdefault(name, value)
        return out

    def token_given(self, cookie: str) -> tuple[str | None, str]:
        scheme, _, value = self.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip(), "header"
        for name, value in self.query:
            if name == TOKEN_PARAM:
                return value, "query"
        if cookie in self.cookies():
            return self.cookies()[cookie], "cookie"
        return None, ""

    def wants_page(self) -> bool:
        """A browser navigation (an HTML page), not an API call or an asset."""
        return self.header("sec-fetch-mode") == "navigate" or "text/html" in self.headers.get("accept", "")

    def path_without_token(self) -> str:
        rest = [(k, v) for k, v in self.query if k != TOKEN_PARAM]
        path = "/" + self.path.lstrip("/")      # never `//host/...`: that would send the browser to another site
        return urllib.parse.quote(path) + ("?" + urllib.parse.urlencode(rest) if rest else "")

    def logged_in(self) -> bool:
        """gradio's own session check (its /login sets `access-token[-unsecure]-<cookie_id>`)."""
        app = self.scope.get("app")
        tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
        if tokens is None or cookie_id is None:
            return False
        jar = self.cookies()
        value = jar.get(f"access-token-{cookie_id}") or jar.get(f"access-token-unsecure-{cookie_id}")
        return value is not None and value in tokens

    def is_login_post(self) -> bool:
        return self.method == "POST" and self.path in LOGIN_PATHS


def same_origin(origin: str, request: Request) -> bool:
    parsed = urllib.parse.urlsplit(origin)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return False        # includes "null" (sandboxed frames, file:// pages)
    default = {"http": ":80", "https": ":443"}[parsed.scheme]
    own = request.host.lower().removesuffix(default)
    return parsed.netloc.lower().removesuffix(default) == own


# ---------------------------------------------------------------------------------------------- answers

TOKEN_HELP = ("<p>Open the address printed in the terminal where Studio was started "
              "(<code>http://127.0.0.1:PORT/?token=…</code>). Scripts and gradio_client send the header "
              "<code>Authorization: token &lt;token&gt;</code>.</p>")

LOGIN_FORM = """<form id="login" method="post" action="login">
<p><label>User <input name="username" autocomplete="username" required></label></p>
<p><label>Password <input name="password" type="password" autocomplete="current-password" required></label></p>
<p><button type="submit">Log in</button> <span id="said" role="alert"></span></p></form>
<script>
document.getElementById("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  const said = document.getElementById("said");
  said.textContent = "checking…";
  const form = new URLSearchParams(new FormData(e.target));
  const r = await fetch("login", {method: "POST", body: form, credentials: "same-origin"});
  if (r.ok) { location.reload(); } else { said.textContent = "Wrong user or password."; }
});
</script>"""


async def refuse(request: Request, scope, receive, send, status: int, kind: str, message: str) -> None:
    if request.websocket:
        await receive()                                   # the websocket.connect message
        await send({"type": "websocket.close", "code": 1008})
        return
    if kind == "login" and request.method == "GET" and request.wants_page():
        await send_page(send, 200, "Log in: Qwen-Image Studio", LOGIN_FORM)
        return
    if request.wants_page():
        body = f"<p>{html.escape(message)}</p>" + (TOKEN_HELP if kind == "token" else "")
        await send_page(send, status, "Qwen-Image Studio", body)
        return
    hint = {"token": "Send the header `Authorization: token <token>` (the token is in the URL printed at start).",
            "login": "POST /login with username and password first (gradio_client: auth=(user, password)).",
            }.get(kind, "")
    await send_bytes(send, status, json.dumps({"error": message, "kind": kind, "hint": hint}).encode(),
                     "application/json")


async def send_page(send, status: int, title: str, body: str, refresh_to: str | None = None,
                    cookie: str | None = None) -> None:
    head = f'<meta http-equiv="refresh" content="0;url={html.escape(refresh_to)}">' if refresh_to else ""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{head}"
            "<meta name='referrer' content='no-referrer'></head>"
            f"<body style='font-family:system-ui,sans-serif;max-width:40em;margin:3em auto'>"
            f"<h1>{html.escape(title)}</h1>{body}</body></html>")
    await send_bytes(send, status, page.encode(), "text/html; charset=utf-8", cookie)


async def send_bytes(send, status: int, body: bytes, content_type: str, cookie: str | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"),
               (b"x-content-type-options", b"nosniff")]
    if cookie:
        headers.append((b"set-cookie", cookie.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
