"""Start Qwen-Image Studio: `python launch.py` serves on 127.0.0.1 and opens the browser.

With no models configured (or with --demo) it uses the tiny demo model set, built once by the engine.
Like Jupyter, every launch makes a random access token: the address printed (and opened) is
`http://127.0.0.1:PORT/?token=...`; scripts send `Authorization: token <token>` (docs/security.md).
Binding to anything but loopback needs a login too (--auth-file PATH, QIS_AUTH or --auth USER:PASS). Engine
jobs run as their own processes: they keep running if this process exits, and the next start re-attaches.
"""

from __future__ import annotations

import argparse
import html
import ipaddress
import os
import sys
import webbrowser
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "studio_data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python launch.py", description="Qwen-Image Studio (Gradio GUI).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: loopback only).")
    p.add_argument("--port", type=int, default=None, help="Port (default: the first free one from 7860).")
    p.add_argument("--listen", action="store_true", help="Bind 0.0.0.0 (all interfaces); needs --auth.")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="Login for the web page. Any user of this machine can read a command line (ps): "
                        "prefer --auth-file or the QIS_AUTH environment variable.")
    p.add_argument("--auth-file", dest="auth_file", default=None, metavar="PATH",
                   help="Read USER:PASS from the first line of this file.")
    p.add_argument("--no-token", dest="token", action="store_false",
                   help="Serve without the per-launch access token (loopback only; refused with --listen). Any "
                        "program of any user on this machine can then drive the app.")
    p.add_argument("--no-browser", dest="browser", action="store_false", help="Do not open a browser tab.")
    p.add_argument("--demo", action="store_true", help="Pre-fill every tab with the tiny demo models "
                                                       "(built once; no downloads, no GPU).")
    p.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR),
                   help="Folder for settings.json, jobs/ and the demo (default: studio_data/ beside launch.py).")
    return p.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth / --auth-file / QIS_AUTH must look like USER:PASSWORD (both non-empty).")
    return user, password


def read_auth(args: argparse.Namespace) -> tuple[str, str] | None:
    """The login from --auth, --auth-file or QIS_AUTH. QIS_AUTH is removed from the environment once read, so the
    engine processes this one starts do not inherit the password."""
    from_env = os.environ.pop("QIS_AUTH", None)
    if args.auth_file:
        try:
            lines = Path(args.auth_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read --auth-file {args.auth_file} ({e}).\n  fix: give a text file "
                             "whose first line is USER:PASSWORD.") from None
        return parse_auth((lines[0].strip() if lines else "") or ":")   # an empty file is an error, not "no login"
    return parse_auth(args.auth or from_env)


def private_dir(path: Path) -> Path:
    """A folder only this user can enter (0700), for gradio's uploads and the browser's start page."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def open_browser(url: str, folder: Path) -> None:
    """Open the tokenized address without putting the token on another process's command line (which `ps` shows
    to every user): the browser gets a 0600 file that forwards to the address."""
    page = folder / "open.html"
    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f'<!doctype html><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
                 f'<meta http-equiv="refresh" content="0;url={html.escape(url)}">'
                 f'<a href="{html.escape(url)}">Open Qwen-Image Studio</a>\n')
    os.chmod(page, 0o600)
    webbrowser.open(page.as_uri())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = "0.0.0.0" if args.listen else args.host
    auth = read_auth(args)
    if not is_loopback(host) and not args.token:
        print(f"error: --no-token cannot be used with --listen / --host {host}: anyone on the network could run "
              "jobs and read files here.\n  fix: drop --no-token (the address printed at start carries the token), "
              "or serve on 127.0.0.1 only.", file=sys.stderr)
        return 2
    if not is_loopback(host) and auth is None:
        print(f"error: refusing to serve on {host} without a login: anyone on the network could run jobs and "
              "read files here.\n  fix: add --auth-file PATH (a file holding USER:PASSWORD; or set QIS_AUTH), or drop "
              "--listen/--host to stay on 127.0.0.1.", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).expanduser().resolve()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # gradio keeps uploads and served copies here: inside the data dir, readable by this user only
    os.environ["GRADIO_TEMP_DIR"] = str(private_dir(data_dir / "uploads"))
    from app.context import open_context   # imported late: --help and the checks above stay instant
    from app.jobs import JobDirBusy
    from app.main import launch
    from app.security import new_token

    try:
        ctx = open_context(args.data_dir, demo=args.demo)
    except JobDirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    token = new_token() if args.token else None
    try:
        demo = launch(ctx, token, host=host, port=args.port, auth=auth)
        url = f"http://127.0.0.1:{demo.server_port}/" + (f"?token={token}" if token else "")
        print(f"[studio] Qwen-Image Studio is running. Open it with this address:\n\n    {url}\n", flush=True)
        if token:
            print("[studio] scripts and gradio_client send the header  Authorization: token <the token above>",
                  flush=True)
        if args.browser:
            open_browser(url, private_dir(ctx.data_dir / "private"))
        demo.block_thread()
    finally:
        ctx.jobs.close()   # stop following jobs; the jobs themselves keep running
    return 0


if __name__ == "__main__":
    sys.exit(main())
