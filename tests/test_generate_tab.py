"""The Generate / Edit tab as a user meets it: launch.py on the demo models, driven through gradio_client (real
engine runs, 64×64, a few steps), one browser test that paints a mask stroke and runs an edit, and the tab's
picture helpers (mask from the painted layer, RCM view) without a server."""

from __future__ import annotations

import os
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
from _app_util import browser_page, paint_stroke, studio  # noqa: F401  (studio is a fixture)
from PIL import Image

from app import generate_media as M
from app.forms import config_to_values
from app.tabs.generate import EXTRA_CONTROLS, form_fields
from engine.spec import config as C

STEPS = 3


# ---------------------------------------------------------------------------------------------- helpers

def client_for(studio):
    from gradio_client import Client
    return Client(studio["url"], headers=studio["headers"], verbose=False)


def config(studio, version="original", **changes) -> C.GenerateImageConfig:
    m = studio["manifest"]
    cfg = C.GenerateImageConfig(model_version=version, dit=m["dit"][version], vae=m["vae"],
                                text_encoder=m["text_encoder"], tokenizer=m["tokenizer"],
                                prompt=m["examples"]["edit_prompt" if version != "original" else "prompt"],
                                image_size=[64, 64], infer_steps=STEPS, seed=7,
                                save_path=str(studio["data_dir"] / "outputs" / "tests"))
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def values(cfg) -> list:
    return list(config_to_values(cfg, form_fields()).values())


def editor_value(control: str, layer: Path | None = None) -> dict:
    from gradio_client import handle_file
    return {"background": handle_file(control), "layers": [handle_file(str(layer))] if layer else [],
            "composite": None}


def submit(client, cfg, editor=None, grow=0, feather=0, invert=False, slots=(), more=None):
    slots = [*slots, *[None] * (EXTRA_CONTROLS - len(slots))]
    return client.predict(*values(cfg), editor, *slots, more, grow, feather, invert, api_name="/generate_run")


