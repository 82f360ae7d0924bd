"""The GUI as a user meets it: launch.py in a subprocess, driven through gradio_client; plus the form generator
and the start-up rules (no torch at import, no public bind without a login)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from _app_util import REPO, demo_model_paths, get, start_slow_job, studio  # noqa: F401  (studio is a fixture)

from app.forms import config_to_values, gui_fields, values_to_config, widget_kind
from engine.spec import config as C
from engine.spec.config import ConfigError, to_argv


def client_for(studio):
    from gradio_client import Client
    return Client(studio["url"], headers=studio["headers"], verbose=False)


def test_page_is_served_without_google_fonts(studio):
    html = get(studio["url"], studio["headers"])[2].decode()
    css = get(studio["url"] + "theme.css", studio["headers"])[2].decode()
    assert "Qwen-Image Studio" in html
    assert "fonts.googleapis" not in html and "fonts.googleapis" not in css and "system-ui" in css


def test_models_inspect_identifies_the_demo_models(studio):
    client = client_for(studio)
    table, report = client.predict(*demo_model_paths(studio["manifest"]), api_name="/models_inspect")
    rows = {r[0]: r for r in table["data"]}
    headers = table["headers"]
    col = {h: headers.index(h) for h in headers}
    dit = rows["DiT: Qwen-Image (text to image)"]
    assert dit[col["component"]] == "dit" and dit[col["variant"]] == "original"
    assert dit[col["parameters"]].endswith("K")       # the tiny demo DiT: ~92 K parameters
    assert rows["DiT: Qwen-Image-Edit-2511"][col["variant"]] == "edit-2511"
    assert rows["VAE"][col["component"]] == "vae"
    assert rows["Text encoder: Qwen2.5-VL 7B"][col["component"]] == "text_encoder"
    assert "Tokenizer" not in report      # the demo tokenizer folder is complete


def test_models_inspect_reports_a_file_in_the_wrong_box(studio):
    client = client_for(studio)
    paths = demo_model_paths(studio["manifest"])
    paths[5] = paths[0]                    # the DiT given as the VAE
    table, report = client.predict(*paths, api_name="/models_inspect")
    assert "expects a vae, but the file is a dit" in report


def test_models_save_as_defaults(studio):
    client = client_for(studio)
    paths = demo_model_paths(studio["manifest"])
    message = client.predict(*paths, api_name="/models_save")
    saved = json.loads((studio["data_dir"] / "settings.json").read_text())["models"]
    assert saved["vae"] == paths[5] and "settings.json" in message


def job_row(client, job_id):
    table, *_ = client.predict(None, api_name="/jobs_refresh")
    return next(r for r in table["data"] if r[0] == job_id)


def test_a_job_outlives_the_browser_session_and_stops(studio, tmp_path):
    first = client_for(studio)
    job_id = start_slow_job(first, tmp_path)
    first.close()                                      # the browser tab goes away

    second = client_for(studio)                        # a refresh: a new session sees the same job
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (row := job_row(second, job_id))[3]:
        time.sleep(0.3)
    assert row[1] == "running" and row[3].startswith(tuple(f"{i}/1000" for i in range(1, 1000)))
    _, _, status, cmdline, log, plot, *_ = second.predict(job_id, api_name="/jobs_refresh")
    assert "**running**" in status and "-m qis_fake_engine cache_latents " in cmdline
    assert f"--dataset_config {tmp_path / 'slow_job.toml'}" in cmdline
    assert "progress" in log
    while "value" not in plot and time.monotonic() < deadline:   # resent only when new metrics arrived
        time.sleep(0.3)
        plot = second.predict(job_id, api_name="/jobs_refresh")[5]
    data = plot["value"]["data"]                        # the loss chart follows the job's metric events
    assert plot["visible"] and data[0] == [1, 1.0, "loss"] and data[3] == [2, 0.95, "EMA 0.9"]
    second.predict(job_id, api_name="/jobs_stop")
    while time.monotonic() < deadline and job_row(second, job_id)[1] == "running":
        time.sleep(0.3)
    assert job_row(second, job_id)[1] == "stopped"
    _, _, status, *_ = second.predict(job_id, api_name="/jobs_refresh")
    assert "**stopped**" in status and "Error" not in status     # a stop the person asked for is no error
    second.close()


def test_loss_frame_smooths_then_thins():
    from app.views import loss_frame

    metrics = [{"step": i, "loss": float(i % 2), "lr": 1e-4} for i in range(1, 10_001)] + [{"step": 10_001}]
    frame = loss_frame(metrics, max_points=1000)
    raw = frame[frame.series == "loss"]
    assert len(raw) == 1001 and raw.step.iloc[0] == 1 and raw.step.iloc[-1] == 10_000
    ema = frame[frame.series == "EMA 0.9"].loss
    assert 0.4 < ema.iloc[-1] < 0.6            # the smoothed value of an alternating 0/1 series


def test_app_import_does_not_load_torch():
    code = ("import sys, app.main, app.context, app.jobs, app.forms, importlib\n"
            "from app.tabs import TABS\n"
            "[importlib.import_module('app.tabs.' + t) for t in TABS]\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.parametrize("args", [["--listen"], ["--host", "0.0.0.0"], ["--host", "192.168.1.5"]])
def test_launch_refuses_a_public_address_without_a_login(args, tmp_path):
    proc = subprocess.run([sys.executable, "launch.py", "--no-browser", "--data_dir", str(tmp_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "refusing to serve" in proc.stderr and "--auth" in proc.stderr
    assert not (tmp_path / "jobs").exists()           # refused before anything started


def test_launch_auth_must_be_user_and_password(tmp_path):
    proc = subprocess.run([sys.executable, "launch.py", "--listen", "--auth", "justaname", "--data_dir",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "USER:PASSWORD" in proc.stderr


# ---- forms: config fields → widgets → config ----------------------------------------------------------

def test_form_round_trip_keeps_every_field():
    cfg = C.GenerateImageConfig(prompt="a cat", image_size=[512, 768], infer_steps=30, guidance_scale=5.5,
                                seed=42, lora_weight=["/m/a b.safetensors", "/m/c.safetensors"],
                                lora_multiplier=[0.5, 1.0], model_version="edit-2509", attn_mode="flash",
                                fp8=True, save_path="/out")
    values = config_to_values(cfg)
    assert values["image_size"] == "512 768" and values["lora_weight"] == "/m/a b.safetensors\n/m/c.safetensors"
    assert values["seed"] == 42 and values["fp8"] is True and values["negative_prompt"] == ""
    back = values_to_config(C.GenerateImageConfig, values, base=cfg)
    assert back == cfg
    assert to_argv(back) == to_argv(cfg)


def test_form_round_trip_for_training_defaults():
    cfg = C.TrainNetworkConfig(dit="/m/dit.safetensors", learning_rate=1e-4, network_dim=16,
                               max_train_steps=500, optimizer_args=["weight_decay=0.01"])
    assert values_to_config(C.TrainNetworkConfig, config_to_values(cfg)) == cfg


def test_form_values_are_validated_like_the_cli():
    with pytest.raises(ConfigError, match="infer_steps"):
        values_to_config(C.GenerateImageConfig, {"infer_steps": "many"})
    with pytest.raises(ConfigError, match="attn_mode"):
        values_to_config(C.GenerateImageConfig, {"attn_mode": "magic"})
    with pytest.raises(ConfigError, match="no option named 'infer_step'"):
        values_to_config(C.GenerateImageConfig, {"infer_step": 3})
    # empty boxes mean "not set"
    cfg = values_to_config(C.GenerateImageConfig, {"seed": None, "model_version": "", "prompt": ""})
    assert cfg.seed is None and cfg.model_version is None and cfg.prompt is None


def test_form_widget_kinds_follow_field_types():
    fields = {f.name: f for f in gui_fields(C.GenerateImageConfig)}
    assert widget_kind(fields["fp8"]) == "bool" and widget_kind(fields["attn_mode"]) == "choice"
    assert widget_kind(fields["infer_steps"]) == "number" and widget_kind(fields["prompt"]) == "text"
    assert widget_kind(fields["lora_weight"]) == "list"
    assert "events_file" not in fields and "from_file" not in fields    # gui=False fields stay out


def test_build_form_groups_fields_and_hides_advanced_ones():
    import gradio as gr

    from app.forms import build_form

    with gr.Blocks():
        form = build_form(C.GenerateImageConfig, include=["prompt", "infer_steps", "attn_mode", "fp8",
                                                          "vae_enable_tiling", "image_size"], elem_prefix="gen")
    kinds = {n: type(c).__name__ for n, c in form.components.items()}
    assert kinds == {"prompt": "Textbox", "image_size": "Textbox", "infer_steps": "Number",
                     "attn_mode": "Dropdown", "fp8": "Checkbox", "vae_enable_tiling": "Checkbox"}
    assert form.components["infer_steps"].label == "Infer steps"
    assert form.components["fp8"].elem_id == "gen-fp8"
    accordion = form.components["vae_enable_tiling"].parent
    while not isinstance(accordion, gr.Accordion):
        accordion = accordion.parent
    assert accordion.label == "Memory: advanced" and accordion.open is False
    cfg = form.to_config("a dog", "256 256", 7, "sdpa", False, True)
    assert cfg.prompt == "a dog" and cfg.infer_steps == 7 and cfg.vae_enable_tiling is True


def test_context_submits_a_config_as_its_exact_argument_list(tmp_path):
    from app.context import AppContext
    from app.jobs import JobManager

    ctx = AppContext(data_dir=tmp_path, jobs=JobManager(tmp_path / "jobs"))
    cfg = C.InspectModelConfig(files=[str(tmp_path / "a b.safetensors")], json=True)
    job = ctx.submit_config("inspect_model", cfg)
    try:
        assert job.argv[3:] == ["inspect_model", str(tmp_path / "a b.safetensors"), "--json"]
        assert ctx.jobs.wait(job.id, timeout=60)["status"] == "done"
    finally:
        ctx.jobs.close()


def test_listen_with_a_login_serves_only_after_login(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    from _app_util import launched

    data = tmp_path / "data"
    data.mkdir()
    (data / "settings.json").write_text(json.dumps({"models": {"dit": "/models/dit.safetensors"}}))
    with launched(data, "--listen", env={"QIS_AUTH": "ann:secret"}) as app:
        url = app["url"]
        with pytest.raises(AuthenticationError):
            Client(url, headers=app["headers"], verbose=False)     # no login: the app's config is not served
        assert get(url + "config", app["headers"])[0] == 401
        client = Client(url, auth=("ann", "secret"), headers=app["headers"], verbose=False)
        table, _ = client.predict("", "", "", "", "", "", "", api_name="/models_inspect")
        assert table["data"] == []
        assert not (data / "demo").exists()        # a configured DiT: no demo was built


def test_the_demo_is_used_until_a_dit_is_configured(tmp_path, demo_dir, demo_manifest):
    from app.context import open_context

    (tmp_path / "demo").symlink_to(demo_dir, target_is_directory=True)   # complete: found, not rebuilt
    ctx = open_context(tmp_path)                                         # no settings at all
    try:
        assert ctx.demo is not None and ctx.dit_path("edit-2509") == demo_manifest["dit"]["edit-2509"]
        assert ctx.model_path("tokenizer") == demo_manifest["tokenizer"]
        ctx.save_model_paths({"dit": "/models/qwen_image_bf16.safetensors"})
    finally:
        ctx.jobs.close()
    ctx = open_context(tmp_path)                                         # a DiT is configured now
    try:
        assert ctx.demo is None and ctx.dit_path("original") == "/models/qwen_image_bf16.safetensors"
        assert ctx.model_path("vae") == ""
    finally:
        ctx.jobs.close()
    ctx = open_context(tmp_path, demo=True)                              # --demo: the demo's paths win
    try:
        assert ctx.dit_path("original") == demo_manifest["dit"]["original"]
    finally:
        ctx.jobs.close()
