"""Optimizers, LR schedulers and the fused Adafactor backward pass (musubi-tuner's options and behaviour).

API:
- `parse_optimizer_args(["k=v", ...]) -> dict`           values via ast.literal_eval (strings otherwise)
- `create_optimizer(params, optimizer_type, lr, optimizer_args) -> (optimizer, description)`
      AdamW (torch), AdamW8bit (bitsandbytes), Adafactor (transformers; relative_step defaults to True as
      there, which makes the scheduler `adafactor`), or any `module.Class`.
- `create_scheduler(optimizer, name, total_steps, warmup=0, decay=0, num_cycles=1, power=1.0, min_lr_ratio=None)`
      transformers' get_scheduler; warmup/decay as steps (int) or a fraction of the total (< 1) or "N%".
- `copy_stochastic_(target_bf16, source_fp32, generator=None)`  unbiased rounding to bf16
- `adafactor_step_param(optimizer, param, group, stochastic_rounding=True)`  one parameter's Adafactor step
      (transformers' own math, run on a one-parameter group; bf16 params updated in fp32 then rounded stochastically)
- `enable_fused_backward(optimizer, max_grad_norm=0.0) -> handles`   step each parameter as soon as its grad is
      accumulated, then free the grad (not compatible with gradient accumulation)
"""

from __future__ import annotations

import importlib

import torch
from transformers import get_scheduler
from transformers.optimization import AdafactorSchedule

from engine.spec.config import parse_optimizer_args
from engine.spec.errors import OptionError


def _import_class(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module or "torch.optim"), name)
    except (ImportError, AttributeError) as e:
        raise OptionError(f"--optimizer_type {path!r} cannot be imported ({e}).",
                          "Use AdamW, AdamW8bit, Adafactor or a fully qualified module.Class.") from None


def create_optimizer(params, optimizer_type: str, lr: float, optimizer_args=None):
    """(optimizer, "module.Class(args)" text for ss_optimizer)."""
    kwargs = parse_optimizer_args(optimizer_args) if isinstance(optimizer_args, list) else dict(optimizer_args or {})
    kind = (optimizer_type or "AdamW").lower()
    if kind == "adamw":
        cls = torch.optim.AdamW
    elif kind == "adamw8bit":
        cls = _import_class("bitsandbytes.optim.AdamW8bit")
    elif kind == "adafactor":
        cls = _import_class("transformers.optimization.Adafactor")
        kwargs.setdefault("relative_step", True)
        if kwargs.get("warmup_init"):
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            # transformers refuses a manual lr with relative_step; lr becomes the schedule's initial_lr
            for g in params if isinstance(params, list) and params and isinstance(params[0], dict) else []:
                g.setdefault("initial_lr", g.get("lr", lr))
            optimizer = cls(params, lr=None, **kwargs)
            optimizer.initial_lr = lr
            return optimizer, _describe(cls, kwargs)
    else:
        cls = _import_class(optimizer_type)
    return cls(params, lr=lr, **kwargs), _describe(cls, kwargs)


def _describe(cls, kwargs) -> str:
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{cls.__module__}.{cls.__name__}({args})" if args else f"{cls.__module__}.{cls.__name__}"


def _steps(value, total: int) -> int:
    if isinstance(value, str) and value.endswith("%"):
        return int(float(value[:-1]) / 100 * total)
    value = float(value or 0)
    return int(value * total) if 0 < value < 1 else int(value)


def create_scheduler(optimizer, name: str, total_steps: int, warmup=0, decay=0, num_cycles: int = 1,
                     power: float = 1.0, min_lr_ratio: float | None = None):
    if name == "adafactor":
        return AdafactorSchedule(optimizer, getattr(optimizer, "initial_lr", 0.0))
    warmup_steps = _steps(warmup, total_steps)
    extra = {}
    if name == "cosine_with_restarts":
        extra["num_cycles"] = num_cycles
    elif name == "polynomial":
        extra["power"] = power
    elif name == "cosine_with_min_lr":
        extra["min_lr_rate"] = min_lr_ratio if min_lr_ratio is not None else 0.0
    elif name == "warmup_stable_decay":
        extra["num_decay_steps"] = _steps(decay, total_steps)
        extra["min_lr_ratio"] = min_lr_ratio or 0.0
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                             scheduler_specific_kwargs=extra)
    except ValueError as e:
        raise OptionError(f"--lr_scheduler {name!r}: {e}", "Choose one of the listed schedulers.") from None


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Round fp32 `source` into bf16 `target` stochastically: add a random 16-bit integer to the fp32 bit
    pattern and drop the low 16 bits, so E[result] = source (round-to-nearest is biased for tiny updates)."""
    noise = torch.randint(0, 1 << 16, source.shape, dtype=torch.int32, device=source.device, generator=generator)
    bits = source.contiguous().view(torch.int32) + noise
    bits.bitwise_and_(-65536)                                   # 0xFFFF0000
    target.copy_(bits.view(torch.float32))


@torch.no_grad()
def adafactor_step_param(optimizer, param: torch.Tensor, group: dict, stochastic_rounding: bool = True) -> None:
    """One Adafactor step for one parameter, using transformers' step() on a one-parameter group (same math,
    same per-parameter state). bf16 params are stepped in fp32 and written back with stochastic rounding."""
    if param.grad is None:
        return
    saved = optimizer.param_groups
    low = param.dtype == torch.bfloat16 and stochastic_rounding
    if low:
        stored, grad = param.data, param.grad
        param.data = stored.float()
        param.grad = grad.float()
    try:
        optimizer.param_groups = [{**group, "params": [param]}]
        optimizer.step()
    finally:
        optimizer.param_groups = saved
        if low:
            updated = param.data
            param.data = stored
            param.grad = None
            copy_stochastic_(param.data, updated)


def enable_fused_backward(optimizer, max_grad_norm: float = 0.0, stochastic_rounding: bool = True) -> list:
    """Step each parameter right after its gradient is accumulated, then free the gradient, so at most one
    parameter's gradient exists at a time. Call `optimizer.zero_grad` never; do not use gradient accumulation."""
    handles = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue

            def hook(tensor, group=group):
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([tensor], max_grad_norm)
                adafactor_step_param(optimizer, tensor, group, stochastic_rounding)
                tensor.grad = None
            handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles
