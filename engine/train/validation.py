"""Validation loss on a held-out dataset (--validation_dataset_config), computed before training, every
--validation_every_n_steps and at the end.

The training loss draws new noise and a new timestep every step, so its curve mostly shows that draw. Here every
item is evaluated at each of --validation_timesteps with noise drawn from a generator seeded by (seed, item,
timestep): the same weights give the same number, bit for bit, so the curve moves only when the weights do. The
loss is the plain flow-matching MSE (no timestep weighting), over the target tokens, with the item's loss mask if
its cache holds one, one item at a time (no padding), with the DiT and the network in eval mode (no dropout).
It runs on the main process only; the others wait at the next collective.

The dataset is cached with the same commands as the training set (cache_latents, cache_text_encoder_outputs);
stale or missing caches are refused before the model loads, like the training set's.

API:
- `Validation.open(cfg, version) -> Validation | None`     None without --validation_dataset_config
- `validation.loss(dit, modules, device, dtype) -> float`
- `validation.is_due(step, total)`
- `report(validation, step, trainee, weight_sets, events, device)`   evaluate and emit the metric event
"""

from __future__ import annotations

import contextlib
import logging

import torch

from engine.data.cached import CachedDataset
from engine.train.step import flow_loss, predict, prepare_inputs
from engine.train.timesteps import NUM_TRAIN_TIMESTEPS

log = logging.getLogger(__name__)


class FixedTimesteps:
    """Stands in for the TimestepSampler: always the given timestep, no draw from the generator, no weighting."""
    weighting_scheme = "none"

    def __init__(self, timestep: int):
        self.timestep = float(timestep)

    def sample(self, batch: int, latent_hw, generator=None, device="cpu"):
        timesteps = torch.full((batch,), self.timestep, dtype=torch.float32)
        return (timesteps / NUM_TRAIN_TIMESTEPS).to(device), timesteps.to(device)


class Validation:
    def __init__(self, data: CachedDataset, timesteps: list[int], seed: int, every: int | None):
        self.data, self.timesteps, self.seed, self.every = data, list(timesteps), seed, every
        self.batches = [data.load_batch([item]) for item in data.items]      # a held-out set is small: in RAM

    @classmethod
    def open(cls, cfg, version: str) -> "Validation | None":
        if not cfg.validation_dataset_config:
            return None
        text_encoder = cfg.text_encoder if cfg.tokenizer else None
        data = CachedDataset.open(cfg.validation_dataset_config, version, vae=cfg.vae, text_encoder=text_encoder,
                                  tokenizer=cfg.tokenizer)
        log.info("validation: %d item(s) from %s at timesteps %s", len(data.items), cfg.validation_dataset_config,
                 cfg.validation_timesteps)
        return cls(data, cfg.validation_timesteps, cfg.seed, cfg.validation_every_n_steps)

    def is_due(self, step: int, total: int) -> bool:
        return step == total or bool(self.every) and step % self.every == 0

    def generator(self, item_index: int, timestep_index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + item_index * 7919 + timestep_index * 104_729)
                                             % (2 ** 63))

    @torch.no_grad()
    def loss(self, dit, modules, device: torch.device, dtype: torch.dtype, autocast=None) -> float:
        """Mean loss over every item and timestep. Modes and the global RNG state are restored afterwards."""
        modes = [(m, m.training) for m in (dit, *modules)]
        for m, _ in modes:
            m.eval()
        total, count = 0.0, 0
        try:
            for i, batch in enumerate(self.batches):
                for j, timestep in enumerate(self.timesteps):
                    inputs = prepare_inputs(batch, FixedTimesteps(timestep), self.generator(i, j), device, dtype)
                    with autocast() if autocast else contextlib.nullcontext():
                        pred = predict(dit, inputs)
                    total += float(flow_loss(pred, inputs))
                    count += 1
        finally:
            for m, mode in modes:
                m.train(mode)
        return total / count



def report(validation: "Validation | None", step: int, trainee, weight_sets, events, device, autocast=None) -> dict:
    """Evaluate with each set of weights (raw and/or EMA, `ema.weight_sets`) and emit one metric event:
    `val_loss` (and `val_loss_ema`). Returns the values (empty without a validation set)."""
    if validation is None:
        return {}
    events.phase("validating", step=step)
    values = {}
    for suffix, context in weight_sets:
        with context:
            values["val_loss" + suffix.replace("-", "_")] = validation.loss(trainee.dit, trainee.eval_modules,
                                                                             device, trainee.dtype, autocast)
    events.metric(step, **values)
    log.info("validation loss at step %d: %s", step, ", ".join(f"{k} {v:.6f}" for k, v in values.items()))
    return values
