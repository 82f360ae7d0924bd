"""Start Qwen-Image Studio: `python launch.py` serves on 127.0.0.1 and opens the browser.

With no models configured (or with --demo) it uses the tiny demo model set, built once by the engine.
Binding to anything but loopback needs credentials (--auth user:pass or QIS_AUTH). Engine jobs run as
their own processes: they keep running if this process exits, and the next start re-attaches to them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "studio_data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python launch.py", description="Qwen-Image Studio (Gradio GUI).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: loopback only).")
    p.add_argument("--port", type=int, default=None, help="Port (default: the first free one from 7860).")
    p.add_argument("--listen", action="store_true", help="Bind 0.0.0.0 (all interfaces); needs --auth.")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="Login for the web page. Also read from the QIS_AUTH environment variable.")
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
        raise SystemExit("error: --auth / QIS_AUTH must look like USER:PASSWORD (both non-empty).")
    return user, password


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = "0.0.0.0" if args.listen else args.host
    auth = parse_auth(args.auth or os.environ.get("QIS_AUTH"))
    if not is_loopback(host) and auth is None:
        print(f"error: refusing to serve on {host} without a login: anyone on the network could run jobs and "
              "read files here.\n  fix: add --auth USER:PASSWORD (or set QIS_AUTH=USER:PASSWORD), or drop "
              "--listen/--host to stay on 127.0.0.1.", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.context import open_context   # imported late: --help and the checks above stay instant
    from app.jobs import JobDirBusy
    from app.main import launch

    try:
        ctx = open_context(args.data_dir, demo=args.demo)
    except JobDirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        launch(ctx, host=host, port=args.port, inbrowser=args.browser, auth=auth)
    finally:
        ctx.jobs.close()   # stop following jobs; the jobs themselves keep running
    return 0


if __name__ == "__main__":
    sys.exit(main())
