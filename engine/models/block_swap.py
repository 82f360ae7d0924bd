"""Block swap (`--blocks_to_swap N`, as in musubi-tuner): the Linear weights of N of the DiT's blocks live in
host RAM (pinned on CUDA) and are streamed to the compute device just before use, with asynchronous copies on a
separate CUDA stream, in forward and in backward (with or without gradient checkpointing).

How: the device holds exactly B−N blocks' worth of Linear weights. An *exchange* copies a block that is done
(device→host into a spare pinned buffer) and copies a needed block host→device into the storage it frees,
then swaps the `.data` pointers; buffers rotate, so host memory is N blocks + one spare block. Autograd keeps
references to the Parameters, not their storage, so a weight swapped back before its block's backward is what
the backward reads. Norms, biases and buffers (fp8 `scale_weight`) never move.

Schedules (B blocks, the device starts with blocks [0, B−N)):
- training forward: after block b < N, exchange b ↔ B−N+b  (ends with [N, B) on the device)
- training backward: before block b's backward wait for b; after it, if b ≥ B−N, exchange b ↔ b−(B−N)
  (the mirror image: ends with [0, B−N) again). Valid for every N ≤ B−1.
- inference (no grad): with 2N ≤ B also exchange b ↔ b−(B−N) after b ≥ B−N (2N copies per pass);
  otherwise a ring, b ↔ (b+B−N) mod B (B copies per pass). Either way a pass ends where it started.
A pass that starts from another placement (a backward that stopped early) is put right first.

Hooks: forward pre/post hooks on each block; identity autograd nodes on the block's inputs and outputs give the
"before backward" and "after backward" points (full backward hooks ignore keyword inputs, which diffusers uses).
Checkpoint recomputation runs inside the backward graph task and only waits for its block.

On a CPU "device" the same code runs with synchronous copies, so tests can prove outputs and gradients equal.

Trainable swapped weights (full finetune, `trainable=True`) work only when each weight's gradient is consumed
during backward while its block is still on the device: the fused Adafactor backward (`--fused_backward_pass`)
steps the weight in its post-accumulate-grad hook and frees the gradient, and autograd runs AccumulateGrad nodes
before any other ready node, so every weight of a block is stepped before the block's "after backward" point
sends it back to the host (musubi-tuner trains with block swap the same way). The optimizer state is created next
to the weight, on the device. A gradient still present when its block leaves is refused with a clear error.

API:
- `enable_block_swap(dit, blocks_to_swap, device, supports_backward=True, trainable=False) -> BlockSwap`
- `swap.remove()`                                          hooks off (weights stay where they are)
- `swap.device_ptrs`, `swap.resident`                      for checks (debug=True asserts on every use)
"""

from __future__ import annotations

import torch
from torch import nn

from engine.spec.checks import check_blocks_to_swap
from engine.spec.errors import OptionError


def _in_backward() -> bool:
    """True while the autograd engine runs a backward (e.g. checkpoint recomputation). PyTorch exposes the
    current graph task only privately; -1 means none."""
    return torch._C._current_graph_task_id() != -1


class _OnBackward(torch.autograd.Function):
    """Identity on tensors; calls `callback` when its backward runs (i.e. when all their grads are ready)."""

    @staticmethod
    def forward(ctx, callback, *tensors):
        ctx.callback = callback
        ctx.set_materialize_grads(False)     # an unused output (last block's text stream) stays gradient-free
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


def _mark(values, callback):
    """Route the grad-requiring tensors among `values` (a list) through one _OnBackward node."""
    idx = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.requires_grad]
    if not idx:
        return values, False
    marked = _OnBackward.apply(callback, *[values[i] for i in idx])
    values = list(values)
    for i, t in zip(idx, marked):
        values[i] = t
    return values, True


