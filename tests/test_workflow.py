"""The state that follows the person across tabs (app/workflow.py and its wiring): plain rules without a server,
then the same rules through a running Studio (gradio_client)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from _app_util import start_slow_job, studio  # noqa: F401  (studio is a fixture)

from app import workflow as W
from app.context import load_settings
from app.views import shown_error
from engine.spec import config as C


def fake_ctx(tmp_path, demo=None, models=None):
    models = models or {}
    return SimpleNamespace(data_dir=tmp_path, settings={}, demo=demo,
                           model_path=lambda k: models.get(k, ""),
                           dit_path=lambda v: models.get("dit" if v == "original" else f"dit_{v}", ""))


def job(id_, command, status, **args):
    argv = [a for k, v in args.items() for a in (f"--{k}", str(v))]
    return {"id": id_, "command": command, "status": status, "argv": ["python", "-m", "engine", command, *argv]}


# ------------------------------------------------------------------ plain rules

def test_last_choices_survive_a_restart(tmp_path):
    ctx = fake_ctx(tmp_path)
    W.remember(ctx, output_name="mine", dataset_form={"folder": "/x"})
    again = fake_ctx(tmp_path)
    again.settings = load_settings(tmp_path)                     # what the next start reads
    assert W.last(again, "output_name") == "mine"
    assert W.last(again, "dataset_form") == {"folder": "/x"}
    assert not list(tmp_path.glob("*.tmp*"))                       # written atomically (no leftovers)


def test_dataset_carries_its_model_version(tmp_path, demo_manifest):
    ctx = fake_ctx(tmp_path, demo=demo_manifest)
    assert W.dataset_version(ctx, demo_manifest["dataset_config"]["edit-2509"]) == "edit-2509"     # the demo's
    own = tmp_path / "mine.toml"
    shutil.copy(demo_manifest["dataset_configs"]["edit"], own)
    assert W.dataset_version(ctx, str(own)) == "edit"             # guessed: it has a control folder
    W.remember_dataset(ctx, str(own), "edit-2511")
    assert W.dataset_version(ctx, str(own)) == "edit-2511"        # remembered beats the guess
    assert W.current_dataset(ctx) == str(own)
    assert W.known_datasets(ctx)[0] == str(own)
    assert ("mine · edit-2511", str(own)) in W.dataset_choices(ctx)
    t2i = tmp_path / "t2i.toml"
    shutil.copy(demo_manifest["dataset_configs"]["t2i"], t2i)
    assert W.dataset_version(ctx, str(t2i)) == "original"


def test_cache_state_counts_what_is_missing(tmp_path, demo_manifest):
    ctx = fake_ctx(tmp_path, demo=demo_manifest, models={"vae": demo_manifest["vae"]})
    data = Path(demo_manifest["dataset_configs"]["t2i"]).read_text().replace(
        demo_manifest["dataset"]["cache"], str(tmp_path / "cache"))
    (tmp_path / "t2i.toml").write_text(data)
    state = W.cache_state(ctx, str(tmp_path / "t2i.toml"))
    assert not state["ok"] and state["missing"] == state["total"] == 2 * demo_manifest["dataset"]["count"]
    assert "missing or stale" in state["text"]
    assert "Pick a dataset" in W.cache_state(ctx, None)["text"]
    cmds = W.cache_configs(ctx, str(tmp_path / "t2i.toml"), "original")
    assert [c for c, _ in cmds] == ["cache_latents", "cache_text_encoder_outputs"]
    assert cmds[0][1].vae == demo_manifest["vae"] and cmds[0][1].skip_existing


def test_presets_adapt_to_a_dit_with_fewer_blocks(demo_manifest):
    assert W.dit_blocks(demo_manifest["dit"]["original"]) == 2
    fields, note = W.adapt_blocks({"blocks_to_swap": 48, "fp8_base": True}, 2)
    assert fields == {"blocks_to_swap": 1, "fp8_base": True} and "48 → 1" in note
    assert W.adapt_blocks({"blocks_to_swap": 16}, 60) == ({"blocks_to_swap": 16}, "")
    assert W.adapt_blocks({"blocks_to_swap": 16}, None) == ({"blocks_to_swap": 16}, "")
    assert W.adapt_blocks({"fp8_base": True}, 2) == ({"fp8_base": True}, "")


def test_models_come_from_the_models_tab_unless_overridden(tmp_path):
    ctx = fake_ctx(tmp_path, models={"dit_edit": "/m/edit.safetensors", "vae": "/m/vae.safetensors"})
    cfg = W.fill_models(ctx, C.GenerateImageConfig(model_version="edit"))
    assert (cfg.dit, cfg.vae) == ("/m/edit.safetensors", "/m/vae.safetensors")
    mine = W.fill_models(ctx, C.GenerateImageConfig(model_version="edit", vae="/own/vae.safetensors"))
    assert mine.vae == "/own/vae.safetensors"


def test_generate_conflicts_are_named_before_the_run():
    assert W.generate_conflicts(False, "", False, True) == []
    both = W.generate_conflicts(True, "0.5", False, True)
    assert len(both) == 1 and "cannot be used together" in both[0]
    assert "does nothing without" in W.generate_conflicts(False, "", True, True)[0]
    assert "needs an edit model" in W.generate_conflicts(False, 0.5, False, False)[0]


def test_a_stop_the_person_asked_for_is_not_an_error():
    stopped = {"status": "stopped", "error": {"kind": "interrupted", "message": "stopped by the user"}}
    assert shown_error(stopped) is None
    failed = {"status": "failed", "error": {"kind": "cache", "message": "missing"}}
    assert shown_error(failed) == failed["error"]
    assert shown_error({"status": "running", "error": failed["error"]}) is None


def test_timers_run_only_for_the_shown_busy_tab():
    from app.main import timer_states

    ctx = SimpleNamespace(timers=[("train", None, lambda: True), ("generate", None, lambda: False),
                                  ("jobs", None, lambda: True)])
    states = timer_states(ctx, "train")
    assert [s.active for s in states] == [True, False, False]
    assert [s.active for s in timer_states(ctx, "models")] == [False, False, False]


def test_a_new_image_folder_resets_the_control_folder(tmp_path, demo_manifest):
    from app.tabs.dataset import folder_changed

    t2i = tmp_path / "my photos"
    shutil.copytree(demo_manifest["dataset"]["images"], t2i)
    assert folder_changed(None, str(t2i)) == ["", "my_photos", "original"]
    root = tmp_path / "pairs"
    shutil.copytree(demo_manifest["dataset"]["images"], root / "images")
    shutil.copytree(demo_manifest["dataset"]["control"], root / "control")
    controls, name, version = folder_changed(None, str(root))
    assert (controls, name, version) == ("", "pairs", "edit")


# ------------------------------------------------------------------ through a running Studio

def client_for(studio):
    from gradio_client import Client
    return Client(studio["url"], headers=studio["headers"], verbose=False)


def test_train_on_it_carries_the_dataset_and_its_version(studio, tmp_path):
    client = client_for(studio)
    folder = tmp_path / "holiday"
    shutil.copytree(studio["manifest"]["dataset"]["images"], folder)
    out = client.predict(str(folder), "", "holiday", "original", 64, 64, ".txt", 1, 1, True, False, False, "",
                         api_name="/dataset_import")
    toml_text, save_as = out[0], out[1]
    message = client.predict(toml_text, save_as, "original", api_name="/dataset_train_it")   # (+ the tab shown)
    assert message.startswith("Saved")
    settings = json.loads((studio["data_dir"] / "settings.json").read_text())
    assert settings["last"]["dataset_config"] == str(Path(save_as).resolve())       # kept for the next start
    assert settings["dataset_versions"][str(Path(save_as).resolve())] == "original"
    assert settings["last"]["dataset_form"]["folder"] == str(folder)
    # the Train tab's picker: the version and the cache status follow the dataset
    version, note, status, _ = client.predict(str(Path(save_as).resolve()), "", api_name="/train_dataset")
    assert version == "original" and "original" in note and "missing or stale" in status
    # the Cache tab's picker: the model version follows too (not the demo's "edit")
    version, summary, _ = client.predict(str(Path(save_as).resolve()), "", "", "", api_name="/cache_dataset")
    assert version == "original" and "Model version **original**" in summary


def test_a_second_run_with_the_same_name_is_refused(studio, tmp_path):
    from app import train_runs as R

    client = client_for(studio)
    blocker = start_slow_job(client, tmp_path)                   # holds the GPU slot: runs queue
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/train_start"]["parameters"]
    names = ["kind", "procs", "cache_first", *R.form_names(), "fsdp"]
    values = dict(zip(names, [p.get("parameter_default") for p in params], strict=True))
    values.update(output_dir=str(tmp_path / "same"), output_name="twin", cache_first=False)
    first = None
    try:
        first, message, *_ = client.predict(*values.values(), api_name="/train_start")
        assert "Started" in message
        _, refused, *_ = client.predict(*values.values(), api_name="/train_start")
        assert "Not started" in refused and "twin_2" in refused and first["value"] in refused
    finally:
        if first:
            client.predict(first["value"], api_name="/train_kill")
        client.predict(blocker, api_name="/jobs_kill")
