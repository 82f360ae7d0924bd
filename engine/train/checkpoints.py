"""Saving during training: model files, their pruning, and resumable states (musubi-tuner's names and rules).

Names are engine/spec/naming.py's (musubi-tuner's): `<output_name>.safetensors`, `-{epoch:06d}`, `-step{step:08d}`,
states `<stem>-state`. `--save_last_n_epochs/steps` prune the older intermediate files and states.

Atomicity: model files go through a temp file + fsync + os.replace (safetensors_io.save_file_atomic, or the
streaming writer below for --mem_eff_save). A state is written into a hidden temp folder (accelerate's
save_state: model/optimizer/scheduler, every process's RNG states) plus our `train_state.json` (step, epoch,
position in the epoch's batch order, seed) and renamed into place last, so a kill -9 at any moment leaves either
the previous state or the complete new one, never a half state that --resume would trust.

API:
- `model_path(cfg, epoch=None, step=None)`, `state_path(cfg, epoch=None, step=None)`
- `save_dit_file(dit, path, dtype, metadata, mem_eff=False, marker_2511=False)`   ComfyUI layout + config JSON
- `write_streaming(items, path, metadata)`                                        tensor-by-tensor safetensors
- `save_state(accelerator, path, progress)` / `load_state(accelerator, path) -> progress`
- `check_same_world(path, num_processes)`                                        refuse another process count
- `prune(cfg, kind, current)`                                                      save_last_n_* policy
- `remove_dead_temps(output_dir, output_name)`                                     temp files of killed saves
- `remove_state_leftovers(output_dir, output_name)`                                `.tmp`/`.old` state folders
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.models.safetensors_io import dtype_name, save_file_atomic, write_streamed
from engine.spec import naming
from engine.spec.errors import OptionError

log = logging.getLogger(__name__)

STATE_JSON = "train_state.json"
COMFY_PREFIX = "model.diffusion_model."
MARKER_2511 = "__index_timestep_zero__"


# ---------------------------------------------------------------------------------------------- names

def model_path(cfg, epoch: int | None = None, step: int | None = None) -> Path:
    return naming.model_file(cfg.output_dir, cfg.output_name, epoch, step)


def state_path(cfg, epoch: int | None = None, step: int | None = None) -> Path:
    return naming.state_folder(cfg.output_dir, cfg.output_name, epoch, step)


def prune(cfg, kind: str, current: int) -> list[Path]:
    """Remove epoch (kind "epoch") or step ("step") saves older than the last N; returns what was removed.
    musubi's rule: keep saves whose number is > current − N·every."""
    keep = cfg.save_last_n_epochs if kind == "epoch" else cfg.save_last_n_steps
    every = cfg.save_every_n_epochs if kind == "epoch" else cfg.save_every_n_steps
    if not keep or not every:
        return []
    limit = current - keep * every
    pattern = naming.intermediate_save(cfg.output_name, kind)
    removed = []
    for path in Path(cfg.output_dir).iterdir():
        m = pattern.match(path.name)
        if m and int(m.group(1)) <= limit:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def remove_dead_temps(output_dir: str | Path, output_name: str) -> list[Path]:
    """Temp files of saves whose process was killed mid-write (kill -9, power loss): hidden
    `.<output_name>….tmp-<pid>[-<random>]` files (model files, the run TOML) whose pid is gone. Users never load
    them, but a full-finetune temp is 40 GB. (State temp folders: remove_state_leftovers.)"""
    pattern = re.compile(r"\." + re.escape(output_name) + r".*\.tmp-(\d+)(?:-\w+)?")
    removed = []
    for path in Path(output_dir).glob(f".{glob.escape(output_name)}*.tmp-*"):
        m = pattern.fullmatch(path.name)
        if m and path.is_file() and not _pid_alive(int(m.group(1))):
            path.unlink()
            removed.append(path)
    return removed


