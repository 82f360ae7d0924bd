"""Sharded full finetune (FSDP2, torch.distributed.fsdp.fully_shard) for `train` over several GPUs.

Turned on by `accelerate launch --config_file <an FSDP config>` (engine/spec/launch.py writes one; the Train
tab's "Several GPUs (FSDP)"), which sets accelerate's ACCELERATE_USE_FSDP / FSDP_VERSION for every process.
accelerate provides the process group; the sharding is ours, so the loop (engine/train/loop.py) stays the same:
the model is not passed through accelerator.prepare (the DDP path does not either).

- Loading: each process reads the DiT into host RAM (tensor by tensor, as every load), then each transformer
  block and the root are sharded with `fully_shard` over all processes: only 1/N of every weight goes to its GPU.
  Gradient checkpointing and the attention kernel are set up before sharding, as for one GPU.
- Step: FSDP gathers one block's weights for its forward and backward (and prefetches the next) and
  reduce-scatters its gradients, averaged over the processes: the update one process with
  --gradient_accumulation_steps N computes on the same batches (tests/test_train_fsdp.py).
- Optimizer: torch's optimizers step the local shards (DTensors). Adafactor's factored second moment (row and
  column means of a whole matrix) and bitsandbytes' 8-bit states are not shard-aware, so they are refused, and so
  is --fused_backward_pass (its per-parameter hook needs a whole gradient). With N GPUs AdamW's states are 1/N each.
- Model files: the same single-file DiT as one process writes (ComfyUI layout, config in the metadata). Every
  process takes part in gathering each tensor in turn; the main process writes it and drops it, so no process
  ever holds the whole model (streamed like --mem_eff_save).
- States (--save_state, --resume): the model and optimizer shards are written with torch.distributed.checkpoint
  into `<state>/fsdp/` by every process (one file per process plus metadata); the scheduler, RNG states and the
  position in the epoch are accelerate's and ours as for DDP. Resuming needs the same process count (the data
  order is per process: engine/train/checkpoints.py: check_same_world).

API: `enabled()`, `check(cfg, full)`, `trainee(cfg, variant, device, world) -> Trainee`,
`save_shards(model, optimizer)(folder)`, `load_shards(folder, model, optimizer)`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from engine.models import dit_setup
from engine.models.safetensors_io import dtype_name, write_streamed
from engine.spec.errors import OptionError
from engine.train.checkpoints import COMFY_PREFIX, MARKER_2511
from engine.train.lora import SAVE_DTYPES
from engine.train.lora_metadata import modelspec
from engine.train.trainee import Trainee, dit_dtype

log = logging.getLogger(__name__)

SHARDS = "fsdp"                      # folder of the sharded model + optimizer inside a state
NOT_SHARD_AWARE = ("adafactor", "8bit")


def enabled() -> bool:
    """True when accelerate launched this process with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def check(cfg, full: bool) -> None:
    """Refuse what sharding cannot do, before any model loads."""
    fix = "Use a plain multi-GPU launch (data parallel), or change the option as said."
    if not full:
        raise OptionError("FSDP shards a full finetune (`train`); a LoRA trains fine data-parallel.",
                          "Launch train_network without the FSDP config (Processes (GPUs) > 1 is data parallel).")
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise OptionError(f"the accelerate config asks for FSDP version {version}; the engine shards with FSDP2.",
                          "Set fsdp_version: 2 in the accelerate config (engine/spec/launch.py writes one).")
    if cfg.blocks_to_swap:
        raise OptionError(f"--blocks_to_swap {cfg.blocks_to_swap} with FSDP: sharding already splits the weights "
                          "over the GPUs.", "Set --blocks_to_swap 0.")
    if cfg.fused_backward_pass:
        raise OptionError("--fused_backward_pass with FSDP: its per-parameter step needs a whole gradient; FSDP "
                          "keeps gradients sharded, which saves the same memory.", "Drop --fused_backward_pass.")
    if any(k in (cfg.optimizer_type or "").lower() for k in NOT_SHARD_AWARE):
        raise OptionError(f"--optimizer_type {cfg.optimizer_type} with FSDP: its states are computed over whole "
                          "matrices, not shards.", "Use AdamW (its states are sharded too). " + fix)
    if cfg.use_ema:
        raise OptionError("--use_ema with FSDP: the average would be kept of one process's shards only.",
                          "Drop --use_ema for a sharded run (or train on one GPU with the average on the CPU).")
    if cfg.sample_prompts:
        raise OptionError("--sample_prompts with FSDP: sampling would run on the main process alone, while the "
                          "weights are spread over all of them.",
                          "Drop --sample_prompts and generate from the saved checkpoints (Generate tab).")


