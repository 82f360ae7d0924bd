"""Optimizer/scheduler factories, fused Adafactor == unfused, stochastic rounding is unbiased."""

from __future__ import annotations

import pytest
import torch

from engine.spec.errors import OptionError
from engine.train.optim import (copy_stochastic_, create_optimizer, create_scheduler, enable_fused_backward,
                                parse_optimizer_args)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(dtype)


def _loss(model, i):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(5, 8, generator=g).to(next(model.parameters()).dtype)
    return model(x).float().pow(2).mean()


def test_parse_and_factory():
    assert parse_optimizer_args(["relative_step=False", "betas=(0.9,0.99)", "name=x"]) == {
        "relative_step": False, "betas": (0.9, 0.99), "name": "x"}
    m = _model()
    opt, text = create_optimizer(list(m.parameters()), "AdamW", 1e-3, ["weight_decay=0.1"])
    assert isinstance(opt, torch.optim.AdamW) and text == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    opt, _ = create_optimizer(list(m.parameters()), "torch.optim.SGD", 1e-2, ["momentum=0.9"])
    assert isinstance(opt, torch.optim.SGD)
    import bitsandbytes
    opt, _ = create_optimizer(list(m.parameters()), "AdamW8bit", 1e-3)
    assert isinstance(opt, bitsandbytes.optim.AdamW8bit)
    opt, _ = create_optimizer(list(m.parameters()), "Adafactor", 1e-3)      # relative_step default → adafactor LR
    sched = create_scheduler(opt, "adafactor", 10)
    assert sched.get_lr()
    with pytest.raises(OptionError):
        create_optimizer(list(m.parameters()), "nope.Missing", 1e-3)


@pytest.mark.parametrize("warmup, expected", [(4, 4), (0.25, 5), ("10%", 2)])
def test_scheduler_warmup(warmup, expected):
    opt = torch.optim.SGD(_model().parameters(), lr=1.0)
    sched = create_scheduler(opt, "constant_with_warmup", 20, warmup=warmup)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs.index(1.0) == expected
    opt = torch.optim.SGD(_model().parameters(), lr=1.0)
    create_scheduler(opt, "cosine_with_min_lr", 20, warmup=0, min_lr_ratio=0.1)
    create_scheduler(opt, "warmup_stable_decay", 20, warmup=2, decay=0.5, min_lr_ratio=0.1)


def test_fused_adafactor_equals_unfused():
    args = ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
    ref, fused = _model(), _model()
    opt_ref, _ = create_optimizer(list(ref.parameters()), "Adafactor", 1e-2, args)
    opt_fused, _ = create_optimizer(list(fused.parameters()), "Adafactor", 1e-2, args)
    enable_fused_backward(opt_fused)
    for i in range(5):
        _loss(ref, i).backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        _loss(fused, i).backward()
        assert all(p.grad is None for p in fused.parameters())      # stepped and freed during backward
    for a, b in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(next(ref.parameters()), _model()[0].weight)


def test_fused_bf16_params_train():
    m = _model(torch.bfloat16)
    before = [p.detach().clone() for p in m.parameters()]
    opt, _ = create_optimizer(list(m.parameters()), "Adafactor", 1e-2, ["relative_step=False"])
    enable_fused_backward(opt)
    _loss(m, 0).backward()
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_stochastic_rounding_is_unbiased():
    one_ulp = 2 ** -7                                   # bf16 spacing at 1.0
    value = 1.0 + one_ulp * 0.3                         # 30 % of the way to the next bf16
    src = torch.full((200_000,), value)
    out = torch.empty_like(src, dtype=torch.bfloat16)
    copy_stochastic_(out, src, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + one_ulp}
    assert abs(out.float().mean().item() - value) < one_ulp * 0.01
    nearest = src.to(torch.bfloat16).float().mean().item()
    assert nearest == 1.0 and abs(nearest - value) > one_ulp * 0.25       # round-to-nearest is biased
    neg = torch.full((200_000,), -value)
    copy_stochastic_(out, neg, torch.Generator().manual_seed(1))
    assert abs(out.float().mean().item() + value) < one_ulp * 0.01
