"""Helpers for the LoRA tools tests: LoRA files shaped for a demo DiT, engine commands run in this process."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from engine.__main__ import run_command
from engine.models.dit import strip_prefix
from engine.models.safetensors_io import save_file_atomic
from engine.spec.commands import COMMANDS
from engine.spec.config import ConfigError, parse_args
from engine.spec.events import EventWriter
from engine.spec.lora_keys import BLOCK_LINEARS, kohya_name
from engine.spec.safetensors_header import read_header


def dit_shapes(dit_path) -> dict[str, tuple[int, ...]]:
    """diffusers key → shape of a DiT file (headers only)."""
    header = read_header(dit_path)
    return {strip_prefix(k): tuple(i.shape) for k, i in header.tensors.items() if strip_prefix(k)}


def make_lora(dit_path, path, rank=4, alpha=2.0, seed=0, dtype=torch.float32, metadata=None, scale=0.05,
              layers=BLOCK_LINEARS, ranks=None) -> Path:
    """A kohya-layout LoRA for every `layers` Linear of every block of the DiT at `dit_path`, random factors.
    `ranks` {module path: rank} overrides `rank` per module (mixed-rank files)."""
    shapes = dit_shapes(dit_path)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks.")})
    for b in blocks:
        for layer in layers:
            module = f"transformer_blocks.{b}.{layer}"
            out_f, in_f = shapes[module + ".weight"]
            r = (ranks or {}).get(module, rank)
            stem = kohya_name(module)
            state[f"{stem}.lora_down.weight"] = (torch.randn(r, in_f, generator=gen) * scale).to(dtype)
            state[f"{stem}.lora_up.weight"] = (torch.randn(out_f, r, generator=gen) * scale).to(dtype)
            state[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return save_file_atomic(state, path, metadata or {})


def error_of(events: list[dict]) -> dict | None:
    return next((e for e in events if e["type"] == "error"), None)


def run_inproc(command: str, *args) -> tuple[int, list[dict]]:
    """`python -m engine COMMAND ARGS` in this process (no interpreter start per run): (return code, events)."""
    cmd = COMMANDS[command]
    argv = [str(a) for a in args]
    try:
        cfg = parse_args(cmd.config, argv, prog=command)
    except ConfigError as e:
        return 2, [{"type": "error", "kind": "option", "message": str(e), "hint": ""}]
    stream = io.StringIO()
    rc = run_command(cmd, cfg, EventWriter(stream=stream, json_stdout=True), argv)
    return rc, [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
