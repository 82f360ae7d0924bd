"""Measure the GUI as a workflow: actions, page heights and idle CPU, on the demo, in headless chromium.

    .venv/bin/python scripts/measure_workflow.py [--demo_dir DIR] [--cpu_seconds 30] [--json out.json]

What it measures, at a 1400x900 window, on a fresh data dir with the demo models (the real engine runs the jobs):
- LoRA journey: actions (clicks, dropdown choices and fields typed) from a folder of captioned images (a copy of the
  demo's text-to-image images) to a LoRA training that is running (its status shows "running" with a step).
- Edit journey: actions from the Generate tab to an edited image with a painted mask (upload an image, type a
  prompt, paint one stroke, Generate, wait for the result).
- Where the Start / Generate button ends, in page pixels from the top (<= 900: visible without scrolling).
- Idle CPU of the server (with its children) and of the browser over N seconds, the page open and nothing running.

The page differs before and after the workflow redesign; the script detects which one it drives (the Train tab's
dataset picker exists only after) and walks the same journey through it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from _app_util import BROWSER_ARGS, CHROMIUM, free_port, kill_jobs, paint_stroke, wait_printed_url  # noqa: E402

VIEWPORT = {"width": 1400, "height": 900}


class Counter:
    """Counts what a person does: a click, a dropdown choice, a field typed, a stroke painted."""

    def __init__(self):
        self.steps: list[str] = []

    def __call__(self, what: str) -> None:
        self.steps.append(what)


def box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def fill(page, count, elem_id: str, value: str) -> None:
    box(page, elem_id).fill(value)
    box(page, elem_id).press("Tab")
    count(f"type {elem_id}")


def click(page, count, selector: str, what: str | None = None) -> None:
    page.locator(selector).first.click()
    count(what or f"click {selector}")


def tab(page, count, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    count(f"tab {name}")


def choose(page, count, elem_id: str, value: str) -> None:
    """A dropdown choice (one action: open and pick)."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=value, exact=True).click()
    count(f"choose {elem_id}={value}")


def is_after(page) -> bool:
    """Whether the page has the redesigned Train tab (its dataset picker), read from gradio's page config
    (tabs not yet opened are not in the DOM)."""
    return page.evaluate("() => (window.gradio_config?.components || [])"
                         ".some(c => c.props?.elem_id === 'train-dataset-pick')")


# ---------------------------------------------------------------------------------------------- journeys

def lora_journey(page, url: str, folder: Path) -> dict:
    from playwright.sync_api import expect

    count = Counter()
    page.goto(url)
    page.wait_for_selector("#models-inspect", state="attached")
    t0 = time.monotonic()
    tab(page, count, "Dataset")
    fill(page, count, "dataset-folder", str(folder))
    if not is_after(page):
        fill(page, count, "dataset-controls", "")        # the demo's control folder stays otherwise
        choose(page, count, "dataset-model_version", "original")
        fill(page, count, "dataset-name", "my_lora_data")
        click(page, count, "#dataset-import", "Import")
        expect(page.locator("#dataset-summary")).to_contain_text("Ready", timeout=120_000)
        saved = box(page, "dataset-save-path").input_value()
        click(page, count, "#dataset-save", "Save dataset config")
        expect(page.locator("#dataset-message")).to_contain_text("Saved", timeout=60_000)
        tab(page, count, "Cache")
        choose(page, count, "cache-model_version", "original")
        click(page, count, "#cache-both", "Cache both")
        expect(page.locator("#cache-progress")).to_contain_text("done", timeout=300_000)
        expect(page.locator("#cache-progress")).not_to_contain_text("running", timeout=300_000)
        tab(page, count, "Train")
        if box(page, "train-dataset_config").input_value() != saved:    # the hand-off did not arrive: type it
            fill(page, count, "train-dataset_config", saved)
        click(page, count, "#train-start", "Start training")
    else:
        try:               # the model version follows the folder's layout (no control folder: text-to-image)
            expect(box(page, "dataset-model_version")).to_have_value("original", timeout=15_000)
        except AssertionError:
            choose(page, count, "dataset-model_version", "original")
        expect(box(page, "dataset-controls")).to_have_value("", timeout=15_000)
        click(page, count, "#dataset-import", "Import")
        expect(page.locator("#dataset-summary")).to_contain_text("Ready", timeout=120_000)
        click(page, count, "#dataset-train-on-it", "Train on it")   # saves the config and opens the Train tab
        expect(page.locator("#train-dataset-status")).to_contain_text("missing", timeout=60_000)
        click(page, count, "#train-start", "Start training")           # caching is queued first
    expect(page.locator("#train-status")).to_contain_text("running", timeout=300_000)
    expect(page.locator("#train-progress")).to_contain_text("step", timeout=300_000)
    return {"actions": len(count.steps), "steps": count.steps, "seconds": round(time.monotonic() - t0, 1)}