def trainee(cfg, variant, device: torch.device, world: int) -> Trainee:
    dtype = dit_dtype(cfg, device, full=True)
    # host RAM first (`swap=True` loads to the CPU): the GPU only ever holds this process's shards
    dit = dit_setup.load(cfg.dit, variant, device, dtype, fp8=False, swap=True)
    dit.train().requires_grad_(True)
    dit_setup.finish(dit, device, training=True, trainable_blocks=True, checkpointing=cfg.gradient_checkpointing,
                     checkpoint_offload=cfg.gradient_checkpointing_cpu_offload, attention=cfg.attn_mode())
    shard(dit, device, world)
    params = [p for p in dit.parameters() if p.requires_grad]
    log.info("FSDP: %d tensors, %.1fM parameters sharded over %d processes (%s)", len(params),
             sum(p.numel() for p in params) / 1e6, world, str(dtype).removeprefix("torch."))
    save_dtype = SAVE_DTYPES[cfg.save_precision] if cfg.save_precision else torch.bfloat16

    def save(path: Path, stats: dict) -> list[Path]:
        meta = modelspec(variant, path.stem, time.time(), cfg, is_lora=False)
        meta.update({k: str(v) for k, v in stats.items()})
        written = save_gathered(dit, path, save_dtype, meta, marker_2511=variant.zero_cond_t)
        return [written] if written else []

    groups = [{"params": params, "lr": cfg.learning_rate, "name": "dit"}]
    return Trainee(dit, dit, groups, dtype, save, collective_save=True)


def shard(dit, device: torch.device, world: int) -> None:
    """Each block is one FSDP unit (gathered for its forward/backward, then freed again), the root holds the
    layers outside the blocks. FSDP_RESHARD_AFTER_FORWARD=false (accelerate's option) keeps blocks gathered
    between forward and backward: faster, more memory."""
    mesh = init_device_mesh(device.type, (world,))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0")
    for block in dit.transformer_blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(dit, mesh=mesh, reshard_after_forward=reshard)


# ---------------------------------------------------------------------------------------------- model file

def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def save_gathered(dit, path: Path, dtype: torch.dtype, metadata: dict[str, str],
                  marker_2511: bool = False) -> Path | None:
    """Every process calls this. The header comes from the global shapes; then each tensor, in file order, is
    gathered by all processes and written by the main one alone (temp file + fsync + rename, as every save).
    Returns the path on the main process, None on the others. The layout is engine/train/checkpoints.py's
    save_dit_file: ComfyUI keys, config JSON in the metadata, Edit-2511's marker."""
    config = {k: v for k, v in dict(dit.config).items() if not k.startswith("_")}
    config["_class_name"] = type(dit).__name__
    meta = {"format": "pt", "config": json.dumps(config), **metadata}
    state = dict(dit.state_dict())
    entries = sorted([(COMFY_PREFIX + k, v) for k, v in state.items()] +
                     ([(COMFY_PREFIX + MARKER_2511, torch.zeros(0, dtype=dtype))] if marker_2511 else []))
    out_dtype = lambda t: dtype if t.is_floating_point() else t.dtype            # noqa: E731
    header = [(name, dtype_name(out_dtype(t)), tuple(t.shape)) for name, t in entries]     # global shapes
    gathered = ((name, _full(t).detach().to(out_dtype(t))) for name, t in entries)
    if dist.get_rank() != 0:
        for _ in gathered:                             # take part in each gather, in the same order
            pass
        return None
    return write_streamed(path, header, gathered, meta)


# ---------------------------------------------------------------------------------------------- states

def save_shards(model, optimizer):
    """A writer for engine/train/checkpoints.py: save_state (called by every process with the state's temp
    folder): the model's and optimizer's shards through torch.distributed.checkpoint."""
    def write(folder: Path) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(folder) / SHARDS))
    return write


def load_shards(folder: str | Path, model, optimizer) -> None:
    shards = Path(folder) / SHARDS
    if not shards.is_dir():
        raise OptionError(f"--resume {folder}: no sharded model in it ({SHARDS}/); it was not saved by an FSDP run.",
                          "Resume it without the FSDP config, or pass a state saved under FSDP.")
    model_state, optim_state = get_state_dict(model, optimizer)
    saved = set(dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata)
    missing = sorted(k for k in model_state if f"model.{k}" not in saved)
    if missing:
        raise OptionError(f"--resume {folder}: its sharded model lacks {len(missing)} weight(s) of this DiT "
                          f"({', '.join(missing[:3])} ...).", "Resume with the DiT the state was trained from.")
    state = {"model": model_state, "optimizer": optim_state}
    # a parameter that never had a gradient (the last block's text-stream output feeds nothing) has no optimizer
    # state in the checkpoint: it keeps the fresh one, as in the run that saved it
    dcp.load(state, checkpoint_id=str(shards), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
