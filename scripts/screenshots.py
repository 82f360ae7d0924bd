"""Refresh the README's screenshots: start the Studio on the demo models and photograph every tab.

    .venv/bin/python scripts/screenshots.py            # writes docs/screenshot-<tab>.png

Needs Debian's chromium (`apt-get install -y chromium`). The Studio runs on a throw-away data folder, so the
pictures show exactly what a newcomer sees after `./studio.sh --demo`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


PRINTED_URL = re.compile(r"http://127\.0\.0\.1:\d+/\?token=[A-Za-z0-9_-]+")


def printed_url(proc: subprocess.Popen) -> str:
    """The address launch.py prints once it serves (it carries the launch's access token)."""
    for line in proc.stdout:
        print(line, end="")
        match = PRINTED_URL.search(line)
        if match:
            return match.group(0)
    raise SystemExit(f"the Studio exited (code {proc.wait()}) without printing its address")


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def photograph(url: str, out_dir: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        tabs = page.get_by_role("tab")
        tabs.first.wait_for()
        for label in [t.inner_text().strip() for t in tabs.all()]:
            page.get_by_role("tab", name=label, exact=True).click()
            page.wait_for_timeout(1500)               # let the tab's first refresh land
            shot = out_dir / f"screenshot-{slug(label)}.png"
            page.screenshot(path=str(shot), full_page=True)
            shots.append(shot)
        browser.close()
    return shots


def main() -> int:
    port = 7960
    with tempfile.TemporaryDirectory() as data_dir:
        proc = subprocess.Popen([sys.executable, "launch.py", "--demo", "--no-browser", "--port", str(port),
                                 "--data_dir", data_dir], cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            url = printed_url(proc)
            for shot in photograph(url, REPO / "docs"):
                print(shot.relative_to(REPO))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