def edit_journey(page, url: str, image: Path, steps: int | None = None) -> dict:
    """`steps`: a test's shortcut to a faster run (set without counting it as an action)."""
    from playwright.sync_api import expect

    count = Counter()
    page.goto(url)
    page.wait_for_selector("#models-inspect", state="attached")
    t0 = time.monotonic()
    tab(page, count, "Generate / Edit")
    editor = page.locator("#generate-control1")
    # the upload lands on the server, then the editor's new value reaches the mask preview (which says there is
    # no mask yet): only then is the new picture on the canvas, and a stroke made before would be wiped with it
    with page.expect_response(lambda r: "/upload" in r.url and r.request.method == "POST", timeout=60_000):
        editor.locator("input[type=file]").first.set_input_files(str(image))
    count("upload control image 1")
    expect(page.locator("#generate-mask-info")).to_contain_text("No mask painted", timeout=60_000)
    page.wait_for_timeout(1000)       # the painter fits the image to its canvas after loading it
    fit_picture(page, count, editor)
    fill(page, count, "generate-prompt", "make the circle blue")
    paint_stroke(page, editor)
    count("paint a stroke")
    expect(page.locator("#generate-mask-info")).to_contain_text("of the image may change", timeout=60_000)
    if steps:
        box(page, "generate-infer_steps").fill(str(steps))
        box(page, "generate-infer_steps").press("Tab")
    shown = page.locator("#generate-status [data-job]")      # the page reopens on the last run, which may be done
    before = shown.first.get_attribute("data-job") if shown.count() else None
    click(page, count, "#generate-run", "Generate")
    this_run = '#generate-status [data-status="done"]' + (f':not([data-job="{before}"])' if before else "")
    expect(page.locator(this_run)).to_have_count(1, timeout=600_000)
    expect(page.locator("#generate-gallery img").first).to_be_visible(timeout=60_000)
    return {"actions": len(count.steps), "steps": count.steps, "seconds": round(time.monotonic() - t0, 1)}


def fit_picture(page, count, editor) -> None:
    """When the browser is starved for CPU, gradio's painter can fit a new picture before its canvas has its size
    and leave it small in a corner, where a stroke at the canvas's centre misses it. A person then picks "Fit to
    screen" from the zoom menu; it is counted only when it changed the zoom (otherwise nobody would have needed it)."""
    import re

    zoom = editor.get_by_text(re.compile(r"^\s*\d+%\s*$")).first
    before = zoom.inner_text().strip()
    zoom.click()
    editor.get_by_text("Fit to screen").click()
    page.wait_for_timeout(500)
    after = zoom.inner_text().strip()
    if after != before:
        count("fit the picture to the canvas")


def button_bottom(page, url: str, tab_name: str, selector: str, shot: str | None = None) -> float:
    """Where the button's lower edge is, in page pixels from the top, right after opening the tab."""
    page.goto(url)
    page.wait_for_selector("#models-inspect", state="attached")
    page.get_by_role("tab", name=tab_name).click()
    page.locator(selector).first.wait_for(state="visible")
    page.wait_for_timeout(1000)
    if shot:
        page.screenshot(path=shot)           # the first screen, as a person sees it
    return page.evaluate("(s) => { const r = document.querySelector(s).getBoundingClientRect();"
                         " return r.bottom + window.scrollY; }", selector)


# ---------------------------------------------------------------------------------------------- CPU

def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def browser_procs(server: psutil.Process) -> list[psutil.Process]:
    """Chromium's processes: this script's descendants named chrom*, outside the server's tree."""
    skip = {p.pid for p in tree(server)}
    return [c for c in psutil.Process().children(recursive=True)
            if c.pid not in skip and "chrom" in c.name().lower()]


