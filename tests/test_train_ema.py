"""--use_ema on the demo DiT (LoRA and full finetune): the average saved beside each checkpoint as `-ema`, its math
against the raw checkpoints, decay 0 = the raw weights, and --resume continuing the average exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _train_util import cached_dataset, done_outputs, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(demo_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_ema")
    return dict(root=root, toml=cached_dataset(demo_manifest, root), dit=demo_manifest["dit"]["original"])


def lora_run(setup, name, *extra, steps=3):
    out = setup["root"] / name
    events = train("train_network", out, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir",
                   out, "--output_name", "r", "--max_train_steps", steps, "--learning_rate", "5e-3", "--seed", 7,
                   "--network_args", "rank_dropout=0.2", *extra)
    return out, events


def assert_equal_files(a, b):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_decay_0_is_the_raw_weights(setup):
    out, events = lora_run(setup, "decay0", "--use_ema", "--ema_decay", "0")
    assert str(out / "r-ema.safetensors") in done_outputs(events)
    assert_equal_files(out / "r.safetensors", out / "r-ema.safetensors")
    with safe_open(out / "r-ema.safetensors", "pt") as f:
        assert f.metadata()["ss_ema_decay"] == "0.0"


def test_average_follows_the_raw_checkpoints(setup):
    """Copy until step 1, then ema = 0.9 ema + 0.1 w each step: rebuilt from the raw per-step saves."""
    out, _ = lora_run(setup, "decay09", "--use_ema", "--ema_decay", "0.9", "--ema_start_step", "1",
                      "--save_every_n_steps", "1")
    raw = [load_file(out / f"r-step{s:08d}.safetensors") for s in (1, 2)] + [load_file(out / "r.safetensors")]
    ema = {k: v.clone() for k, v in raw[0].items()}
    for w in raw[1:]:
        for k in ema:
            ema[k] = ema[k] * 0.9 + w[k] * 0.1
    got = load_file(out / "r-ema.safetensors")
    assert_equal_files(out / "r-step00000001.safetensors", out / "r-step00000001-ema.safetensors")
    worst = max((got[k] - ema[k]).abs().max().item() for k in ema if not k.endswith(".alpha"))
    moved = max((got[k] - raw[-1][k]).abs().max().item() for k in ema)
    print(f"EMA vs rebuilt: {worst:.2e}; EMA vs raw: {moved:.2e}")
    assert worst < 1e-6 and moved > 1e-4


def test_resume_continues_the_average(setup):
    run = ("--use_ema", "--ema_decay", "0.8", "--save_every_n_steps", "2", "--save_state")
    full, _ = lora_run(setup, "whole", *run, steps=4)
    assert (full / "r-step00000002-state" / "ema.safetensors").is_file()
    resumed, _ = lora_run(setup, "resumed", *run, "--resume", full / "r-step00000002-state", steps=4)
    assert_equal_files(full / "r.safetensors", resumed / "r.safetensors")
    assert_equal_files(full / "r-ema.safetensors", resumed / "r-ema.safetensors")


def test_full_finetune_ema_on_the_device(setup):
    out = setup["root"] / "full"
    train("train", out, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir", out,
          "--output_name", "f", "--max_train_steps", 2, "--learning_rate", "1e-4", "--seed", 7, "--use_ema",
          "--ema_decay", "0", "--ema_device", "accelerator")
    assert_equal_files(out / "f.safetensors", out / "f-ema.safetensors")
