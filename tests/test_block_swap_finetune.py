"""Block swap under a full finetune (engine/models/block_swap.py, trainable=True): with the fused Adafactor backward
each weight is stepped while its block is on the device, so a swapped run equals the plain run exactly (CPU as the
"device": same code path, synchronous copies), with and without gradient checkpointing. Without a fused backward
the gradients would outlive their block on the device: refused with a clear error (and by `train`'s checks)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.optimization import Adafactor

from _dit_util import dit_inputs, run, tiny_dit
from engine.spec import config as C
from engine.spec.errors import OptionError
from engine.models.block_swap import enable_block_swap
from engine.models.checkpointing import enable_gradient_checkpointing
from engine.train.optim import enable_fused_backward

BLOCKS = 4
STEPS = 3


@pytest.fixture(scope="module")
def base():
    return tiny_dit(num_layers=BLOCKS).to(torch.bfloat16)       # full_bf16: stochastic rounding is exercised


def bf16(inputs: dict) -> dict:
    return {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def finetune(base, n: int, checkpointing: bool = False):
    # Only the blocks (what is swapped) are trained: the shared time embedding's gradient sums every block's
    # contribution, and the swap's identity nodes change that summation order (bf16 rounding, not a swap error).
    dit = copy.deepcopy(base).train().requires_grad_(False)
    dit.transformer_blocks.requires_grad_(True)
    swap = enable_block_swap(dit, n, "cpu", debug=True, trainable=True) if n else None
    if checkpointing:
        enable_gradient_checkpointing(dit)
    opt = Adafactor(dit.transformer_blocks.parameters(), lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    enable_fused_backward(opt)
    torch.manual_seed(0)                                        # the stochastic rounding noise
    losses = []
    for step in range(STEPS):
        inputs = bf16(dit_inputs(seed=step))
        inputs["hidden_states"].requires_grad_(True)
        loss = run(dit, inputs).float().pow(2).mean()
        loss.backward()
        losses.append(loss.item())
    if swap is not None:
        assert swap.resident == [b < BLOCKS - n for b in range(BLOCKS)]     # ends where it started
    return losses, {k: v.detach().clone() for k, v in dit.state_dict().items()}


@pytest.mark.parametrize("n,checkpointing", [(1, False), (3, False), (2, True)])
def test_swapped_finetune_equals_plain(base, n, checkpointing):
    ref_losses, ref = finetune(base, 0, checkpointing)
    losses, weights = finetune(base, n, checkpointing)
    assert losses == ref_losses and losses[-1] != losses[0]
    changed = [k for k, v in ref.items() if not torch.equal(v, base.state_dict()[k])]
    assert any(".attn.to_q." in k for k in changed) and any("transformer_blocks.3." in k for k in changed)
    for k, v in ref.items():
        assert torch.equal(weights[k], v), k


def test_swapped_finetune_without_fused_backward_is_refused(base):
    dit = copy.deepcopy(base).train().requires_grad_(True)
    enable_block_swap(dit, 2, "cpu", trainable=True)
    inputs = bf16(dit_inputs())
    with pytest.raises(OptionError, match="--fused_backward_pass"):
        run(dit, inputs).float().pow(2).mean().backward()


def test_train_accepts_block_swap_only_with_the_fused_backward():
    from engine.train.validate import _check_memory

    ok = C.TrainConfig(blocks_to_swap=20, fused_backward_pass=True, optimizer_type="Adafactor",
                       full_bf16=True, mixed_precision="bf16")
    _check_memory(ok, full=True)
    with pytest.raises(OptionError, match="--fused_backward_pass"):
        _check_memory(C.TrainConfig(blocks_to_swap=20), full=True)


def test_every_training_preset_passes_its_commands_checks(tmp_path):
    """The presets are runnable: the option checks `train_network` / `train` make before loading accept each."""
    from engine.spec.presets import apply_preset, list_presets
    from engine.train.validate import check_config

    (tmp_path / "dit.safetensors").write_bytes(b"")
    (tmp_path / "dataset.toml").write_text("")
    paths = dict(dit=str(tmp_path / "dit.safetensors"), dataset_config=str(tmp_path / "dataset.toml"),
                 output_dir=str(tmp_path / "out"))
    presets = list_presets("train_network") + list_presets("train")
    assert len(presets) == 14          # + the nf4 and int8 base LoRA presets
    for preset in presets:
        cls = C.TrainConfig if preset.kind == "train" else C.TrainNetworkConfig
        check_config(apply_preset(preset, cls(**paths)), full=preset.kind == "train")
