"""The Models tab in a real browser (Playwright driving Debian's chromium; `.ci/run` installs it)."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from _app_util import REPO, browser_page, kill_jobs, start_slow_job, studio  # noqa: F401  (studio is a fixture)

pytestmark = pytest.mark.browser


@pytest.fixture
def page():
    with browser_page() as page:
        yield page


def test_models_tab_inspects_the_demo_models(studio, page, tmp_path):
    from playwright.sync_api import expect

    outside = []     # the app must work air-gapped: no fonts, scripts or analytics from the internet
    page.on("request", lambda r: None if r.url.startswith((studio["url"], "data:", "blob:")) else outside.append(r.url))
    page.goto(studio["open_url"])
    page.get_by_role("tab", name="Models").click()
    dit_box = page.locator("#model-dit textarea, #model-dit input").first
    expect(dit_box).to_have_value(studio["manifest"]["dit"]["original"])     # pre-filled with the demo
    page.locator("#models-inspect").click()
    table = page.locator("#models-table")
    expect(table).to_contain_text("qwen_image_demo_bf16.safetensors", timeout=60_000)
    rows = table.get_by_role("row")
    dit = rows.filter(has_text="qwen_image_demo_bf16.safetensors")
    expect(dit.get_by_role("gridcell", name="dit", exact=True)).to_be_visible()
    expect(dit.get_by_role("gridcell", name="original", exact=True)).to_be_visible()
    vae = rows.filter(has_text="qwen_image_vae_demo.safetensors")
    expect(vae.get_by_role("gridcell", name="vae", exact=True)).to_be_visible()

    assert outside == []

    shot = tmp_path / "screenshot-models.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("QIS_UPDATE_SCREENSHOTS") == "1":   # refresh the README's picture on request only
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "screenshot-models.png")


def test_jobs_tab_shows_a_running_job_after_a_reload(studio, page, tmp_path):
    from gradio_client import Client
    from playwright.sync_api import expect

    page.goto(studio["open_url"])
    page.get_by_role("tab", name="Jobs").click()
    start_slow_job(Client(studio["url"], headers=studio["headers"], verbose=False), tmp_path)   # a script's job
    try:
        rows = page.locator("#jobs-table").get_by_role("row")
        running = rows.filter(has_text="slow_job").filter(has_text="running")
        expect(running).to_have_count(1, timeout=30_000)
        page.reload()                                   # the browser session ends; the job does not
        page.get_by_role("tab", name="Jobs").click()
        expect(running).to_have_count(1, timeout=30_000)
        expect(page.locator("#jobs-status")).to_contain_text("running", timeout=30_000)   # shown by default
        expect(page.locator("#jobs-command input, #jobs-command textarea").first).to_have_value(
            re.compile(r"-m qis_fake_engine cache_latents .*--dataset_config \S*slow_job.toml"))
        page.locator("#jobs-stop").click()
        expect(running).to_have_count(0, timeout=30_000)
        expect(page.locator("#jobs-status")).to_contain_text("stopped", timeout=30_000)
    finally:        # a failure must not leave it holding the GPU slot for the tests after this one
        kill_jobs(studio["data_dir"])