def wait_final(client, job_id: str, timeout: float = 300) -> dict:
    """Poll the tab's refresh until the job is done or failed; the refresh that saw it end has every field."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = client.predict(job_id, api_name="/generate_refresh")
        status = out[1]
        if isinstance(status, str) and re.search(r"<b>(done|failed|stopped)</b>", status):
            keys = ("job", "status", "cmdline", "error", "note", "gallery", "selected", "strip", "heatmap", "rcm_md",
                    "preview")
            return dict(zip(keys, out))
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


def option(cmdline: str, name: str) -> str:
    argv = shlex.split(cmdline)
    return argv[argv.index(name) + 1]


def half_layer(path: Path, size=(64, 64)) -> Path:
    """A painter layer: white with alpha 255 on the left half (what the brush leaves), transparent elsewhere."""
    layer = np.zeros((size[1], size[0], 4), np.uint8)
    layer[:, : size[0] // 2] = 255
    Image.fromarray(layer, "RGBA").save(path)
    return path


# ---------------------------------------------------------------------------------------------- gradio_client

@pytest.fixture(scope="module")
def t2i_run(studio):
    client = client_for(studio)
    job_id, cmdline, error, note, *_ = submit(client, config(studio, preview_every=1))
    assert job_id and "Queued" in note
    return client, wait_final(client, job_id)


def test_text_to_image_makes_a_png_with_its_parameters(studio, t2i_run):
    client, final = t2i_run
    assert "<b>done</b>" in final["status"] and "GiB VRAM" in final["status"]      # the run's estimate
    assert option(final["cmdline"], "--model_version") == "original" and "--control_image_path" not in final["cmdline"]
    # the results since launch, newest first: this run's output leads; previews stay out of the gallery
    assert final["gallery"] and not any("_step" in Path(g["image"]).name for g in final["gallery"])
    assert final["note"].endswith(": done.") and "Queued" not in final["note"]     # not "Queued" once ended
    # the newest live preview (--preview_every 1 on 3 steps: after steps 1 and 2, not the last) stays shown
    preview = final["preview"]                         # an update: the picture and its step in the label
    assert option(final["cmdline"], "--preview_every") == "1" and preview["label"].endswith("at step 2/3")
    assert Path(preview["value"]).name.endswith("_000_step002.png") and Image.open(preview["value"]).size == (256, 256)
    engine_previews = sorted(Path(config(studio).save_path, "previews").glob("*_000_step*.png"))
    assert [p.name[-11:] for p in engine_previews][-2:] == ["step001.png", "step002.png"]     # 64 px, shown ×4
    params = M.read_png_parameters(final["gallery"][0]["image"])        # the copy the browser would get
    assert params["prompt"] == studio["manifest"]["examples"]["prompt"] and params["seed"] == 7
    assert params["image_size"] == [64, 64] and params["infer_steps"] == STEPS
    assert Path(final["selected"]).is_file() and final["selected"].endswith(Path(final["gallery"][0]["image"]).name)
    assert client.predict(final["selected"], api_name="/generate_seed_reuse") == "7"
    assert 0 <= int(client.predict(api_name="/generate_seed_random")) < 2**32


def test_conflicts_are_named_before_the_run(studio, tmp_path):
    client = client_for(studio)
    editor = editor_value(studio["manifest"]["examples"]["control"], half_layer(tmp_path / "l.png"))
    *_, said = client.predict(editor, 0, 0, False, "0.5", False, "edit", api_name="/generate_mask_preview")
    assert "cannot be used together" in said
    assert "does nothing without" in client.predict(None, 0, 0, False, "", True, "edit",
                                                    api_name="/generate_mask_preview")[-1]
    assert client.predict(None, 0, 0, False, "", False, "edit", api_name="/generate_mask_preview")[-1] == ""


@pytest.fixture(scope="module")
def mask_run(studio, tmp_path_factory):
    client = client_for(studio)
    layer = half_layer(tmp_path_factory.mktemp("layer") / "layer.png")
    editor = editor_value(studio["manifest"]["examples"]["control"], layer)
    job_id, cmdline, *_ = submit(client, config(studio, "edit", seed=3), editor)
    return client, editor, cmdline, wait_final(client, job_id)


def test_edit_with_a_painted_mask(studio, mask_run):
    client, editor, cmdline, final = mask_run
    preview, info, _ = client.predict(editor, 2, 0, False, "", False, "edit", api_name="/generate_mask_preview")
    assert np.asarray(Image.open(preview)).mean() / 255 == pytest.approx(34 / 64, abs=1e-3) and "53.1%" in info
    _, info, _ = client.predict(editor, 0, 0, True, "", False, "edit", api_name="/generate_mask_preview")
    assert "50.0%" in info

    mask = np.asarray(Image.open(option(cmdline, "--mask_path")))
    assert mask.shape == (64, 64) and (mask[:, :32] == 255).all() and (mask[:, 32:] == 0).all()
    control = studio["manifest"]["examples"]["control"]
    assert Path(option(cmdline, "--control_image_path")).name == Path(control).name   # its name is kept
    assert "<b>done</b>" in final["status"] and Path(final["selected"]).name == final["gallery"][0]["caption"]
    assert final["heatmap"] and "painted mask's black region (50.0% of the image)" in final["rcm_md"]


def test_rcm_run_shows_the_mask_of_every_step(studio):
    client = client_for(studio)
    cfg = config(studio, "edit", infer_steps=4, rcm_threshold=0.5, rcm_relative_threshold=True,
                 rcm_debug_save=True)
    job_id, cmdline, *_ = submit(client, cfg, editor_value(studio["manifest"]["examples"]["control"]))
    assert "--rcm_debug_save" in cmdline and "--mask_path" not in cmdline
    final = wait_final(client, job_id)
    assert "<b>done</b>" in final["status"]
    captions = [item["caption"] for item in final["strip"]]
    assert [c.split(":")[0] for c in captions] == ["step 1", "step 2", "step 3"]      # one per step after the first
    shares = [float(re.search(r"([\d.]+)% changing", c)[1]) for c in captions]
    rows = re.findall(r"^\| (\d) \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+) \|$", final["rcm_md"], re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3] and [float(r[1]) for r in rows] == shares
    assert all(float(r[3]) > 0 for r in rows)          # the engine's logged threshold, relative to each step's max
    save_dir = Path(cfg.save_path)
    assert (save_dir / "shapes_00_th0.5_rel1_ks3_ds0_rcm_mask_03.png").is_file()
    assert "last RCM step's kept region" in final["rcm_md"]


def test_load_parameters_round_trip(studio, t2i_run):
    from gradio_client import handle_file

    client, final = t2i_run
    other = config(studio, "edit", prompt="something else", seed=1, infer_steps=20, image_size=[128, 96])
    out = client.predict(handle_file(final["gallery"][0]["image"]), *values(other), api_name="/generate_load_params")
    loaded = dict(zip(form_fields(), out))
    expected = config_to_values(config(studio), form_fields())
    for name in ("prompt", "seed", "infer_steps", "image_size", "model_version", "dit", "guidance_scale"):
        assert str(loaded[name]) == str(expected[name]), name
    assert "Loaded the parameters" in out[-1]
    # a PNG without parameters is refused with the reason; the form is left alone
    plain = studio["data_dir"] / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    out = client.predict(handle_file(str(plain)), *values(other), api_name="/generate_load_params")
    assert "has no 'parameters' text chunk" in out[-1]


def test_load_parameters_of_an_edit_brings_back_control_and_mask(studio, mask_run):
    client, _, cmdline, final = mask_run
    out = client.predict(final["selected"], *values(config(studio)), api_name="/generate_load_selected_params")
    n = len(form_fields())
    loaded, editor = dict(zip(form_fields(), out[:n])), out[n]
    assert loaded["model_version"] == "edit" and int(loaded["seed"]) == 3
    alpha = np.asarray(Image.open(editor["layers"][0]).convert("RGBA"))[..., 3]
    assert (alpha[:, :32] == 255).all() and (alpha[:, 32:] == 0).all()
    assert np.array_equal(np.asarray(Image.open(editor["background"]).convert("RGB")),
                          np.asarray(Image.open(option(cmdline, "--control_image_path")).convert("RGB")))
    sent = client.predict(final["selected"], api_name="/generate_send_to_control")
    assert sent["background"] and sent["layers"] == []


def test_preset_click_changes_the_fields_and_the_estimate(studio):
    client = client_for(studio)
    base = config(studio, image_size=[1024, 1024])
    before = client.predict(*values(base), api_name="/generate_estimate")
    out = client.predict(*values(base), api_name="/generate_apply_generate_12gb")
    n = len(form_fields())
    applied, note = dict(zip(form_fields(), out[:n])), out[n]
    assert applied["fp8"] is True and applied["fp8_scaled"] is True and applied["text_encoder_cpu"] is True
    # the demo DiT has 2 blocks: the preset's block swap is clamped to the one block that may leave the GPU
    assert int(applied["blocks_to_swap"]) == 1 and "Applied" in note and "→ 1" in note
    assert "applied" in out[n + 2]["value"]                        # the card of the 12 GB preset is marked
    after = client.predict(*out[:n], api_name="/generate_estimate")
    peak = [float(re.search(r"Estimated peak: ([\d.]+) GiB", t)[1]) for t in (before, after)]
    assert peak[1] < peak[0]


def test_misuse_is_refused_before_a_job_and_engine_errors_are_shown(studio, tmp_path):
    from gradio_client import handle_file

    client = client_for(studio)
    both = config(studio, "edit", rcm_threshold=0.1)
    job_id, _, error, note, *_ = submit(client, both, editor_value(studio["manifest"]["examples"]["control"],
                                                                    half_layer(tmp_path / "l.png")))
    assert error["visible"] and "cannot be used together" in error["value"] and note == "Not started."
    _, _, error, note, *_ = submit(client, config(studio, "edit"), None)
    assert error["visible"] and "needs a control image" in error["value"] and note == "Not started."
    controls = studio["manifest"]["examples"]["controls"]
    _, _, error, note, *_ = submit(client, config(studio, "edit"), editor_value(controls[0]),
                                   slots=[handle_file(controls[1])])
    assert "takes one control image, 2 were given" in error["value"] and note == "Not started."
    # an error only the engine finds (a DiT given as the VAE): the job fails and the panel shows message + fix
    wrong = config(studio, vae=studio["manifest"]["dit"]["original"])
    job_id, *_ = submit(client, wrong)
    final = wait_final(client, job_id)
    assert "<b>failed</b>" in final["status"] and final["error"]["visible"]
    assert "not the Qwen-Image VAE" in final["error"]["value"] and "**Fix:**" in final["error"]["value"]


def test_edit_2509_takes_every_control_slot_in_order(studio):
    from gradio_client import handle_file

    client = client_for(studio)
    controls = studio["manifest"]["examples"]["controls"]
    # no DiT given: the Models tab's DiT of the model version is used
    job_id, cmdline, error, *_ = submit(client, config(studio, "edit-2509", dit=None), editor_value(controls[0]),
                                        slots=[handle_file(controls[1])], more=[handle_file(controls[0])])
    client.predict(job_id, api_name="/generate_stop")            # the command line is what this test is about
    argv = shlex.split(cmdline)
    start = argv.index("--control_image_path") + 1
    names = [Path(a).name for a in argv[start:start + 3]]
    assert names == ["shapes_00_0.png", "shapes_00_1_c2.png", "shapes_00_0_c3.png"]
    assert option(cmdline, "--model_version") == "edit-2509" and option(cmdline, "--dit").endswith(
        Path(studio["manifest"]["dit"]["edit-2509"]).name)


# ---------------------------------------------------------------------------------------------- browser

@pytest.mark.browser
def test_browser_paints_a_mask_and_runs_an_edit(studio):
    from playwright.sync_api import expect

    with browser_page(1400, 1100) as page:
        page.goto(studio["open_url"])
        page.get_by_role("tab", name="Generate / Edit").click()
        editor = page.locator("#generate-control1")
        paint_stroke(page, editor)
        expect(page.locator("#generate-mask-info")).to_contain_text("of the image may change", timeout=30_000)
        page.locator("#generate-infer_steps input").fill(str(STEPS))
        page.get_by_text("Job, command line, PNG parameters").click()          # folded beside the results
        job_box = page.locator("#generate-job textarea, #generate-job input").first
        before = job_box.input_value()          # the page reopens on the session's last run (another test's)
        page.locator("#generate-run").click()
        expect(job_box).not_to_have_value(re.compile(rf"^({re.escape(before)})?$"), timeout=30_000)
        job_id = job_box.input_value()
        expect(page.locator(f'#generate-status [data-job="{job_id}"][data-status="done"]')).to_have_count(
            1, timeout=240_000)
        expect(page.locator("#generate-note")).to_contain_text(f"{job_id}: done")    # no stale "Queued"
        command = page.locator("#generate-command textarea, #generate-command input").first.input_value()
        mask = np.asarray(Image.open(option(command, "--mask_path")))
        assert 0 < (mask > 127).mean() < 1                                # the stroke, not the whole image
        expect(page.locator("#generate-gallery img").first).to_be_visible(timeout=30_000)
        expect(page.locator("#generate-heatmap img").first).to_be_visible()
        # the demo form previews every 2 steps: the step-2 estimate of this 3-step run stays beside the bar
        expect(page.locator("#generate-preview img").first).to_be_visible()
        expect(page.locator("#generate-preview")).to_contain_text("at step 2/3")

        # the same edit with RCM instead of the mask: the strip fills with one mask per step after the first
        page.get_by_text("RCM: keep what the prompt does not change").click()
        page.locator("#generate-rcm_threshold input, #generate-rcm_threshold textarea").first.fill("0.5")
        expect(page.locator("#generate-conflicts")).to_contain_text("cannot be used together", timeout=30_000)
        page.locator("#generate-mask-clear").click()
        expect(page.locator("#generate-mask-info")).to_contain_text("No mask painted", timeout=30_000)
        expect(page.locator("#generate-conflicts")).not_to_contain_text("together", timeout=30_000)
        page.locator("#generate-rcm_relative_threshold input").check()
        page.locator("#generate-rcm_debug_save input").check()
        page.locator("#generate-run").click()
        expect(job_box).not_to_have_value(job_id, timeout=30_000)
        job_id = job_box.input_value()
        expect(page.locator(f'#generate-status [data-job="{job_id}"][data-status="done"]')).to_have_count(
            1, timeout=240_000)
        assert "--mask_path" not in page.locator("#generate-command textarea").first.input_value()
        expect(page.locator("#generate-rcm-strip img")).to_have_count(STEPS - 1, timeout=30_000)
        expect(page.locator("#generate-rcm-stats")).to_contain_text("tokens still changing")
        expect(page.locator("#generate-gallery img").nth(1)).to_be_visible(timeout=30_000)   # both runs stay
        if os.environ.get("QIS_SCREENSHOTS"):
            page.screenshot(path=os.environ["QIS_SCREENSHOTS"], full_page=True)


# ---------------------------------------------------------------------------------------------- helpers, no server

def test_painted_mask_is_the_layer_alpha_and_must_match_the_image(tmp_path):
    bg = tmp_path / "bg.png"
    Image.new("RGB", (64, 64), "red").save(bg)
    mask = M.painted_mask(str(bg), [str(half_layer(tmp_path / "l.png"))])
    assert np.array_equal(np.asarray(mask)[:, :32], np.full((64, 32), 255, np.uint8))
    empty = tmp_path / "empty.png"
    Image.new("RGBA", (64, 64), (255, 255, 255, 0)).save(empty)      # white but transparent: nothing painted
    assert M.painted_mask(str(bg), [str(empty)]) is None
    with pytest.raises(M.MaskError, match="layer is 32x32 but control image 1 is 64x64"):
        M.painted_mask(str(bg), [str(half_layer(tmp_path / "small.png", (32, 32)))])


def test_refine_mask_grows_shrinks_inverts_and_feathers(tmp_path):
    mask = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12), "L")   # an 8×8 square in 32×32
    white = lambda m: int((np.asarray(m) > 127).sum())                       # noqa: E731
    assert white(M.refine_mask(mask, grow=2)) == 12 * 12 and white(M.refine_mask(mask, grow=-2)) == 4 * 4
    assert white(M.refine_mask(mask, invert=True)) == 32 * 32 - 64
    feathered = np.asarray(M.refine_mask(mask, feather=2))
    assert 0 < feathered[12, 10] < 255 and feathered[16, 16] > 200
    layer = M.mask_layer(str(M.save_png(mask, tmp_path / "m.png")))
    assert np.array_equal(np.asarray(layer)[..., 3], np.asarray(mask))


def test_status_shows_measured_vram_beside_the_estimate():
    from app.generate_view import memory_text
    from app.views import progress_html

    cfg = C.GenerateImageConfig(image_size=[1024, 1024], fp8=True, fp8_scaled=True)
    view = {"id": "j1", "status": "running", "phase": "sampling",
            "progress": {"step": 2, "total": 8, "unit": "step", "eta_s": 3.0},
            "vram": {"allocated_gib": 20.1, "reserved_gib": 21.0, "peak_gib": 21.4, "ram_gib": 9.0}}
    text = memory_text(view, cfg)
    estimate = float(re.search(r"estimate ([\d.]+) GiB VRAM", text)[1])
    assert "VRAM peak 21.4 GiB measured" in text and 15 < estimate < 30
    assert "estimate 7.5 GiB VRAM, 3.0 GiB RAM" == memory_text({**view, "vram": None,
                                                                "estimate": {"vram_gib": 7.5, "ram_gib": 3.0}}, cfg)
    html = progress_html(view, text)
    assert 'data-job="j1"' in html and "width:25.0%" in html and "2/8 step · ETA 0m03s" in html and "21.4 GiB" in html


def test_parameters_key_and_run_log_match_the_engine(tmp_path):
    """The app reads back exactly what the engine's writer wrote: the typed events of engine/spec/events.py."""
    from engine.infer.outputs import PARAMETERS_KEY
    from engine.spec.events import IMAGE_OUTPUT, EventWriter, Preview, RcmStep

    assert PARAMETERS_KEY == M.PARAMETERS_KEY
    log = tmp_path / "log.txt"
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ python -m engine generate_image\n")
        writer = EventWriter(stream=fh, json_stdout=True)
        writer.write(RcmStep("/o/a_rcm_mask_02.png", step=2, min=0.1, max=0.4, mean=0.25, threshold=0.2))
        writer.write(Preview("/o/previews/r_000_step001.png", step=1, total=2, index=0))
        writer.image("/o/out.png", kind=IMAGE_OUTPUT, seed=1)
    run = M.read_run(log)
    assert run.outputs == ["/o/out.png"]
    assert [(r.step, r.path, r.mean, r.threshold) for r in run.rcm_steps] == [(2, "/o/a_rcm_mask_02.png", 0.25, 0.2)]
    assert [e.path for e in run.previews] == ["/o/previews/r_000_step001.png"]        # not an output
