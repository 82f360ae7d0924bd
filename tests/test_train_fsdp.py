"""Sharded full finetune (FSDP2): `accelerate launch --config_file <engine/spec/launch.py's FSDP config>` with two
CPU processes (gloo) must train what one unsharded process trains on the same global batch.

As in tests/test_train_ddp.py: two processes × batch 1 see, at optimizer step s, batches 2s and 2s+1, the same two
that one process with --gradient_accumulation_steps 2 sees, with the same noise and timesteps. FSDP reduce-scatters
each gradient averaged over the processes ((g0 + g1)/2), accumulation sums g0/2 + g1/2: equal in exact arithmetic;
in float32 only the order of the sums may differ. Tolerance: 1e-5 relative on the loss and 1e-6 absolute on the
weights after 3 AdamW steps at lr 1e-4 (the steps move the weights by ~3e-4, so a wrong average, batch or missing
reduction shows up 300× above it).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from app import train_runs as R
from engine.__main__ import main
from engine.spec import config as C
from engine.spec.launch import fsdp_config_text, write_fsdp_config

from _train_harness import PYTHON, _free_port, cached_dataset, metrics, read_events, run_engine, train_argv

pytestmark = pytest.mark.slow
STEPS = 3
COMMON = ("--max_train_steps", str(STEPS), "--save_precision", "float", "--optimizer_type", "AdamW")


@pytest.fixture(scope="module")
def dataset(demo_manifest, tmp_path_factory):
    return cached_dataset(demo_manifest, tmp_path_factory.mktemp("fsdp_data"), batch_size=1)


def fsdp_prefix(folder) -> list[str]:
    config = write_fsdp_config(folder / "accelerate_fsdp.yaml", num_processes=2, mixed_precision="no",
                               main_process_port=_free_port())
    return [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "engine"]


def test_fsdp_two_processes_equal_one_unsharded_process(demo_manifest, dataset, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_engine(train_argv(demo_manifest, dataset, one, *COMMON, "--gradient_accumulation_steps", "2",
                          command="train"))
    run_engine(train_argv(demo_manifest, dataset, two, *COMMON, "--save_every_n_steps", "2", "--save_state",
                          command="train"), prefix=fsdp_prefix(tmp_path))
    events_two = read_events(two / "events.jsonl")
    log = " ".join(e.get("message", "") for e in events_two)
    assert "2 process(es)" in log and "sharded over 2 processes" in log, "the run was not sharded"
    loss_one, loss_two = metrics(read_events(one / "events.jsonl")), metrics(events_two)
    assert sorted(loss_one) == sorted(loss_two) == list(range(1, STEPS + 1))
    assert all(loss_two[s]["loss"] == pytest.approx(loss_one[s]["loss"], rel=1e-5) for s in loss_one)
    assert len({round(m["loss"], 4) for m in loss_one.values()}) > 1

    # the same single-file DiT as one process writes: same keys, shapes, dtype (gathered from the shards)
    base = load_file(demo_manifest["dit"]["original"])
    dit_one, dit_two = load_file(one / "full.safetensors"), load_file(two / "full.safetensors")
    assert dit_one.keys() == dit_two.keys()
    assert all(dit_two[k].shape == dit_one[k].shape and dit_two[k].dtype == torch.float32 for k in dit_one)
    moved = max((dit_one[k] - base[k].float()).abs().max().item() for k in base if k in dit_one)
    worst = max((dit_one[k] - dit_two[k]).abs().max().item() for k in dit_one)
    assert moved > 1e-4 and worst <= 1e-6, (moved, worst)

    # resumable: the sharded state of step 2 continues to the same step-3 loss and the same weights
    state = two / "full-step00000002-state"
    assert (state / "fsdp" / ".metadata").is_file() and (state / "train_state.json").is_file()
    resumed = tmp_path / "resumed"
    run_engine(train_argv(demo_manifest, dataset, resumed, *COMMON, "--resume", str(state), command="train"),
               prefix=fsdp_prefix(tmp_path))
    loss_resumed = metrics(read_events(resumed / "events.jsonl"))
    assert loss_resumed[3]["loss"] == pytest.approx(loss_two[3]["loss"], rel=1e-6)
    dit_resumed = load_file(resumed / "full.safetensors")
    assert max((dit_resumed[k] - dit_two[k]).abs().max().item() for k in dit_two) <= 1e-7


def test_fsdp_refusals_come_before_loading(demo_manifest, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cases = [(("--optimizer_type", "Adafactor"), "train", "Adafactor"),
             (("--blocks_to_swap", "2", "--fused_backward_pass", "--optimizer_type", "Adafactor"), "train",
              "blocks_to_swap"),
             (("--use_ema",), "train", "--use_ema with FSDP"),
             ((), "train_network", "FSDP shards a full finetune")]
    for i, (extra, command, needle) in enumerate(cases):
        out = tmp_path / str(i)
        assert main(train_argv(demo_manifest, dataset, out, *extra, command=command)) == 2
        events = read_events(out / "events.jsonl")
        error = next(e for e in events if e["type"] == "error")
        assert needle in error["message"], error
        assert not any(e["type"] == "phase" and e.get("model") == "dit" for e in events)


def test_train_tab_writes_the_fsdp_config_and_launches_with_it(tmp_path):
    cfg = C.TrainConfig(dit="d.safetensors", dataset_config="x.toml", output_dir=str(tmp_path / "out"),
                        output_name="ft", mixed_precision="bf16")
    argv = R.launch_argv("train", cfg, 8, fsdp=True)
    config = tmp_path / "out" / "ft_accelerate_fsdp.yaml"
    assert argv[argv.index("--config_file") + 1] == str(config) and "--multi_gpu" not in argv
    assert argv[argv.index("-m") + 1:argv.index("-m") + 3] == ["engine", "train"]
    R.write_fsdp("train", cfg, 8)
    text = config.read_text()
    assert "num_processes: 8" in text and "  fsdp_version: 2" in text and "mixed_precision: 'bf16'" in text
    with pytest.raises(C.ConfigError, match="LoRA runs data-parallel"):
        R.launch_argv("train_network", cfg, 8, fsdp=True)
    with pytest.raises(C.ConfigError, match="2 or more"):
        R.launch_argv("train", cfg, 1, fsdp=True)


def test_fsdp_config_file():
    text = fsdp_config_text(16, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    for line in ("distributed_type: FSDP", "  fsdp_version: 2", "num_processes: 16", "num_machines: 2",
                 "machine_rank: 1", "main_process_ip: 10.0.0.1"):
        assert line in text.splitlines()
    with pytest.raises(Exception, match="main machine's address"):
        fsdp_config_text(16, num_machines=2)
    with pytest.raises(Exception, match="at least 2 GPUs"):
        fsdp_config_text(1)
