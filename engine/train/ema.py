"""EMA (exponential moving average) of the trained weights, for LoRA and full finetunes (--use_ema).

After each optimizer step that is due (every --ema_update_interval steps) every trained tensor's average moves
toward the weights: `ema = decay * ema + (1 - decay) * w`, written as mul + add so that decay 0 gives exactly
the weights (a lerp would round). Until --ema_start_step the average is a plain copy. The average is float32
whatever the weights' dtype (bf16 cannot hold a 0.1 % step), on the CPU (--ema_device cpu) or next to the weights
(accelerator).

The average is saved beside every checkpoint as `<stem>-ema.safetensors` (engine/spec/naming.py), in exactly the
format of the checkpoint: the run's own save function writes it while the averaged values are swapped into the
trained tensors (`applied()`), so an EMA LoRA loads wherever the LoRA loads. A resumable state holds it as
`ema.safetensors`, so --resume continues the average. Only the main process keeps an average (the weights are
identical on every process).

API:
- `Ema.create(named_params, cfg, device)`   None unless --use_ema
- `ema.update(step)`                        after the optimizer step numbered `step` (1-based)
- `ema.state_dict()` / `ema.load_state_dict(tensors)`
- `with ema.applied(): ...`                 the trained tensors hold the average inside the block
- `resume(ema, state_dir)`, `save_beside(ema, save, model_file, stats)`, `weight_sets(ema, --ema_validation)`
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import torch

from engine.models.safetensors_io import load_file
from engine.spec import naming
from engine.spec.errors import OptionError

log = logging.getLogger(__name__)

STATE_FILE = "ema.safetensors"


class Ema:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float, device: torch.device,
                 interval: int = 1, start_step: int = 0):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decay, self.device, self.interval, self.start_step = decay, device, interval, start_step
        self.shadow = [p.detach().to(device, torch.float32, copy=True) for p in self.params]

    @classmethod
    def create(cls, named_params, cfg, weights_device: torch.device) -> "Ema | None":
        if not cfg.use_ema:
            return None
        device = torch.device("cpu") if cfg.ema_device == "cpu" else weights_device
        ema = cls(list(named_params), cfg.ema_decay, device, cfg.ema_update_interval, cfg.ema_start_step)
        log.info("EMA of %d tensors (%.1fM values) on %s, decay %g, every %d step(s) from step %d", len(ema.shadow),
                 sum(s.numel() for s in ema.shadow) / 1e6, device, cfg.ema_decay, cfg.ema_update_interval,
                 cfg.ema_start_step)
        return ema

    @torch.no_grad()
    def update(self, step: int) -> None:
        copy = step <= self.start_step
        if not copy and step % self.interval:
            return
        for s, p in zip(self.shadow, self.params):
            w = p.detach().to(s.device, torch.float32)
            if copy:
                s.copy_(w)
            else:
                s.mul_(self.decay).add_(w, alpha=1 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average from the current weights."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(p.detach().to(s.device, torch.float32))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().to("cpu").contiguous() for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"the saved EMA has no {missing[0]} ({len(missing)} tensor(s) missing): it belongs to "
                             "another network")
        for n, s in zip(self.names, self.shadow):
            if tensors[n].shape != s.shape:
                raise ValueError(f"the saved EMA's {n} is {tuple(tensors[n].shape)}, the run trains {tuple(s.shape)}")
            s.copy_(tensors[n].to(s.device, torch.float32))

    @contextlib.contextmanager
    def applied(self):
        """The averaged values in the trained tensors for the duration of the block (samples, validation, the
        -ema save); the raw weights wait in host RAM and are put back exactly, even after an error."""
        backup = [p.detach().to("cpu", copy=True) for p in self.params]
        try:
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params):
                    p.copy_(s.to(p.device, p.dtype))
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b.to(p.device))


def trained_tensors(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the optimizer's parameters, named as in the trained module (stable across runs)."""
    wanted = {id(p) for p in params}
    return [(n, p) for n, p in module.named_parameters() if id(p) in wanted]


def resume(ema: "Ema | None", state_dir: str | Path) -> None:
    """Continue the average saved in the state; a state written without --use_ema starts it from the weights."""
    if ema is None:
        return
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        log.warning("--use_ema: %s holds no EMA (saved without --use_ema); the average starts from the resumed "
                    "weights", state_dir)
        ema.reset()
        return
    try:
        ema.load_state_dict(load_file(path))
    except ValueError as e:
        raise OptionError(f"--resume {state_dir}: {e}.", "Resume with the network options the state was saved "
                          "with, or start a new run from its weights.") from None
    log.info("EMA resumed from %s", path)


def save_beside(ema: "Ema | None", save: Callable[[Path, dict], list[Path]], model_file: Path,
                stats: dict) -> list[Path]:
    """Write `<stem>-ema.safetensors` with the run's own save function while the average is in the weights."""
    if ema is None:
        return []
    with ema.applied():
        return save(naming.ema_file(model_file), dict(stats, ss_ema_decay=ema.decay))


def weight_sets(ema: "Ema | None", mode: str) -> list[tuple[str, contextlib.AbstractContextManager]]:
    """(name suffix, context) per set of weights that samples and the validation loss use (--ema_validation)."""
    raw = ("", contextlib.nullcontext())
    if ema is None or mode == "none":
        return [raw]
    if mode == "ema_only":
        return [("-ema", ema.applied())]
    return [raw, ("-ema", ema.applied())]
