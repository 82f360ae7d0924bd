"""Multi-process training: `accelerate launch` with two CPU processes (gloo) must train exactly what one
process trains on the same global batch.

Same global batch: the dataset's batch size is per process, and each process takes every 2nd batch of the epoch's
seeded order. So two processes × batch 1 see, at optimizer step s, batches 2s and 2s+1, the same two that one
process with --gradient_accumulation_steps 2 sees. Noise and timesteps belong to the batch (seeded by its place
in the epoch), not to the process, so the two runs draw the same ones. Averaging the two processes' gradients
(all-reduce) must then equal averaging the two accumulated micro-batches.

Tolerance: (g0 + g1)/2 (all-reduce) and g0/2 + g1/2 (accumulation) are equal in exact arithmetic, and with two
processes also in float32 (halving is exact): measured bit-identical losses and LoRA weights. We still allow what
a different summation order would cost (more processes, another all-reduce algorithm): 1e-5 relative on the loss
and 2e-5 of the largest LoRA weight, after 4 AdamW steps at lr 1e-3. Both are far below what a different batch or
noise gives (the losses of consecutive steps differ by ~5 %; the LoRA update itself is ~4e-3).
"""

from __future__ import annotations

import pytest
import torch

from engine.__main__ import main

from _train_harness import accelerate_prefix, cached_dataset, metrics, read_events, run_engine, train_argv

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def dataset(demo_manifest, tmp_path_factory):
    return cached_dataset(demo_manifest, tmp_path_factory.mktemp("ddp_data"), batch_size=1)


def test_two_processes_equal_one_process_on_the_same_global_batch(demo_manifest, dataset, tmp_path):
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    run_engine(train_argv(demo_manifest, dataset, one, "--max_train_steps", str(STEPS),
                          "--gradient_accumulation_steps", "2"))
    run_engine(train_argv(demo_manifest, dataset, two, "--max_train_steps", str(STEPS),
                          "--save_every_n_steps", "2", "--save_state"), prefix=accelerate_prefix(2))

    events_one, events_two = read_events(one / "events.jsonl"), read_events(two / "events.jsonl")
    assert any("2 process(es)" in e.get("message", "") for e in events_two), "accelerate did not start 2 processes"
    # One voice per job: only the main process writes the event stream (one start, one done with the outputs).
    assert [e["type"] for e in events_two].count("start") == 1
    done = [e for e in events_two if e["type"] == "done"]
    assert len(done) == 1 and str(two / "lora.safetensors") in done[0]["outputs"]

    loss_one, loss_two = metrics(events_one), metrics(events_two)
    assert sorted(loss_one) == sorted(loss_two) == list(range(1, STEPS + 1))
    for step in loss_one:
        assert loss_two[step]["loss"] == pytest.approx(loss_one[step]["loss"], rel=1e-5), step
    assert len({round(m["loss"], 3) for m in loss_one.values()}) > 1      # the comparison is not of constants

    lora_one, lora_two = load_file(one / "lora.safetensors"), load_file(two / "lora.safetensors")
    assert lora_one.keys() == lora_two.keys()
    # Trained (lora_up starts at zero): every target of block 0 moved (the last block's text-stream outputs feed
    # nothing the loss sees, so those have no gradient).
    ups = [k for k in lora_one if k.startswith("lora_unet_transformer_blocks_0_") and k.endswith("lora_up.weight")]
    assert len(ups) == 14 and all(lora_one[k].abs().max() > 1e-4 for k in ups)
    scale = max(t.abs().max().item() for k, t in lora_one.items() if not k.endswith(".alpha"))
    worst = max((lora_one[k] - lora_two[k]).abs().max().item() for k in lora_one)
    assert worst <= 2e-5 * scale, f"max |diff| {worst:.3g} (largest weight {scale:.3g})"

    # Saving with two processes: the model file once (main process), the state with both processes' RNG states.
    state = two / "lora-step00000002-state"
    assert (two / "lora-step00000002.safetensors").is_file() and (state / "train_state.json").is_file()
    assert {p.name for p in state.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert not list(two.glob(".*")), "temporary files left behind"

    # Resumed by two processes, it continues the same curve to the same LoRA (each process gets its RNG state back).
    resumed = tmp_path / "resumed"
    run_engine(train_argv(demo_manifest, dataset, resumed, "--max_train_steps", str(STEPS), "--resume", str(state)),
               prefix=accelerate_prefix(2))
    loss_resumed = metrics(read_events(resumed / "events.jsonl"))
    assert {s: m["loss"] for s, m in loss_resumed.items()} == {s: loss_two[s]["loss"] for s in range(3, STEPS + 1)}
    lora_resumed = load_file(resumed / "lora.safetensors")
    assert all(torch.equal(lora_resumed[k], lora_two[k]) for k in lora_two)

    # Its position in the epoch is per process: resuming it with another process count is refused, before loading.
    refused = tmp_path / "refused"
    argv = train_argv(demo_manifest, dataset, refused, "--max_train_steps", str(STEPS), "--resume", str(state))
    assert main(argv) == 2
    events = read_events(refused / "events.jsonl")
    error = next(e for e in events if e["type"] == "error")
    assert "saved by 2 process(es), this run has 1" in error["message"] and "--num_processes 2" in error["hint"]
    assert not any(e["type"] == "phase" and e.get("model") == "dit" for e in events)



def test_full_finetune_two_processes_equal_one(demo_manifest, dataset, tmp_path):
    """The same for `train`: every DiT weight's gradient is all-reduced (another parameter set, another trainee)."""
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--max_train_steps", "3", "--save_precision", "float")
    run_engine(train_argv(demo_manifest, dataset, one, *common, "--gradient_accumulation_steps", "2",
                          command="train"))
    run_engine(train_argv(demo_manifest, dataset, two, *common, command="train"), prefix=accelerate_prefix(2))
    loss_one, loss_two = metrics(read_events(one / "events.jsonl")), metrics(read_events(two / "events.jsonl"))
    assert sorted(loss_one) == sorted(loss_two) == [1, 2, 3]
    assert all(loss_two[s]["loss"] == pytest.approx(loss_one[s]["loss"], rel=1e-5) for s in loss_one)

    base = load_file(demo_manifest["dit"]["original"])
    dit_one, dit_two = load_file(one / "full.safetensors"), load_file(two / "full.safetensors")
    assert dit_one.keys() == dit_two.keys() and all(v.dtype == torch.float32 for v in dit_one.values())
    moved = max((dit_one[k] - base[k].float()).abs().max().item() for k in base if k in dit_one)
    worst = max((dit_one[k] - dit_two[k]).abs().max().item() for k in dit_one)
    assert moved > 1e-4 and worst <= 1e-6, (moved, worst)        # the 3 AdamW steps moved weights by ~3e-4