def idle_cpu(server: psutil.Process, url: str, page, seconds: float) -> dict:
    """Average CPU (% of one core) of the server and the browser while the page sits idle on its first tab, and
    the browser's own cost with a blank page for comparison (headless chromium is not free on a busy machine)."""
    page.goto("about:blank")
    page.wait_for_timeout(3000)
    b_procs = browser_procs(server)
    b0, t0 = cpu_seconds(b_procs), time.monotonic()
    page.wait_for_timeout(seconds * 1000)
    blank = (cpu_seconds(b_procs) - b0) / (time.monotonic() - t0) * 100
    page.goto(url)
    page.wait_for_selector("#models-inspect", state="attached")
    page.wait_for_timeout(5000)                 # let the page settle after loading
    s_procs, b_procs = tree(server), browser_procs(server)
    s0, b0, t0 = cpu_seconds(s_procs), cpu_seconds(b_procs), time.monotonic()
    page.wait_for_timeout(seconds * 1000)
    dt = time.monotonic() - t0
    s1, b1 = cpu_seconds(s_procs), cpu_seconds(b_procs)
    return {"server_pct": round((s1 - s0) / dt * 100, 2), "browser_pct": round((b1 - b0) / dt * 100, 2),
            "browser_blank_page_pct": round(blank, 2), "seconds": round(dt, 1)}


# ---------------------------------------------------------------------------------------------- setup

def ensure_demo(demo_dir: Path) -> dict:
    if not (demo_dir / "demo.json").exists():
        subprocess.run([sys.executable, "-m", "engine", "make_demo", str(demo_dir)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    return json.loads((demo_dir / "demo.json").read_text())


def start_server(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "GRADIO_TEMP_DIR": str(data_dir.parent / "gradio")}
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "launch.py", "--demo", "--no-browser", "--port", str(port),
                             "--data_dir", str(data_dir)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url, _ = wait_printed_url(log_path, proc)     # the address launch.py prints, with its access token
    return proc, url


def stop_server(proc: subprocess.Popen, data_dir: Path) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    kill_jobs(data_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo_dir", default=str(Path(tempfile.gettempdir()) / "qis_measure_demo"))
    ap.add_argument("--cpu_seconds", type=float, default=30.0)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--screenshots", default=None, help="save the first screen of Train and Generate here")
    ap.add_argument("--skip", nargs="*", default=[], choices=["lora", "edit", "heights", "cpu"])
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    demo_dir = Path(args.demo_dir).resolve()
    manifest = ensure_demo(demo_dir)
    base = Path(tempfile.mkdtemp(prefix="qis_measure_"))
    data_dir = base / "data"
    data_dir.mkdir()
    (data_dir / "demo").symlink_to(demo_dir, target_is_directory=True)
    folder = base / "my_photos"                       # a person's folder: images + captions, no control folder
    shutil.copytree(manifest["dataset"]["images"], folder)
    image = Path(manifest["examples"]["control"])
    proc, url = start_server(data_dir, base / "launch.log")
    figures: dict = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.wait_for_selector("#models-inspect", state="attached")
            figures["ui"] = "after" if is_after(page) else "before"
            if "cpu" not in args.skip:
                figures["idle_cpu"] = idle_cpu(psutil.Process(proc.pid), url, page, args.cpu_seconds)
            shots = Path(args.screenshots) if args.screenshots else None
            if shots:
                shots.mkdir(parents=True, exist_ok=True)
            if "heights" not in args.skip:
                figures["train_start_bottom_px"] = button_bottom(page, url, "Train", "#train-start",
                                                                 shots and str(shots / "train.png"))
                figures["generate_button_bottom_px"] = button_bottom(page, url, "Generate / Edit", "#generate-run",
                                                                     shots and str(shots / "generate.png"))
            for name, journey, arg in (("edit", edit_journey, image), ("lora", lora_journey, folder)):
                if name in args.skip:
                    continue
                try:
                    figures[f"{name}_journey"] = journey(page, url, arg)
                except Exception:
                    if shots:
                        page.screenshot(path=str(shots / f"{name}-failed.png"), full_page=True)
                    raise
            browser.close()
    finally:
        stop_server(proc, data_dir)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    shutil.rmtree(base, ignore_errors=True)
    return 0 if figures else 1


if __name__ == "__main__":
    sys.exit(main())
