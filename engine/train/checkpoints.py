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
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from engine.models.safetensors_io import atomic_output, save_file_atomic
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
    """Temp files of model saves whose process was killed mid-write (kill -9, power loss): hidden
    `.<output_name>….safetensors.tmp-<pid>` files whose pid is gone. Users never load them, but a full-finetune
    temp is 40 GB. (State temp folders have fixed names; the next save of that state clears its own.)"""
    pattern = re.compile(r"\." + re.escape(output_name) + r".*\.safetensors\.tmp-(\d+)")
    removed = []
    for path in Path(output_dir).glob(f".{output_name}*.tmp-*"):
        m = pattern.fullmatch(path.name)
        if m and path.is_file() and not _pid_alive(int(m.group(1))):
            path.unlink()
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


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
                torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
                torch.bool: "BOOL"}


def write_streaming(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], dtype: torch.dtype,
                    prefix: str = "", extra: dict[str, torch.Tensor] | None = None) -> Path:
    """--mem_eff_save: the header is computed from shapes alone, then each tensor is converted to `dtype`,
    copied to the host and written on its own, so at most one converted tensor exists in RAM at a time
    (a full state-dict copy of the 20B DiT would be 40 GB). Temp file + fsync + os.replace, as every save."""
    entries = [(prefix + k, v) for k, v in state.items()] + [(prefix + k, v) for k, v in (extra or {}).items()]
    entries.sort(key=lambda kv: kv[0])
    out_dtype = lambda t: dtype if t.is_floating_point() else t.dtype            # noqa: E731
    header, offset = {}, 0
    for name, t in entries:
        size = t.numel() * torch.empty(0, dtype=out_dtype(t)).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[out_dtype(t)], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)                       # safetensors aligns the data start to 8 bytes
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in entries:
            host = t.detach().to("cpu", out_dtype(t)).contiguous()
            if host.numel():
                f.write(host.view(-1).view(torch.uint8).numpy().tobytes())
            del host
    return Path(path)


# ---------------------------------------------------------------------------------------------- states

def save_state(accelerator, path: Path, progress: dict, extra=None) -> Path:
    """All processes call this (accelerate saves each process's RNG state); the main process renames.
    `extra(folder)`: more that every process writes into the state before it is renamed (FSDP shards)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if extra is not None:
        extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_JSON).write_text(json.dumps(progress, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        old = path.with_name(f".{path.name}.old")
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

