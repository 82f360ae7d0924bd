"""Saving policy and run bookkeeping: the step/epoch schedule, save_last_n_* pruning, a stop (SIGINT →
KeyboardInterrupt) saving the model and state at the last finished step, epochs with per-epoch saves, and
TensorBoard scalars under --logging_dir."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from _train_util import cached_dataset, losses, train
from engine.train import checkpoints as ckpt
from engine.train.loop import Run, make_schedule


@pytest.fixture(scope="module")
def setup(demo_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_saving")
    return dict(root=root, toml=cached_dataset(demo_manifest, root), dit=demo_manifest["dit"]["original"])


def test_schedule():
    cfg = SimpleNamespace(gradient_accumulation_steps=2, max_train_epochs=None, max_train_steps=10)
    s = make_schedule(cfg, num_batches=8, world=1)
    assert (s.micro_per_epoch, s.steps_per_epoch, s.total_steps, s.epochs) == (8, 4, 10, 3)
    cfg.max_train_epochs = 2
    s = make_schedule(cfg, num_batches=9, world=2)             # 5 batches per process, 3 steps per epoch
    assert (s.micro_per_epoch, s.steps_per_epoch, s.total_steps, s.epochs) == (5, 3, 6, 2)


def test_prune_keeps_the_last_n(tmp_path):
    cfg = SimpleNamespace(output_dir=str(tmp_path), output_name="x", save_last_n_steps=2, save_every_n_steps=10,
                          save_last_n_epochs=None, save_every_n_epochs=None)
    for step in (10, 20, 30):
        (tmp_path / f"x-step{step:08d}.safetensors").write_bytes(b"")
        (tmp_path / f"x-step{step:08d}-state").mkdir()
    (tmp_path / "x.safetensors").write_bytes(b"")
    (tmp_path / "other-step00000010.safetensors").write_bytes(b"")
    removed = ckpt.prune(cfg, "step", 30)
    assert sorted(p.name for p in removed) == ["x-step00000010-state", "x-step00000010.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other-step00000010.safetensors", "x-step00000020-state", "x-step00000020.safetensors",
        "x-step00000030-state", "x-step00000030.safetensors", "x.safetensors"]


def test_stop_saves_the_last_finished_step(setup, tmp_path, monkeypatch):
    original = Run._after_step

    def stop_at_3(self, loss):
        original(self, loss)
        if self.step == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "_after_step", stop_at_3)
    out = tmp_path / "stopped"
    events = train("train_network", out, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir",
                   out, "--output_name", "s", "--max_train_steps", 10, "--save_state", expect_rc=130)
    assert (out / "s-step00000003.safetensors").is_file()
    assert ckpt.read_progress(out / "s-step00000003-state")["step"] == 3
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [3, 3]
    assert events[-1]["type"] == "error" and events[-1]["kind"] == "interrupted"


def test_epochs_and_tensorboard(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, logs = tmp_path / "epochs", tmp_path / "logs"
    events = train("train_network", out, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir",
                   out, "--output_name", "e", "--max_train_epochs", 3, "--gradient_accumulation_steps", 4,
                   "--save_every_n_epochs", 1, "--save_last_n_epochs", 1, "--logging_dir", logs,
                   "--log_with", "tensorboard", "--log_prefix", "run-")
    assert sorted(losses(events)) == list(range(1, 7))                   # 8 batches / 4 = 2 steps per epoch
    # epoch 1 was pruned when epoch 2 was saved; the last epoch is the final file, not an epoch save
    assert sorted(p.name for p in out.glob("e*.safetensors")) == ["e-000002.safetensors", "e.safetensors"]
    (run_dir,) = logs.iterdir()
    assert run_dir.name.startswith("run-")
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss/current", "loss/average", "lr/unet", "loss/epoch"} <= set(tags)
    assert [s.step for s in acc.Scalars("loss/current")] == list(range(1, 7))
    assert [s.step for s in acc.Scalars("loss/epoch")] == [1, 2, 3]          # the last epoch's end counts too


def test_network_weights_continue_from_a_lora(setup, tmp_path):
    """--network_weights loads a LoRA to continue from: with lr 0 the saved LoRA is that file's weights."""
    import torch
    from safetensors.torch import load_file

    first = tmp_path / "first"
    train("train_network", first, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir", first,
          "--max_train_steps", 3, "--learning_rate", "1e-2", "--network_alpha", 2)
    again = tmp_path / "again"
    train("train_network", again, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir", again,
          "--max_train_steps", 1, "--learning_rate", "0", "--network_alpha", 2, "--network_weights",
          first / "qwen_image_lora.safetensors")
    a, b = load_file(first / "qwen_image_lora.safetensors"), load_file(again / "qwen_image_lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_up.weight") and a[k].abs().sum() > 0 for k in a)      # trained, not the zero init


def test_commands_exist():
    from engine.__main__ import main

    for command in ("train_network", "train"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
