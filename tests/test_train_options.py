"""Memory options at the level of the whole training loop (the module-level equalities are in test_block_swap,
test_fp8 and test_optim): the same seed gives the same loss curve and the same trained LoRA with gradient
checkpointing (+ activation CPU offload) and block swap (exact in float32 on CPU), fp8_scaled within 1 % of the
plain loss, and the fused Adafactor backward the same curve as the unfused Adafactor. Plus --resume: a run resumed
from a state saved at step 5 continues with the identical loss curve and ends with the identical LoRA."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from _train_util import cached_dataset, losses, train

STEPS = 4


@pytest.fixture(scope="module")
def setup(demo_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_options")
    return dict(root=root, toml=cached_dataset(demo_manifest, root), dit=demo_manifest["dit"]["original"])


def lora_run(setup, name, *extra, steps=STEPS):
    out = setup["root"] / name
    events = train("train_network", out, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir",
                   out, "--output_name", "r", "--max_train_steps", steps, "--learning_rate", "5e-3",
                   "--network_args", "rank_dropout=0.2", "--seed", 7, *extra)
    return losses(events), load_file(out / "r.safetensors")


@pytest.fixture(scope="module")
def plain(setup):
    return lora_run(setup, "plain")


def assert_same_run(a, b, tol, what):
    (la, wa), (lb, wb) = a, b
    assert la.keys() == lb.keys()
    worst = max(abs(la[s] - lb[s]) for s in la)
    wdiff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    print(f"{what}: max |loss diff| {worst:.2e}, max |LoRA weight diff| {wdiff:.2e}")
    assert worst <= tol and wdiff <= tol * 10


@pytest.mark.parametrize("extra", [("--gradient_checkpointing",),
                                   ("--gradient_checkpointing", "--gradient_checkpointing_cpu_offload"),
                                   ("--blocks_to_swap", "1"),
                                   ("--blocks_to_swap", "1", "--gradient_checkpointing")],
                         ids=["gc", "gc_offload", "block_swap", "block_swap_gc"])
def test_memory_options_give_the_plain_loss(setup, plain, extra):
    assert_same_run(plain, lora_run(setup, "_".join(extra).strip("-"), *extra), 1e-5, " ".join(extra))


def test_fp8_scaled_within_tolerance(setup, plain):
    """Block-wise scaled E4M3 weights: the loss stays within 1 % of the plain run, and is not identical (so the
    option is really on)."""
    fp8_losses, _ = lora_run(setup, "fp8", "--fp8_base", "--fp8_scaled")
    rel = max(abs(fp8_losses[s] - plain[0][s]) / plain[0][s] for s in fp8_losses)
    print(f"fp8_scaled: max relative loss difference {rel:.2e}")
    assert 0 < rel < 0.01


def finetune(setup, name, *extra):
    out = setup["root"] / name
    events = train("train", out, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir", out,
                   "--output_name", "ft", "--max_train_steps", STEPS, "--optimizer_type", "Adafactor",
                   "--optimizer_args", "relative_step=False", "scale_parameter=False", "warmup_init=False",
                   "--learning_rate", "1e-3", "--max_grad_norm", "0", "--seed", 7, *extra)
    return losses(events), load_file(out / "ft.safetensors")


def test_fused_adafactor_gives_the_unfused_loss(setup):
    unfused = finetune(setup, "adafactor")
    fused = finetune(setup, "adafactor_fused", "--fused_backward_pass")
    assert_same_run(unfused, fused, 1e-5, "fused Adafactor backward")
    assert unfused[0][STEPS] != unfused[0][1]          # the weights did move


def test_full_finetune_checkpointing_gives_the_plain_loss(setup):
    assert_same_run(finetune(setup, "ft_plain"), finetune(setup, "ft_gc", "--gradient_checkpointing",
                                                          "--gradient_checkpointing_cpu_offload"), 1e-5,
                    "full finetune with gradient checkpointing + offload")


def test_full_bf16_fused_stays_close(setup):
    """bf16 weights + autocast + stochastic rounding: a different precision, so only close (5 %)."""
    ref, _ = finetune(setup, "fp32_fused", "--fused_backward_pass")
    low, weights = finetune(setup, "bf16_fused", "--fused_backward_pass", "--full_bf16", "--mixed_precision", "bf16")
    rel = max(abs(low[s] - ref[s]) / ref[s] for s in ref)
    print(f"full_bf16: max relative loss difference {rel:.2e}")
    assert rel < 0.05 and all(v.dtype == torch.bfloat16 for v in weights.values())


def test_resume_continues_the_same_curve(setup):
    full, full_weights = lora_run(setup, "uninterrupted", "--save_every_n_steps", "5", "--save_state", steps=12)
    state = setup["root"] / "uninterrupted" / "r-step00000005-state"
    assert (state / "train_state.json").is_file()
    # A save that was killed half-way leaves only a hidden temp folder; it must not disturb the resume.
    shutil.copytree(state, setup["root"] / "uninterrupted" / ".r-step00000010-state.tmp", dirs_exist_ok=True)
    resumed, resumed_weights = lora_run(setup, "resumed", "--resume", state, steps=12)
    assert sorted(resumed) == list(range(6, 13))
    assert all(resumed[s] == full[s] for s in resumed), [(s, full[s], resumed[s]) for s in resumed]
    assert all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)


def test_resume_refuses_an_unfinished_state(setup, tmp_path):
    half = tmp_path / ".r-step00000005-state.tmp"
    half.mkdir()
    events = train("train_network", tmp_path / "out", "--dit", setup["dit"], "--dataset_config", setup["toml"],
                   "--output_dir", tmp_path / "out", "--resume", half, expect_rc=2)
    error = next(e for e in events if e["type"] == "error")
    assert "train_state.json" in error["message"] and "--save_state" in error["hint"]
    assert not any(e["type"] == "phase" for e in events)      # refused before loading anything
