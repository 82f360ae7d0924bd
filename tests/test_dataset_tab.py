"""The Dataset tab against a running Studio (gradio_client), plus one pass through it in chromium.

The user's folder in these tests is a copy of the demo's images, captions and controls; every test that touches
it compares the whole tree (bytes and mtimes) before and after."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _app_util import browser_page, studio  # noqa: F401  (studio is a fixture)

from app import dataset_files as F


def client_for(studio):
    from gradio_client import Client
    return Client(studio["url"], headers=studio["headers"], verbose=False)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def user_folder(tmp_path, demo_manifest) -> Path:
    """A dataset folder as a user has it: images/ (png + txt) and control/."""
    root = tmp_path / "my_dataset"
    shutil.copytree(demo_manifest["dataset"]["images"], root / "images")
    shutil.copytree(demo_manifest["dataset"]["control"], root / "control")
    return root


def do_import(client, folder, version="edit", controls="", name="mine", cache=""):
    return client.predict(str(folder), controls, name, version, 64, 64, ".txt", 1, 1, True, False, False, cache,
                          api_name="/dataset_import")


def test_import_reads_the_folder_and_leaves_it_untouched(studio, user_folder):
    before = snapshot(user_folder)
    client = client_for(studio)
    toml, save_path, message, summary, problems, _, pick, gallery = do_import(client, user_folder)
    assert f'image_directory = "{user_folder / "images"}"' in toml          # found the images/ subfolder
    assert f'control_directory = "{user_folder / "control"}"' in toml       # and the control folder
    cache_dir = studio["data_dir"] / "datasets" / "mine" / "cache"
    assert f'cache_directory = "{cache_dir}"' in toml                       # we write into our own folder
    assert save_path == str(studio["data_dir"] / "datasets" / "mine.toml")
    assert "not saved yet" in message and "**Ready**" in summary and "8 item(s)" in summary
    assert "64x64 × 6" in summary and problems["data"] == []
    assert len(gallery) == 8 and gallery[0]["caption"].startswith("shapes_00: a blue circle")

    stem, caption, target, controls, info = client.predict(toml, save_path, 0, "shapes_06", api_name="/dataset_item")
    assert stem == "shapes_06" and caption == (user_folder / "images" / "shapes_06.txt").read_text().strip()
    assert target and len(controls) == 1 and controls[0]["caption"] == "shapes_06.png"     # the pair
    assert "1 control image(s)" in info

    assert snapshot(user_folder) == before       # import, check, gallery and viewing wrote nothing there
    assert not Path(save_path).exists()          # nothing saved before an explicit Save


def test_several_control_folders_become_numbered_controls(studio, tmp_path, demo_manifest):
    """SimpleTuner's layout: one folder per control image, same file names as the targets."""
    root = tmp_path / "st"
    shutil.copytree(demo_manifest["dataset"]["images"], root / "images")
    for n in (0, 1):
        (root / f"cond{n}").mkdir()
        for p in Path(demo_manifest["dataset"]["control2"]).glob(f"*_{n}.png"):
            shutil.copy(p, root / "cond{}".format(n) / p.name.replace(f"_{n}.png", ".png"))
    before = snapshot(root)
    client = client_for(studio)
    toml, save_path, *_ = do_import(client, root / "images", "edit-2509", f"{root / 'cond0'}\n{root / 'cond1'}",
                                    name="st")
    *_, controls, info = client.predict(toml, save_path, 0, "shapes_03", api_name="/dataset_item")
    assert [c["caption"] for c in controls] == ["shapes_03_0.png", "shapes_03_1.png"]
    linked = studio["data_dir"] / "datasets" / "st" / "control" / "shapes_03_1.png"
    assert linked.is_symlink() and linked.resolve() == (root / "cond1" / "shapes_03.png").resolve()
    assert snapshot(root) == before


def test_caption_is_written_only_on_save_with_a_backup(studio, user_folder):
    client = client_for(studio)
    toml, save_path, *_ = do_import(client, user_folder)
    caption_file = user_folder / "images" / "shapes_01.txt"
    old = caption_file.read_text()
    message, gallery = client.predict(toml, save_path, 0, "shapes_01", "  an orange square, edited  ",
                                      api_name="/dataset_save_caption")
    assert caption_file.read_text() == "an orange square, edited\n"
    backups = list((studio["data_dir"] / "caption_backups").rglob("shapes_01.txt.*.bak"))
    assert [b.read_text() for b in backups] == [old] and str(backups[0]) in message
    assert any(g["caption"] == "shapes_01: an orange square, edited" for g in gallery)
    # Only the dataset's own caption files can be written, whatever name is asked for.
    message, _ = client.predict(toml, save_path, 0, "../../evil", "x", api_name="/dataset_save_caption")
    assert "has no image named '../../evil'" in message
    assert not (user_folder / "evil.txt").exists() and not (user_folder.parent / "evil.txt").exists()


