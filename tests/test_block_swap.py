"""Block swap and gradient checkpointing: outputs and gradients equal the plain model exactly (CPU as the
"device": same code path, synchronous copies), the schedule keeps every used block's weights in the device
storage (debug asserts on each use), and a pass ends in the placement it started from."""

from __future__ import annotations

import copy

import pytest
import torch

from _dit_util import dit_inputs, run, tiny_dit
from engine.spec.errors import OptionError
from engine.models.block_swap import enable_block_swap
from engine.models.checkpointing import enable_gradient_checkpointing
from engine.train.lora import create_network

BLOCKS = 4


@pytest.fixture(scope="module")
def base():
    return tiny_dit(num_layers=BLOCKS)


def _with_lora(dit):
    dit = copy.deepcopy(dit).requires_grad_(False)
    torch.manual_seed(4)                                  # same lora_down init for the model and its reference
    net = create_network(dit, dim=4, alpha=4)
    g = torch.Generator().manual_seed(5)
    for m in net.loras:
        m.lora_up.weight.data = torch.randn(m.lora_up.weight.shape, generator=g) * 0.1
    net.apply_to()
    net.train()
    return dit, net


def _train_step(dit, net):
    net.zero_grad(set_to_none=True)
    inputs = dit_inputs()
    inputs["hidden_states"].requires_grad_(True)      # as musubi does for gradient checkpointing
    loss = run(dit, inputs).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_inference_equals_plain(base, n):
    with torch.no_grad():
        ref = run(base, dit_inputs())
        swapped = copy.deepcopy(base)
        swap = enable_block_swap(swapped, n, "cpu", debug=True)
        start = list(swap.resident)
        assert start == [b < BLOCKS - n for b in range(BLOCKS)]
        ptrs = {m.weight.data_ptr() for b in range(BLOCKS) for m in swap.linears[b]}
        assert len(swap.device_ptrs) == 14 * (BLOCKS - n) and not ptrs <= swap.device_ptrs
        for _ in range(2):                                  # a pass ends where it started
            assert torch.equal(run(swapped, dit_inputs()), ref)
            assert swap.resident == start


@pytest.mark.parametrize("n, gc", [(1, False), (3, False), (2, True), (3, True)])
def test_training_equals_plain(base, n, gc):
    ref_dit, ref_net = _with_lora(base)
    dit, net = _with_lora(base)
    if gc:
        enable_gradient_checkpointing(ref_dit)
        enable_gradient_checkpointing(dit)
    swap = enable_block_swap(dit, n, "cpu", debug=True)
    for _ in range(2):                                      # the backward restores the start placement
        ref_loss, ref_grads = _train_step(ref_dit, ref_net)
        loss, grads = _train_step(dit, net)
        assert torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and len(grads) > 0
        for k in grads:
            assert torch.equal(grads[k], ref_grads[k]), k
        assert swap.resident == [b < BLOCKS - n for b in range(BLOCKS)]


def test_broken_schedule_is_detected(base):
    """The equality tests can fail: without the backward exchanges a block is used while on the host."""
    dit, net = _with_lora(base)
    swap = enable_block_swap(dit, 2, "cpu", debug=True)
    swap._after_backward = lambda b: None
    with pytest.raises(RuntimeError, match="on the host"):
        _train_step(dit, net)


def test_sampling_between_training_steps(base):
    """A no-grad pass (sampling) between training steps uses the inference schedule; training still matches."""
    ref_dit, ref_net = _with_lora(base)
    dit, net = _with_lora(base)
    enable_block_swap(dit, 3, "cpu", debug=True)
    _train_step(dit, net)
    _train_step(ref_dit, ref_net)
    with torch.no_grad():
        assert torch.equal(run(dit, dit_inputs()), run(ref_dit, dit_inputs()))
    assert torch.equal(_train_step(dit, net)[0], _train_step(ref_dit, ref_net)[0])


def test_limits(base):
    for n in (0, BLOCKS):
        with pytest.raises(OptionError, match="between 1 and 3"):
            enable_block_swap(copy.deepcopy(base), n, "cpu")
    full = copy.deepcopy(base)          # full finetune weights require grad: refused, not silently wrong
    enable_block_swap(full, 1, "cpu")
    with pytest.raises(OptionError, match="frozen"):
        run(full, dit_inputs())


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_same_loss_and_grads(base, offload):
    """Full-model grads (every DiT weight) with checkpointing equal the plain ones; checkpointing really keeps
    fewer saved activations."""
    ref = copy.deepcopy(base).train()
    dit = copy.deepcopy(base).train()
    enable_gradient_checkpointing(dit, cpu_offload=offload, device="cpu")

    def step(model):
        model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = run(model, dit_inputs(batch=2)).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, sum(saved)

    ref_loss, ref_grads, ref_saved = step(ref)
    loss, grads, saved = step(dit)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0, msg=k)
    assert saved < ref_saved / 2
