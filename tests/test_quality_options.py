"""The training-quality options in the contract: the estimator counts --use_ema where it lives, the options reach
the command line, the run TOML and the Train tab's form, and the Train tab charts the validation loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.spec import config as C
from engine.train.checkpoints import prune
from app import train_runs
from app.views import loss_frame
from engine.spec.vram import estimate_config

GIB = 1024 ** 3


def est(**values):
    return estimate_config(C.from_dict(C.EstimateVramConfig, dict(for_command="train_network", network_dim=64,
                                                                  mixed_precision="bf16", **values)))


def test_ema_memory_goes_where_the_average_lives():
    plain, cpu, gpu = est(), est(use_ema=True), est(use_ema=True, ema_device="accelerator")
    ema = plain["inputs"]["trainable_params"] * 4 / GIB
    assert cpu["vram_gib"] == plain["vram_gib"]
    step = {name: run["phases"]["training_step"] for name, run in (("plain", plain), ("cpu", cpu), ("gpu", gpu))}
    assert step["cpu"]["ram_gib"] == pytest.approx(step["plain"]["ram_gib"] + ema, abs=2e-3)
    assert step["gpu"]["vram_gib"] == pytest.approx(step["plain"]["vram_gib"] + ema, abs=2e-3)
    assert any("--use_ema" in n for n in cpu["notes"]) and not any("--use_ema" in n for n in plain["notes"])


def test_options_on_the_command_line_and_in_the_run_toml(tmp_path):
    argv = ["--use_ema", "--ema_decay", "0.99", "--ema_device", "accelerator", "--validation_dataset_config",
            "v.toml", "--validation_every_n_steps", "50", "--validation_timesteps", "250", "750"]
    cfg = C.parse_args(C.TrainNetworkConfig, argv, "train_network")
    assert (cfg.use_ema, cfg.ema_decay, cfg.ema_device) == (True, 0.99, "accelerator")
    assert cfg.validation_timesteps == [250, 750] and cfg.validation_every_n_steps == 50
    with pytest.raises(C.ConfigError):
        C.validate(C.from_dict(C.TrainNetworkConfig, {"ema_decay": 1.5}))
    with pytest.raises(C.ConfigError):
        C.validate(C.from_dict(C.TrainNetworkConfig, {"validation_timesteps": [0]}))
    C.save_toml(cfg, tmp_path / "run.toml", only_changed=True)
    back = C.load_toml(C.TrainNetworkConfig, tmp_path / "run.toml")
    assert back == cfg


def test_train_tab_form_and_chart():
    names = train_runs.form_names()
    for name in ("use_ema", "ema_decay", "ema_device", "ema_validation", "validation_dataset_config",
                 "validation_every_n_steps", "validation_images"):
        assert name in names
    metrics = [{"step": 0, "val_loss": 0.9, "val_loss_ema": 0.9}] + [
        {"step": s, "loss": 1.0 / s, "lr": 1e-4} for s in range(1, 6)] + [{"step": 5, "val_loss": 0.5}]
    frame = loss_frame(metrics)
    val = frame[frame.series == "validation"]
    assert list(val.step) == [0, 5] and list(val.loss) == [0.9, 0.5]
    assert list(frame[frame.series == "validation (EMA weights)"].step) == [0]
    status = train_runs.status_markdown({"status": "running", "id": "x", "metrics": metrics})
    assert "loss 0.2" in status and "validation 0.5 (step 5)" in status


def test_ema_twins_are_pruned_with_their_checkpoint(tmp_path):
    for step in (2, 4):
        for suffix in ("", "-ema"):
            (tmp_path / f"lora-step{step:08d}{suffix}.safetensors").write_bytes(b"x")
    cfg = SimpleNamespace(save_last_n_steps=1, save_every_n_steps=2, save_last_n_epochs=None,
                          save_every_n_epochs=None, output_dir=tmp_path, output_name="lora")
    removed = sorted(p.name for p in prune(cfg, "step", 4))
    assert removed == ["lora-step00000002-ema.safetensors", "lora-step00000002.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-step00000004-ema.safetensors",
                                                         "lora-step00000004.safetensors"]
