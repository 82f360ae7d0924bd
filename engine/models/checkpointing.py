"""Gradient checkpointing per DiT block (`--gradient_checkpointing`) and activation CPU offload
(`--gradient_checkpointing_cpu_offload`), through diffusers' own `enable_gradient_checkpointing` hook: the
model's block loop calls our function as `fn(block, *inputs)` when grad is enabled.

- Plain: `torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)` (musubi and diffusers'
  default). Only the block inputs are kept; the block is recomputed in backward.
- CPU offload: the checkpointed function moves its inputs to the compute device on entry and its outputs to the
  CPU on exit (musubi's `create_cpu_offloading_wrapper`), so the saved inputs of the next block — the activations
  between blocks — sit in host RAM. The last block's outputs stay on the device for norm_out/proj_out.

API:
- `enable_gradient_checkpointing(dit, cpu_offload=False, device=None)`  (device: where blocks compute)
- `disable_gradient_checkpointing(dit)`
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _offloading(block, device: torch.device, offload: bool):
    def run(*inputs):
        outputs = block(*_to(inputs, device))
        return _to(outputs, torch.device("cpu")) if offload else outputs
    return run


def enable_gradient_checkpointing(dit, cpu_offload: bool = False, device: torch.device | str | None = None) -> None:
    """Turn on per-block checkpointing (diffusers' mechanism, our function)."""
    if cpu_offload:
        device = torch.device(device) if device is not None else next(dit.img_in.parameters()).device
        last = dit.transformer_blocks[-1]

        def fn(block, *inputs):
            return checkpoint(_offloading(block, device, block is not last), *inputs, use_reentrant=False)
    else:
        def fn(block, *inputs):
            return checkpoint(block, *inputs, use_reentrant=False)
    dit.enable_gradient_checkpointing(gradient_checkpointing_func=fn)


def disable_gradient_checkpointing(dit) -> None:
    dit.disable_gradient_checkpointing()
