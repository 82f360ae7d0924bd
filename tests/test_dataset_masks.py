"""Dataset tab loss masks (app/dataset_masks.py): the painter loads a picked image with its saved mask, an imported
mask becomes the layer, Save writes `<mask_directory>/<stem>.png` at the image's size (backing up the one it
replaces), Remove takes it away; the engine's plan then finds exactly that mask."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _app_util import browser_page, paint_stroke, studio  # noqa: F401  (studio is a fixture)
from PIL import Image

from app import dataset_masks as DM
from app import generate_media as M
from engine.spec.dataset.plan import build_plan


def setup(tmp_path, demo_manifest, with_masks=True):
    images = tmp_path / "user" / "images"
    shutil.copytree(demo_manifest["dataset"]["images"], images)
    masks = tmp_path / "user" / "masks"
    text = ("[general]\nresolution = [64, 64]\n\n[[datasets]]\n"
            f"image_directory = {json.dumps(str(images))}\ncache_directory = {json.dumps(str(tmp_path / 'cache'))}\n"
            + (f"mask_directory = {json.dumps(str(masks))}\n" if with_masks else ""))
    ctx = SimpleNamespace(data_dir=tmp_path / "studio")
    stem = sorted(p.stem for p in images.glob("*.png"))[0]
    return ctx, text, images, masks, stem


def paint(value: dict, box: tuple[int, int, int, int], folder: Path) -> dict:
    """What the browser sends after painting a white rectangle on the layer."""
    with Image.open(value["background"]) as bg:
        layer = Image.new("RGBA", bg.size, (255, 255, 255, 0))
    layer.paste((255, 255, 255, 255), box)
    return dict(value, layers=[str(M.save_png(layer, folder / "layer.png"))])


def test_paint_save_reload_remove(tmp_path, demo_manifest):
    ctx, text, images, masks, stem = setup(tmp_path, demo_manifest)
    value, note = DM.load_painter(ctx, text, "", 0, stem)
    assert value["layers"] == [] and "No mask yet" in note
    with Image.open(value["background"]) as bg:
        w, h = bg.size
    painted = paint(value, (0, 0, w // 2, h), tmp_path)
    said = DM.save_mask(ctx, text, "", 0, stem, painted, False)
    assert said.startswith("Saved") and "50.0%" in said
    saved = masks / f"{stem}.png"
    with Image.open(saved) as m, Image.open(images / f"{stem}.png") as img:
        assert m.size == img.size and m.mode == "L"
        arr = np.asarray(m)
    assert arr[:, : arr.shape[1] // 2 - 1].min() == 255 and arr[:, arr.shape[1] // 2 + 1:].max() == 0
    (tmp_path / "d.toml").write_text(text, encoding="utf-8")
    plan = build_plan(tmp_path / "d.toml", "original")
    assert [it.item.mask_path for it in plan.items() if it.item.mask_path] == [saved] and not plan.errors
    # reload: the saved mask is the layer again; invert + save backs the first one up
    value, note = DM.load_painter(ctx, text, "", 0, stem)
    assert len(value["layers"]) == 1 and str(saved) in note
    said = DM.save_mask(ctx, text, "", 0, stem, value, True)
    assert "backed up" in said and list((ctx.data_dir / "mask_backups").rglob("*.bak"))
    with Image.open(saved) as m:
        assert np.asarray(m)[:, -1].min() == 255
    assert "Removed" in DM.remove_mask(ctx, text, "", 0, stem) and not saved.exists()


def test_import_and_refusals(tmp_path, demo_manifest):
    ctx, text, images, masks, stem = setup(tmp_path, demo_manifest)
    value, _ = DM.load_painter(ctx, text, "", 0, stem)
    upload = tmp_path / "mine.png"
    Image.new("L", (10, 10), 255).save(upload)
    layered, note = DM.imported_layer(ctx, value, str(upload))
    assert len(layered["layers"]) == 1 and "resized from 10×10" in note
    assert "nothing is painted" in DM.save_mask(ctx, text, "", 0, stem, value, False)
    assert DM.save_mask(ctx, text, "", 0, stem, layered, False).startswith("Saved")
    ctx2, text2, *_ = setup(tmp_path / "nomask", demo_manifest, with_masks=False)
    _, note = DM.load_painter(ctx2, text2, "", 0, stem)
    assert "no `mask_directory`" in note
    assert "no mask_directory" in DM.save_mask(ctx2, text2, "", 0, stem, layered, False)


@pytest.mark.browser
def test_browser_paints_and_saves_a_loss_mask(studio, tmp_path):
    from playwright.sync_api import expect

    images = tmp_path / "images"
    shutil.copytree(studio["manifest"]["dataset"]["images"], images)
    masks = tmp_path / "masks"
    masks.mkdir()
    # dataset_open reads configs only from allowed places (app/places.py): the data dir's datasets folder is one
    toml = studio["data_dir"] / "datasets" / "masked.toml"
    toml.parent.mkdir(parents=True, exist_ok=True)
    toml.write_text("[general]\nresolution = [64, 64]\n\n[[datasets]]\n"
                    f"image_directory = {json.dumps(str(images))}\ncache_directory = "
                    f"{json.dumps(str(tmp_path / 'cache'))}\nmask_directory = {json.dumps(str(masks))}\n",
                    encoding="utf-8")
    with browser_page(1280, 1400) as page:
        page.goto(studio["open_url"])
        page.get_by_role("tab", name="Dataset").click()
        page.get_by_text("Open an existing dataset config").click()
        page.locator("#dataset-open-path textarea, #dataset-open-path input").first.fill(str(toml))
        page.locator("#dataset-open").click()
        thumbs = page.locator("#dataset-gallery img")
        expect(thumbs).to_have_count(8, timeout=60_000)
        expect(page.locator("#dataset-toml")).to_contain_text("mask_directory", timeout=30_000)
        thumbs.nth(0).click()
        page.get_by_text("Loss mask (white = train here").click()
        expect(page.locator("#dataset-mask-info")).to_contain_text("No mask yet", timeout=30_000)
        editor = page.locator("#dataset-mask-editor")
        paint_stroke(page, editor)
        page.wait_for_timeout(1500)                      # the painter sends its layer after the stroke
        page.locator("#dataset-mask-save").click()
        expect(page.locator("#dataset-mask-info")).to_contain_text("Saved", timeout=30_000)
    stem = sorted(p.stem for p in images.glob("*.png"))[0]
    with Image.open(masks / f"{stem}.png") as m, Image.open(images / f"{stem}.png") as img:
        assert m.size == img.size
        assert 0 < (np.asarray(m) > 127).mean() < 1         # the stroke, not the whole image
