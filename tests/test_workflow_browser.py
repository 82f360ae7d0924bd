"""Both journeys of a person in a real browser, counted (scripts/measure_workflow.py walks them): from a folder
of captioned images to a running LoRA training, and to an edited image with a painted mask, each in at most six
actions, with the Start / Generate button on the first screen at 1400x900."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from _app_util import REPO, browser_page, kill_jobs, studio  # noqa: F401  (studio is a fixture)

pytestmark = pytest.mark.browser

spec = importlib.util.spec_from_file_location("measure_workflow", REPO / "scripts" / "measure_workflow.py")
MW = importlib.util.module_from_spec(spec)
spec.loader.exec_module(MW)


def test_both_journeys_take_at_most_six_actions(studio, tmp_path):
    folder = tmp_path / "my_photos"
    shutil.copytree(studio["manifest"]["dataset"]["images"], folder)
    with browser_page(MW.VIEWPORT["width"], MW.VIEWPORT["height"]) as page:
        assert MW.button_bottom(page, studio["open_url"], "Train", "#train-start") <= MW.VIEWPORT["height"]
        assert MW.button_bottom(page, studio["open_url"], "Generate / Edit", "#generate-run") <= MW.VIEWPORT["height"]
        edit = MW.edit_journey(page, studio["open_url"], studio["manifest"]["examples"]["control"], steps=2)
        assert edit["actions"] <= 6, edit["steps"]
        lora = MW.lora_journey(page, studio["open_url"], folder)
        assert lora["actions"] <= 6, lora["steps"]
    kill_jobs(studio["data_dir"])              # the training was only to be seen running