def remove_state_leftovers(output_dir: str | Path, output_name: str) -> list[Path]:
    """Hidden `.<name>…-state.tmp` / `.<name>…-state.old` folders of a state save that was interrupted (kill -9,
    power loss, disk full). A `.tmp` never became a state and an `.old` was already replaced, so neither holds
    anything --resume would use; left in place they would make the next save of that state fail."""
    removed = []
    for suffix in (".tmp", ".old"):
        for path in Path(output_dir).glob(f".{glob.escape(output_name)}*{naming.STATE_SUFFIX}{suffix}"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's live process
        return True
    return True


# ---------------------------------------------------------------------------------------------- DiT files

def save_dit_file(dit, path: Path, dtype: torch.dtype, metadata: dict[str, str], mem_eff: bool = False,
                  marker_2511: bool = False) -> Path:
    """The whole DiT in the ComfyUI layout (`model.diffusion_model.` keys, Edit-2511's marker key) with the
    diffusers config as JSON in metadata `config`, so engine.models.dit.load_dit (and ComfyUI) read it back."""
    config = {k: v for k, v in dict(dit.config).items() if not k.startswith("_")}
    config["_class_name"] = type(dit).__name__
    meta = {"format": "pt", "config": json.dumps(config), **metadata}

    def items():
        for name, tensor in dit.state_dict().items():
            yield COMFY_PREFIX + name, tensor
        if marker_2511:
            yield COMFY_PREFIX + MARKER_2511, torch.zeros(0, dtype=dtype)

    if mem_eff:
        return write_streaming(dit.state_dict(), path, meta, dtype, prefix=COMFY_PREFIX,
                               extra={MARKER_2511: torch.zeros(0, dtype=dtype)} if marker_2511 else None)
    return save_file_atomic({k: v.detach().to("cpu", dtype) for k, v in items()}, path, meta)


def write_streaming(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], dtype: torch.dtype,
                    prefix: str = "", extra: dict[str, torch.Tensor] | None = None) -> Path:
    """--mem_eff_save: safetensors_io.write_streamed with the header computed from shapes alone, each tensor
    converted to `dtype` and written on its own, so at most one converted tensor exists in RAM at a time
    (a full state-dict copy of the 20B DiT would be 40 GB)."""
    items = [(prefix + k, v) for k, v in state.items()] + [(prefix + k, v) for k, v in (extra or {}).items()]
    items.sort(key=lambda kv: kv[0])
    out_dtype = lambda t: dtype if t.is_floating_point() else t.dtype            # noqa: E731
    entries = [(name, dtype_name(out_dtype(t)), tuple(t.shape)) for name, t in items]
    converted = ((name, t.detach().to(out_dtype(t))) for name, t in items)
    return write_streamed(path, entries, converted, metadata)


# ---------------------------------------------------------------------------------------------- states

def save_state(accelerator, path: Path, progress: dict, files: dict[str, dict[str, torch.Tensor]] | None = None,
               shards=None) -> Path:
    """All processes call this (accelerate saves each process's RNG state); the main process renames. `files`:
    more safetensors files (name -> tensors) the main process writes into the state (the EMA); `shards(folder)`:
    what every process writes into it before the rename (FSDP's sharded model and optimizer)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if shards is not None:
        shards(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, tensors in (files or {}).items():
            save_file(tensors, tmp / name)
        (tmp / STATE_JSON).write_text(json.dumps(progress, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        old = path.with_name(f".{path.name}.old")
        if old.exists():                        # left by an interrupted save: os.replace cannot rename over it
            shutil.rmtree(old)
        if path.exists():                       # replace an older state of the same name: keep it until the end
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def read_progress(path: str | Path) -> dict:
    state = Path(path) / STATE_JSON
    if not state.is_file():
        raise OptionError(f"--resume {path}: not a complete training state (no {STATE_JSON}).",
                          "Pass a '<name>-state' folder written with --save_state (hidden '.tmp' folders are "
                          "unfinished saves).")
    return json.loads(state.read_text(encoding="utf-8"))


def check_same_world(path: str | Path, num_processes: int) -> None:
    """A state's position in the epoch and its RNG files are per process: only the process count that wrote it
    continues the same curve."""
    saved = read_progress(path).get("world", 1)
    if saved != num_processes:
        raise OptionError(f"--resume {path}: the state was saved by {saved} process(es), this run has "
                          f"{num_processes}.", f"Launch with {saved} process(es) (accelerate launch --num_processes "
                          f"{saved} ...), or start a new run from the saved weights (--network_weights / --dit).")


def load_state(accelerator, path: str | Path) -> dict:
    progress = read_progress(path)
    accelerator.load_state(str(path))
    return progress


def _fsync_tree(folder: Path) -> None:
    for item in folder.iterdir():
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())