def test_check_reports_each_broken_item_with_its_file_and_fix(studio, user_folder):
    (user_folder / "images" / "shapes_02.txt").unlink()
    (user_folder / "images" / "shapes_03.png").write_bytes(b"not an image at all")
    (user_folder / "control" / "shapes_05_x.png").write_bytes((user_folder / "control" / "shapes_05.png").read_bytes())
    client = client_for(studio)
    toml, save_path, message, summary, problems, *_ = do_import(client, user_folder)
    rows = {(r[1], r[0]): r for r in problems["data"]}
    missing = rows[(str(user_folder / "images" / "shapes_02.txt"), "error")]
    assert "caption file is missing for shapes_02.png" in missing[2] and "allow_missing_captions" in missing[3]
    corrupt = rows[(str(user_folder / "images" / "shapes_03.png"), "error")]
    assert "cannot be read as an image" in corrupt[2] and "Re-export" in corrupt[3]
    suffix = rows[(str(user_folder / "control" / "shapes_05_x.png"), "error")]
    assert "non-numeric suffix 'x'" in suffix[2]
    assert "**3 error(s)**" in summary

    bad = toml.replace("num_repeats", "num_repeat")      # a typo in the text box
    _, _, message, *_ = client.predict(bad, save_path, "edit", 0, api_name="/dataset_check")
    assert "mine.toml:" in message and "unknown key 'num_repeat'" in message and "num_repeats" in message


def test_save_writes_exactly_the_preview_atomically(studio, user_folder, tmp_path):
    client = client_for(studio)
    toml, _, *_ = do_import(client, user_folder)
    target = tmp_path / "configs" / "mine.toml"
    message = client.predict(toml, str(target), api_name="/dataset_save")
    assert target.read_text(encoding="utf-8") == toml and "Saved" in message
    assert [p.name for p in target.parent.iterdir()] == ["mine.toml"]       # no temp file left behind
    settings = json.loads((studio["data_dir"] / "settings.json").read_text())
    assert settings["dataset_configs"][0] == str(target.resolve())         # the Cache and Train tabs offer it

    refused = client.predict("[general\nbroken", str(target), api_name="/dataset_save")
    assert "not valid TOML" in refused and "Nothing was written" in refused
    assert target.read_text(encoding="utf-8") == toml

    edited = toml.replace("num_repeats = 1", "num_repeats = 3")
    message = client.predict(edited, str(target), api_name="/dataset_save")
    assert target.read_text(encoding="utf-8") == edited
    backup = Path(message.split("kept in `")[1].split("`")[0])
    assert backup.read_text(encoding="utf-8") == toml and studio["data_dir"] in backup.parents

    client.predict(toml, "bare_name.toml", api_name="/dataset_save")     # a bare name: with the other configs
    assert (studio["data_dir"] / "datasets" / "bare_name.toml").read_text(encoding="utf-8") == toml

    opened = client.predict(str(target), "edit", api_name="/dataset_open")
    assert opened[0] == edited and opened[1] == str(target) and "**Ready**" in opened[3]


def test_layout_detection_and_toml_text(tmp_path):
    """The plain functions behind Import (no server)."""
    (tmp_path / "set" / "targets").mkdir(parents=True)
    (tmp_path / "set" / "controls").mkdir()
    from PIL import Image

    for folder in ("targets", "controls"):
        Image.new("RGB", (32, 32)).save(tmp_path / "set" / folder / "a.png")
    image_dir, controls, notes = F.detect_layout(tmp_path / "set")
    assert image_dir == tmp_path / "set" / "targets" and controls == [tmp_path / "set" / "controls"]
    with pytest.raises(Exception, match="no images found"):
        F.detect_layout(tmp_path)
    text = F.config_text({"resolution": [64, 64], "batch_size": 1},
                         {"image_directory": "/x", "control_directory": None})
    assert "control_directory" not in text
    assert text == "[general]\nresolution = [64, 64]\nbatch_size = 1\n\n[[datasets]]\nimage_directory = \"/x\"\n"


@pytest.mark.browser
def test_dataset_tab_in_a_browser(studio):
    from playwright.sync_api import expect

    with browser_page(1280, 1000) as page:
        page.goto(studio["open_url"])
        page.get_by_role("tab", name="Dataset").click()
        folder = page.locator("#dataset-folder textarea, #dataset-folder input").first
        expect(folder).to_have_value(studio["manifest"]["dataset"]["images"])       # the demo, pre-filled
        page.locator("#dataset-import").click()
        expect(page.locator("#dataset-summary")).to_contain_text("Ready", timeout=60_000)
        expect(page.locator("#dataset-summary")).to_contain_text("8 item(s)")
        expect(page.locator("#dataset-toml")).to_contain_text("control_directory")
        thumbs = page.locator("#dataset-gallery img")
        expect(thumbs).to_have_count(8, timeout=30_000)
        thumbs.nth(6).click()
        caption = page.locator("#dataset-caption textarea").first
        expect(caption).to_have_value("a red circle and a small white triangle on a blue background",
                                      timeout=30_000)
        expect(page.locator("#dataset-target-view img")).to_be_visible()
        expect(page.locator("#dataset-controls-view img")).to_have_count(1)
        expect(page.locator("#dataset-item-info")).to_contain_text("shapes_06.png")
