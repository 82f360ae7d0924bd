"""Helpers shared by the multi-process and resume training tests (and benchmarks/bench_train.py).

- `cached_dataset(demo_manifest, folder, batch_size=1)`: a dataset TOML over the demo's text-to-image images whose
  cache folder lives in `folder` (the demo set stays read-only); latents and text embeddings are cached in-process
  through the engine's own commands. Returns the TOML path.
- `train_argv(demo_manifest, dataset_toml, output_dir, *extra, command=)`: `train_network` / `train` on the demo models.
- `run_engine(argv, ...)`: `python -m engine ...` (or any launcher prefix) as a subprocess; returns it finished.
- `read_events(path)`, `metrics(events)`: the JSON-lines event stream and its `metric` events by step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# One BLAS thread per process: two training processes share this machine's cores, and a fixed thread count keeps
# float summation order (and so the numbers compared across runs) the same.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}


def cached_dataset(demo_manifest: dict, folder: Path, batch_size: int = 1, num_repeats: int = 1) -> Path:
    from engine.__main__ import main

    folder.mkdir(parents=True, exist_ok=True)
    images = Path(demo_manifest["dataset"]["images"])
    toml = folder / "dataset.toml"
    toml.write_text(
        "[general]\nresolution = [64, 64]\ncaption_extension = \".txt\"\n"
        f"batch_size = {batch_size}\nenable_bucket = true\nbucket_no_upscale = false\n\n"
        f"[[datasets]]\nimage_directory = {json.dumps(str(images))}\n"
        f"cache_directory = {json.dumps(str(folder / 'cache'))}\nnum_repeats = {num_repeats}\n",
        encoding="utf-8")
    common = ["--dataset_config", str(toml), "--device", "cpu", "--num_workers", "0",
              "--events_file", str(folder / "cache_events.jsonl")]
    assert main(["cache_latents", *common, "--vae", demo_manifest["vae"], "--skip_existing"]) == 0
    assert main(["cache_text_encoder_outputs", *common, "--text_encoder", demo_manifest["text_encoder"],
                 "--tokenizer", demo_manifest["tokenizer"], "--skip_existing"]) == 0
    return toml


def train_argv(demo_manifest: dict, dataset_toml: Path, output_dir: Path, *extra: str,
               command: str = "train_network") -> list[str]:
    """`train_network` (LoRA rank 4, alpha 4, lr 1e-3) or `train` (full finetune, lr 1e-4) on the demo models."""
    output_dir.mkdir(parents=True, exist_ok=True)      # the events file opens before the engine creates it
    network = ["--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3"] \
        if command == "train_network" else ["--learning_rate", "1e-4"]
    return [command, "--dit", demo_manifest["dit"]["original"], "--vae", demo_manifest["vae"],
            "--text_encoder", demo_manifest["text_encoder"], "--tokenizer", demo_manifest["tokenizer"],
            "--dataset_config", str(dataset_toml), "--output_dir", str(output_dir),
            "--output_name", "lora" if command == "train_network" else "full",
            "--device", "cpu", "--sdpa", "--seed", "7", "--max_data_loader_n_workers", "0", *network,
            "--events_file", str(output_dir / "events.jsonl"), *extra]


def accelerate_prefix(num_processes: int) -> list[str]:
    """`accelerate launch` for N CPU processes. `--cpu --num_processes 2` would start ONE process (accelerate's
    simple launcher only spreads CPU jobs with mpirun); `--multi_gpu` runs torch's elastic launcher, which on a
    machine without CUDA gives N gloo processes (DistributedType.MULTI_CPU)."""
    return [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "engine"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine(argv: list[str], prefix: list[str] | None = None, timeout: float = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = (prefix or [PYTHON, "-m", "engine"]) + argv
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-6000:]}"
                             f"\n--- stdout ---\n{proc.stdout[-3000:]}")
    return proc


def read_events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut by a kill -9 is the only one allowed to be partial
            continue
    return events


def metrics(events: list[dict]) -> dict[int, dict]:
    """Metric events by step (the last one wins if a resumed run repeats a step)."""
    return {e["step"]: e for e in events if e.get("type") == "metric" and "loss" in e}