class BlockSwap:
    def __init__(self, blocks: nn.ModuleList, blocks_to_swap: int, device: torch.device | str,
                 supports_backward: bool = True, debug: bool = False, trainable: bool = False):
        self.blocks = blocks
        self.num = len(blocks)
        self.n = blocks_to_swap
        check_blocks_to_swap(blocks_to_swap, self.num, lowest=1)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.supports_backward = supports_backward
        self.debug = debug
        self.trainable = trainable
        self.linears = [[m for m in b.modules() if isinstance(m, nn.Linear)] for b in blocks]
        self._check_same_layout()
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.events: dict[int, torch.cuda.Event] = {}
        self.resident = [True] * self.num
        self.training_pass = False
        self.handles = []
        self.spare: list[torch.Tensor] = []
        self.device_ptrs: set[int] = set()

    # ------------------------------------------------------------------------------------------ placement
    def _check_same_layout(self) -> None:
        ref = [(tuple(m.weight.shape), m.weight.dtype) for m in self.linears[0]]
        for b, lins in enumerate(self.linears):
            if [(tuple(m.weight.shape), m.weight.dtype) for m in lins] != ref:
                raise OptionError(f"block swap needs identical blocks; block {b} differs from block 0.",
                                  "Use --blocks_to_swap 0 for this model.")

    def _check_frozen(self) -> None:
        """Gradients of streamed weights would outlive their residency: only frozen bases are supported."""
        if any(m.weight.requires_grad for lins in self.linears for m in lins):
            raise OptionError("block swap streams frozen base weights, but block Linear weights require grad in "
                              "this training pass.", "Use block swap with LoRA training (frozen DiT) or inference "
                              "(no grad), or --blocks_to_swap 0 for a full finetune.")

    def _check_consumed(self, b: int) -> None:
        """A trained weight leaves the device without its gradient (the fused backward already stepped it)."""
        if any(m.weight.grad is not None for m in self.linears[b]):
            raise OptionError(f"block swap: block {b}'s weights still hold gradients when the block goes back to "
                              "the host, so the optimizer would step weights that are no longer on the device.",
                              "Finetune with block swap only with --fused_backward_pass (Adafactor), which steps "
                              "each weight during backward, or use --blocks_to_swap 0.")

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.cuda)
        out.copy_(t)
        return out

    @torch.no_grad()
    def place(self, model: nn.Module) -> None:
        """Move `model` to the device except the Linear weights of the last N blocks (to host RAM)."""
        swapped = {id(m.weight) for b in range(self.num - self.n, self.num) for m in self.linears[b]}
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    p.data = self._host(p.data) if id(p) in swapped else p.data.to(self.device)
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(self.device)
        for b in range(self.num - self.n, self.num):
            self.resident[b] = False
        self.spare = [self._host(m.weight.data) for m in self.linears[-1]]
        self.device_ptrs = {m.weight.data_ptr() for b in range(self.num - self.n) for m in self.linears[b]}

    # ------------------------------------------------------------------------------------------ transfers
    def _exchange(self, out_b: int, in_b: int) -> None:
        """Asynchronously send block out_b to the host and bring in_b into the device storage it frees."""
        assert self.resident[out_b] and not self.resident[in_b], (out_b, in_b, self.resident)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))   # out_b's kernels are done
        with torch.cuda.stream(self.stream) if self.cuda else _nullcontext():
            for k, (lo, li) in enumerate(zip(self.linears[out_b], self.linears[in_b])):
                dev, host_in, spare = lo.weight.data, li.weight.data, self.spare[k]
                spare.copy_(dev, non_blocking=self.cuda)        # device → host
                dev.copy_(host_in, non_blocking=self.cuda)      # host → the freed device storage
                lo.weight.data, li.weight.data = spare, dev
                self.spare[k] = host_in                         # free once the copy above ran (same stream)
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.stream)
            self.events[in_b] = event
        self.events.pop(out_b, None)
        self.resident[out_b], self.resident[in_b] = False, True

    def wait_for_block(self, b: int) -> None:
        if not self.resident[b]:
            raise RuntimeError(f"block swap: block {b} is used while its weights are on the host "
                               f"(placement {self.resident}); this is a bug in the swap schedule.")
        event = self.events.pop(b, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        if self.debug:
            bad = [m for m in self.linears[b] if m.weight.data_ptr() not in self.device_ptrs]
            assert not bad, f"block {b} has weights outside the device storage"

    def _restore_start(self) -> None:
        """Bring the placement back to [0, B−N) on the device (after a backward that stopped early)."""
        start = [b < self.num - self.n for b in range(self.num)]
        extra = [b for b in range(self.num) if self.resident[b] and not start[b]]
        missing = [b for b in range(self.num) if start[b] and not self.resident[b]]
        for out_b, in_b in zip(extra, missing):
            self._exchange(out_b, in_b)

    # ------------------------------------------------------------------------------------------ schedule
    def _after_forward(self, b: int) -> None:
        B, N = self.num, self.n
        if self.training_pass:
            if b < N:
                self._exchange(b, B - N + b)
        elif 2 * N <= B:
            if b < N:
                self._exchange(b, B - N + b)
            elif b >= B - N:
                self._exchange(b, b - (B - N))
        else:
            self._exchange(b, (b + B - N) % B)

    def _after_backward(self, b: int) -> None:
        if b >= self.num - self.n and self.resident[b] and not self.resident[b - (self.num - self.n)]:
            if self.trainable:
                self._check_consumed(b)
            self._exchange(b, b - (self.num - self.n))

    # ------------------------------------------------------------------------------------------ hooks
    def install(self) -> None:
        for b, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre_hook(b), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post_hook(b), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre_hook(self, b: int):
        def hook(module, args, kwargs):
            if _in_backward():                         # gradient-checkpoint recomputation
                self.wait_for_block(b)
                return None
            if b == 0:
                self.training_pass = self.supports_backward and torch.is_grad_enabled()
                if self.training_pass and not self.trainable:
                    self._check_frozen()
                self._restore_start()
            self.wait_for_block(b)
            if not self.training_pass:
                return None
            names = list(kwargs)
            values, marked = _mark(list(args) + [kwargs[k] for k in names], lambda: self._after_backward(b))
            if not marked:
                return None
            return tuple(values[: len(args)]), dict(zip(names, values[len(args):]))
        return hook

    def _post_hook(self, b: int):
        def hook(module, args, kwargs, output):
            if _in_backward():
                return None
            self._after_forward(b)
            if not self.training_pass:
                return None
            values, marked = _mark(list(output) if isinstance(output, tuple) else [output],
                                   lambda: self.wait_for_block(b))
            if not marked:
                return None
            return tuple(values) if isinstance(output, tuple) else values[0]
        return hook


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def enable_block_swap(dit: nn.Module, blocks_to_swap: int, device: torch.device | str,
                      supports_backward: bool = True, debug: bool = False, trainable: bool = False) -> BlockSwap:
    """Place `dit` (on CPU or meta-free, not yet on the device) for block swap and install the hooks.
    Do not call `dit.to(...)` afterwards: it would undo the placement. `trainable`: the block weights are
    trained with a fused backward (see the module docstring)."""
    swap = BlockSwap(dit.transformer_blocks, blocks_to_swap, device, supports_backward, debug, trainable)
    swap.place(dit)
    swap.install()
    return swap
