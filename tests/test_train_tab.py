"""The Train tab (app/tabs/train.py) as a user meets it: a running Studio driven through gradio_client. Presets
change the form and the estimate, the command shown is the command that runs, run TOMLs round-trip, and a real
demo LoRA training is started, watched, re-attached after a "refresh" (a new client), stopped and resumed.
Plus the plain rules behind the tab (app/train_runs.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from _app_util import REPO, browser_page, studio  # noqa: F401  (studio is a fixture)

from app import train_runs as R
from app.forms import values_to_config
from engine.spec import config as C
from engine.spec.presets import PRESET_DIR, estimate_preset, load_preset

NAMES = ["kind", "procs", *R.form_names(), "fsdp"]  # the argument order of train_preview / train_start / ...


def client_for(studio):
    from gradio_client import Client
    return Client(studio["url"], headers=studio["headers"], verbose=False)


def form_values(client, **overrides) -> dict:
    """The form as the page first shows it (the endpoint's defaults), with some options changed by name."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/train_preview"]["parameters"]
    values = dict(zip(NAMES, [p.get("parameter_default") for p in params], strict=True))
    unknown = set(overrides) - set(values)
    assert not unknown, unknown
    values.update(overrides)
    return values


def start_args(values: dict, cache_first: bool = False) -> list:
    """/train_start takes the form with "queue the caching first" after kind and procs."""
    rest = [v for k, v in values.items() if k not in ("kind", "procs")]
    return [values["kind"], values["procs"], cache_first, *rest]


def kind_values(values: dict, kind: str) -> list:
    return [values[n] for n in R.kind_names(kind, R.form_names())]


@pytest.fixture(scope="module")
def cached_dataset(studio, tmp_path_factory):
    """The demo's text-to-image dataset with its caches built by the engine CLI, in a folder of this module (the
    session's demo set stays read-only)."""
    manifest = studio["manifest"]
    root = tmp_path_factory.mktemp("train_tab_dataset")
    data = tomllib.loads(Path(manifest["dataset_config"]["original"]).read_text(encoding="utf-8"))
    for entry in data["datasets"]:
        entry["cache_directory"] = str(root / "cache")
    config = root / "dataset.toml"
    config.write_text(tomli_w.dumps(data), encoding="utf-8")
    for command, model in (("cache_latents", ["--vae", manifest["vae"]]),
                           ("cache_text_encoder_outputs", ["--text_encoder", manifest["text_encoder"],
                                                           "--tokenizer", manifest["tokenizer"]])):
        subprocess.run([sys.executable, "-m", "engine", command, "--dataset_config", str(config), *model],
                       cwd=REPO, check=True, capture_output=True, timeout=600)
    return str(config)


# ------------------------------------------------------------------ plain rules

def test_form_order_covers_both_kinds_once():
    names = R.form_names()
    assert len(names) == len(set(names))
    for kind, cls in R.KINDS.items():
        assert set(R.kind_names(kind, names)) == {f.name for f in C.option_fields(cls) if f.metadata["gui"]}
    assert names[:5] == R.group_names("Model")                      # essentials first
    assert "network_dim" not in R.kind_names("train", names) and "full_bf16" not in R.kind_names("train_network", names)


def test_accelerate_launch_only_for_several_gpus_or_mixed_precision():
    plain = C.TrainNetworkConfig(dit="d.safetensors")
    assert R.accelerate_options(plain, 1) is None
    assert R.launch_argv("train_network", plain, 1)[1:4] == ["-m", "engine", "train_network"]
    bf16 = C.TrainNetworkConfig(dit="d.safetensors", mixed_precision="bf16")
    argv = R.launch_argv("train_network", bf16, 2)
    assert argv[1] == "launch" and Path(argv[0]).name == "accelerate"
    assert argv[argv.index("--num_processes") + 1] == "2" and "--multi_gpu" in argv
    assert argv[argv.index("--mixed_precision") + 1] == "bf16"
    assert argv[argv.index("-m"):argv.index("-m") + 3] == ["-m", "engine", "train_network"]
    assert argv[argv.index("train_network") + 1:] == C.to_argv(bf16)
    with pytest.raises(C.ConfigError, match="Processes"):
        R.accelerate_options(plain, 0)


def test_preflight_names_each_missing_field_and_file(tmp_path):
    cfg = C.TrainNetworkConfig(dit=str(tmp_path / "missing.safetensors"), output_dir=str(tmp_path))
    problems = "\n".join(R.preflight(cfg))
    assert "`dataset_config` is empty" in problems and "`output_name` is empty" in problems
    assert "missing.safetensors does not exist" in problems


def test_a_finetune_toml_loaded_in_the_lora_form_switches_the_kind(tmp_path):
    C.save_toml(C.TrainConfig(full_bf16=True, mixed_precision="bf16"), tmp_path / "ft.toml")
    kind, cfg = R.load_run_toml(str(tmp_path / "ft.toml"), "train_network")
    assert kind == "train" and cfg.full_bf16
    (tmp_path / "bad.toml").write_text("[network]\nnetwork_dimm = 4\n")
    with pytest.raises(C.ConfigError, match="network_dimm"):
        R.load_run_toml(str(tmp_path / "bad.toml"), "train_network")


# ------------------------------------------------------------------ the tab in a running Studio

def test_preset_click_changes_the_form_and_the_estimate(studio):
    client = client_for(studio)
    values = form_values(client)
    before = client.predict(*kind_values(values, "train_network"), 1024, 1024, api_name="/train_lora_estimate")
    names = R.kind_names("train_network", R.form_names())
    out = client.predict(*kind_values(values, "train_network"), api_name="/train_lora_apply_lora_12gb")
    applied, note, cards = dict(zip(names, out[:len(names)])), out[len(names)], out[len(names) + 1:]
    preset = load_preset(PRESET_DIR / "lora-12gb.toml")
    for name, value in preset.fields.items():       # blocks_to_swap adapts to the demo DiT's 2 blocks
        assert applied[name] == (1 if name == "blocks_to_swap" else value), name
    assert applied["dit"] == values["dit"] and applied["learning_rate"] == values["learning_rate"]   # the rest kept
    assert "Applied **LoRA · 12 GB**" in note and "blocks_to_swap 48 → 1" in note
    assert "applied" in cards[0]["value"] and "applied" not in cards[1]["value"]     # the applied card is marked
    preset = dataclasses.replace(preset, fields={**preset.fields, "blocks_to_swap": 1})
    after = client.predict(*applied.values(), 1024, 1024, api_name="/train_lora_estimate")
    assert after != before and f"{estimate_preset(preset)['vram_gib']:.1f} GiB VRAM" in after


def test_a_preset_on_a_form_with_a_wrong_field_names_the_field(studio):
    client = client_for(studio)
    values = form_values(client, output_name="../escape")      # e.g. remembered from before the rule existed
    names = R.kind_names("train_network", R.form_names())
    out = client.predict(*kind_values(values, "train_network"), api_name="/train_lora_apply_lora_12gb")
    note = out[len(names)]
    assert "Not applied" in note and "--output_name '../escape'" in note and "my_lora" in note


def test_the_shown_command_is_the_command_that_runs(studio, tmp_path):
    client = client_for(studio)
    values = form_values(client, max_train_steps=7, network_dim=8, output_dir=str(tmp_path / "run"),
                         output_name="cmd_check", dataset_config=str(tmp_path / "no_such_dataset.toml"))
    command, toml_text = client.predict(*values.values(), api_name="/train_preview")
    assert " -m qis_fake_engine train_network " in command and "--network_dim 8" in command
    cfg = C.from_dict(C.TrainNetworkConfig, {k: v for group in tomllib.loads(toml_text).values()
                                             for k, v in group.items()})
    assert cfg.max_train_steps == 7 and cfg.output_name == "cmd_check"
    # the same widgets as a full finetune: its own command and options, none of the LoRA's
    ft = dict(values, kind="train", full_bf16=True, mixed_precision="bf16")
    ft_command, ft_toml = client.predict(*ft.values(), api_name="/train_preview")
    assert " launch " in ft_command and " -m qis_fake_engine train " in ft_command       # bf16: accelerate launch
    assert "--full_bf16" in ft_command and "--network_dim" not in ft_command and "network" not in ft_toml
    # the dataset file is missing: Start refuses before queuing anything, naming the field
    _, message, *_ = client.predict(*start_args(values), api_name="/train_start")
    assert "`dataset_config`" in message and "does not exist" in message
    # a full run is queued with exactly the command shown (its dataset exists; it fails later without caches)
    values["dataset_config"] = studio["manifest"]["dataset_config"]["original"]
    command, _ = client.predict(*values.values(), api_name="/train_preview")
    menu, message, started, *_ = client.predict(*start_args(values), api_name="/train_start")
    assert started == command and menu["value"] in message
    client.predict(menu["value"], api_name="/train_kill")


def test_run_toml_save_and_load_round_trip(studio, tmp_path):
    client = client_for(studio)
    values = form_values(client, network_dim=16, network_alpha=8, blocks_to_swap=12, optimizer_args="weight_decay=0.01",
                         lr_scheduler="cosine", seed=123)
    path = tmp_path / "saved" / "run.toml"
    message = client.predict(str(path), *values.values(), api_name="/train_save_toml")
    assert str(path) in message
    expected = values_to_config(C.TrainNetworkConfig, {n: values[n] for n in R.kind_names("train_network", R.form_names())})
    m = studio["manifest"]           # empty model boxes are saved as the Models tab's files: the TOML runs as it is
    expected = dataclasses.replace(expected, dit=m["dit"]["original"], vae=m["vae"], text_encoder=m["text_encoder"],
                                   tokenizer=m["tokenizer"])
    assert C.load_toml(C.TrainNetworkConfig, path) == expected
    kind, *loaded, note = client.predict(str(path), "train", api_name="/train_load_toml")
    assert kind == "train_network" and str(path) in note        # a LoRA file switches a finetune form back
    loaded = dict(zip(R.form_names(), loaded))
    assert values_to_config(C.TrainNetworkConfig, {n: loaded[n] for n in R.kind_names("train_network", R.form_names())}) \
        == expected
    _, *_, bad = client.predict(str(tmp_path / "nope.toml"), "train_network", api_name="/train_load_toml")
    assert "Not loaded" in bad and "nope.toml" in bad


def points(out) -> list:
    """The loss chart's rows (step, loss, series) in a refresh's outputs."""
    return ((out[1] or {}).get("value") or {}).get("data") or []


def _skipped(value) -> bool:
    return isinstance(value, dict) and set(value) == {"__type__"}


def wait_for(client, predicate, what: str, timeout: float = 240.0):
    """Poll the tab's refresh (what the page's timer calls) until `predicate(outputs)` holds."""
    deadline = time.monotonic() + timeout
    out = None
    while time.monotonic() < deadline:
        new = client.predict(None, "", "", api_name="/train_refresh")
        # the tab resends menus, chart and gallery only when they changed (a per-session State): keep the last ones
        out = [old if _skipped(value) else value for old, value in zip(out or new, new)]
        if predicate(out):
            return out
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last status: {out and out[5]}")


def test_demo_training_live_view_reattach_stop_and_resume(studio, cached_dataset, tmp_path):
    first = client_for(studio)
    out_dir = tmp_path / "lora_run"
    values = form_values(first, dataset_config=cached_dataset, output_dir=str(out_dir), output_name="live",
                         max_train_steps=2000, save_every_n_steps=3, sample_every_n_steps=3, save_state=True,
                         max_data_loader_n_workers=0)
    menu, message, *_ = first.predict(*start_args(values), api_name="/train_start")
    run_id = menu["value"]
    out = wait_for(first, lambda o: o[0]["value"] == run_id and o[3].get("choices") and len(points(o)) >= 6,
                   "progress, loss points and a checkpoint")
    assert "running" in out[5] and "lr 0.001" in out[5]
    assert "/2000 step" in out[6] and "ETA" in out[6]                          # progress with ETA
    assert "RAM: now" in out[7]                                                  # the gauge, from vram events
    assert {row[2] for row in points(out)} == {"loss", "EMA 0.9"}                # raw + smoothed
    first.close()

    second = client_for(studio)                 # a browser refresh: nothing of the first session is left
    out = wait_for(second, lambda o: o[0]["value"] == run_id and o[2], "re-attach and a sample image")
    assert "running" in out[5]
    ckpt = out[3]["value"]
    assert Path(ckpt).name.startswith("live-step") and Path(ckpt).exists()
    assert "Generate tab will use" in second.predict(run_id, ckpt, api_name="/train_use_in_generate")
    lora, multiplier, dit = second.predict(api_name="/generate_opened")     # opening the Generate tab takes it
    assert lora == ckpt and multiplier == "1.0" and _skipped(dit)
    assert _skipped(second.predict(api_name="/generate_opened")[0])         # taken once: later edits stay

    second.predict(run_id, api_name="/train_stop")
    out = wait_for(second, lambda o: "**stopped**" in o[5], "the stop")
    state = Path(out[4]["value"])                                                # the newest state: saved on the way out
    step = json.loads((state / "train_state.json").read_text())["step"]
    assert step >= max(row[0] for row in points(out))
    assert state.name == f"live-step{step:08d}-state" and (out_dir / f"live-step{step:08d}.safetensors").exists()

    kind, *resumed, note = second.predict(run_id, out[4]["value"], api_name="/train_resume")
    resumed = dict(zip(R.form_names(), resumed))
    assert kind == "train_network" and resumed["resume"] == out[4]["value"] and "--resume" in note
    resumed.update(max_train_steps=step + 2, save_every_n_steps=None, sample_every_n_steps=None,
                   sample_prompts=None)         # no samples: the resumed run does not load the text encoder
    menu, _, command, *_ = second.predict(kind, 1, False, *resumed.values(), api_name="/train_start")
    assert f"--resume {out[4]['value']}" in command
    out = wait_for(second, lambda o: o[0]["value"] == menu["value"] and "**done**" in o[5], "the resumed run")
    steps = [row[0] for row in points(out) if row[2] == "loss"]
    assert steps == [step + 1, step + 2]                                         # continued, not restarted


# ------------------------------------------------------------------ in a real browser

def shot(locator, tries: int = 3) -> bytes:
    """An element screenshot; the plot may be re-mounted by an update while it is taken: try again."""
    from playwright.sync_api import Error

    for attempt in range(tries):
        try:
            return locator.screenshot()
        except Error:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


@pytest.mark.browser
def test_browser_preset_then_training_updates_the_loss_chart(studio, cached_dataset, tmp_path):
    from playwright.sync_api import expect

    def box(name):
        return page.locator(f"#train-{name} textarea, #train-{name} input").first

    with browser_page(1280, 1000) as page:
        page.goto(studio["open_url"])
        page.get_by_role("tab", name="Train").click()
        page.get_by_text("VRAM estimate of this form").first.click()        # folded under the cards
        estimate = page.locator("#train-lora-estimate")
        expect(estimate).to_contain_text("Estimated peak")
        before = estimate.inner_text()
        page.locator("#train-lora-apply-lora-12gb").click()               # a preset card
        expect(page.locator("#train-lora-card-lora-12gb")).to_contain_text("applied", timeout=30_000)
        page.get_by_text("More options (values are kept").first.click()
        expect(box("blocks_to_swap")).to_have_value("1", timeout=30_000)   # 48, adapted to the demo's 2 blocks
        expect(estimate).not_to_have_text(before, timeout=30_000)
        page.get_by_text("Command line and run TOML").first.click()
        expect(box("command")).to_have_value(re.compile(r"--blocks_to_swap 1 "), timeout=30_000)  # follows

        page.reload()                         # back to the form's defaults: the preset's fp8/bf16 are for GPUs
        page.get_by_role("tab", name="Train").click()
        page.get_by_text("More options (values are kept").first.click()
        box("dataset-pick").fill(cached_dataset)
        box("dataset-pick").press("Enter")
        for name, value in (("output_dir", str(tmp_path / "browser_run")), ("max_train_steps", "2000"),
                            ("sample_prompts", ""), ("sample_every_n_steps", ""), ("save_every_n_steps", "")):
            box(name).fill(value)
            box(name).press("Tab")
        page.locator("#train-start").click()
        message = page.locator("#train-message")
        expect(message).to_contain_text("Started", timeout=30_000)
        run_id = re.search(r"Started ([\w-]+)", message.inner_text()).group(1)
        status, progress = page.locator("#train-status"), page.locator("#train-progress")
        expect(status).to_contain_text(run_id, timeout=30_000)              # the view follows the new run
        expect(progress).to_contain_text("/2000 step", timeout=180_000)      # (earlier runs' charts are gone)
        chart = page.locator("#train-loss")
        expect(chart).to_be_visible(timeout=30_000)
        first = shot(chart)
        step = int(re.search(r"(\d+)/2000 step", progress.inner_text()).group(1))
        expect(progress).not_to_contain_text(f"{step}/2000", timeout=60_000)
        page.wait_for_timeout(1500)                                         # the next timer tick redraws
        assert shot(chart) != first                                         # new points: the chart changed
        page.locator("#train-kill").click()
        expect(page.locator("#train-status")).to_contain_text("stopped", timeout=60_000)


def test_the_dataset_sets_the_model_version_and_the_demo_prompts_but_keeps_the_users(studio, tmp_path):
    client = client_for(studio)
    manifest = studio["manifest"]
    version, note, status, prompts = client.predict(manifest["dataset_config"]["edit-2509"], "",
                                                    api_name="/train_dataset")
    assert (version, prompts) == ("edit-2509", manifest["sample_prompts"]["edit-2509"])
    assert "edit-2509" in note and "cache" in status
    mine = str(tmp_path / "my_prompts.txt")
    version, _, _, prompts = client.predict(manifest["dataset_config"]["edit"], mine, api_name="/train_dataset")
    assert version == "edit" and _skipped(prompts)                                 # the own file is left alone
