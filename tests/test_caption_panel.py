"""The Dataset tab's caption panel in chromium: the demo text encoder writes proposals for the images without a
caption, one is edited and accepted, the rest accepted at once, and the caption files on disk say so; the
captions the person wrote are untouched and nothing is written before consent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _app_util import browser_page, studio  # noqa: F401  (studio is a fixture)

from engine.spec.dataset import captions as C

pytestmark = pytest.mark.browser
NEW = ("shapes_00", "shapes_01", "shapes_02")


@pytest.fixture
def user_folder(tmp_path, demo_manifest) -> Path:
    root = tmp_path / "pairs"
    shutil.copytree(demo_manifest["dataset"]["images"], root / "images")
    shutil.copytree(demo_manifest["dataset"]["control"], root / "control")
    for stem in NEW:
        (root / "images" / f"{stem}.txt").unlink()
    return root


def box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def test_review_list_accepts_captions_and_they_are_saved(studio, user_folder):
    from playwright.sync_api import expect

    images = user_folder / "images"
    own = {p.name: p.read_text(encoding="utf-8") for p in images.glob("*.txt")}
    with browser_page(1280, 1400) as page:
        page.goto(studio["open_url"])
        page.get_by_role("tab", name="Dataset").click()
        box(page, "dataset-folder").fill(str(images))
        box(page, "dataset-controls").fill(str(user_folder / "control"))
        page.locator("#dataset-import").click()
        expect(page.locator("#dataset-summary")).to_contain_text("3 error(s)", timeout=60_000)   # the missing captions

        page.get_by_text("Write captions with the text encoder").click()
        box(page, "caption-max_new_tokens").fill("8")
        box(page, "caption-trigger_word").fill("zqx")
        page.locator("#caption-run").click()
        expect(page.locator("#caption-progress")).to_contain_text("done", timeout=180_000)
        table = page.locator("#caption-review")
        expect(table.get_by_role("row").filter(has_text="pending")).to_have_count(len(NEW), timeout=30_000)
        assert not [s for s in NEW if (images / f"{s}.txt").exists()]          # proposals only: nothing written

        page.locator("#caption-pick input").click()
        page.get_by_role("option", name="datasets[0] shapes_01").click()
        expect(box(page, "caption-text")).to_have_value(_startswith("zqx, "), timeout=30_000)
        box(page, "caption-text").fill("zqx, make the circle green")
        page.locator("#caption-accept").click()
        expect(page.locator("#caption-message")).to_contain_text("shapes_01: saved", timeout=30_000)
        page.locator("#caption-accept-all").click()
        expect(page.locator("#caption-message")).to_contain_text("shapes_02: saved", timeout=30_000)
        expect(table.get_by_role("row").filter(has_text="accepted")).to_have_count(len(NEW), timeout=30_000)

    assert (images / "shapes_01.txt").read_text(encoding="utf-8") == "zqx, make the circle green\n"
    review = next((studio["data_dir"] / "captions").glob(f"*/{C.REVIEW_FILE}"))
    proposals = {p.stem: p for p in C.read_review(review)}
    for stem in ("shapes_00", "shapes_02"):
        assert (images / f"{stem}.txt").read_text(encoding="utf-8") == proposals[stem].caption + "\n"
        assert proposals[stem].kind == "edit" and proposals[stem].status == C.ACCEPTED
    assert {p.name: p.read_text(encoding="utf-8") for p in images.glob("*.txt") if p.stem not in NEW} == own
    assert not (images / C.BACKUP_FOLDER).exists()       # the app keeps its backups in its own data dir


def _startswith(prefix: str):
    import re
    return re.compile("^" + re.escape(prefix))
