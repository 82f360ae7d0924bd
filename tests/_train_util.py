"""Helpers for the training tests: the demo dataset cached once per session into a copy (the demo folder stays
read-only), an in-process `python -m engine train_network/train` runner that returns its events, and a loss
evaluated with fixed noise and timesteps (the training loss itself is noisy: every step draws new ones)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from engine.__main__ import main

_CACHED: dict[tuple, Path] = {}
DATASETS = {"original": "t2i", "edit": "edit", "edit-2509": "edit2", "edit-2511": "edit2"}


def cached_dataset(manifest: dict, root: Path, version: str = "original") -> Path:
    """A copy of the demo's dataset TOML for `version` whose caches live under `root`, cached in-process once."""
    key = (manifest["root"], version)
    if key in _CACHED:
        return _CACHED[key]
    name = DATASETS[version]
    text = Path(manifest["dataset_configs"][name]).read_text(encoding="utf-8")
    text = re.sub(r'cache_directory = ".*"', f'cache_directory = "{root / ("cache_" + name)}"', text)
    toml = root / f"dataset_{name}.toml"
    toml.write_text(text, encoding="utf-8")
    common = ["--model_version", version, "--dataset_config", str(toml), "--device", "cpu"]
    assert main(["cache_latents", "--vae", manifest["vae"], *common]) == 0
    assert main(["cache_text_encoder_outputs", "--text_encoder", manifest["text_encoder"], "--tokenizer",
                 manifest["tokenizer"], *common]) == 0
    _CACHED[key] = toml
    return toml


def train(command: str, out: Path, *argv, expect_rc: int = 0) -> list[dict]:
    """Run a training command in-process; returns its events (asserting the exit code)."""
    out.mkdir(parents=True, exist_ok=True)
    events_file = out / f"events-{len(list(out.glob('events-*.jsonl')))}.jsonl"
    rc = main([command, "--device", "cpu", "--events_file", str(events_file), *map(str, argv)])
    events = [json.loads(x) for x in events_file.read_text().splitlines()]
    assert rc == expect_rc, [e for e in events if e["type"] in ("error", "log")][-4:]
    return events


def losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["type"] == "metric"}


def done_outputs(events: list[dict]) -> list[str]:
    return next(e for e in events if e["type"] == "done")["outputs"]


@torch.no_grad()
def fixed_loss(dit, dataset_toml: Path, version: str = "original", draws: int = 4) -> float:
    """Mean flow loss over every cached item with fixed noise/timesteps (the same for every model)."""
    from engine.data.cached import CachedDataset
    from engine.train.step import flow_loss, predict, prepare_inputs
    from engine.train.timesteps import TimestepSampler

    data = CachedDataset.open(dataset_toml, version)
    sampler = TimestepSampler("uniform")
    total, n = 0.0, 0
    for i, item in enumerate(data.items):
        batch = data.load_batch([item])
        for d in range(draws):
            inputs = prepare_inputs(batch, sampler, torch.Generator().manual_seed(100 * i + d), torch.device("cpu"),
                                    torch.float32)
            total += float(flow_loss(predict(dit, inputs), inputs))
            n += 1
    return total / n
