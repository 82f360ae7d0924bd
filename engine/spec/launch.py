"""The accelerate config file of a sharded full finetune (FSDP2), written by the Train tab's "Several GPUs (FSDP)"
and usable by hand: `accelerate launch --config_file <file> -m engine train ...` (docs/multi-gpu.md).

The engine shards the DiT itself (engine/train/fsdp.py): the file tells accelerate to start one process per GPU
(on one or several machines) and to mark them as FSDP version 2 (ACCELERATE_USE_FSDP, FSDP_VERSION,
FSDP_RESHARD_AFTER_FORWARD in each process's environment). `fsdp_auto_wrap_policy: NO_WRAP` because the engine
wraps each transformer block itself. Plain YAML text: no yaml package in the spec.

API: `fsdp_config_text(num_processes, num_machines=1, machine_rank=0, main_process_ip=None,
main_process_port=29500, mixed_precision="bf16", reshard_after_forward=True) -> str`,
`write_fsdp_config(path, **same) -> Path` (atomic), `FSDP_CONFIG_NAME`.
"""

from __future__ import annotations

from pathlib import Path

from engine.spec.config import atomic_write_text
from engine.spec.errors import OptionError

FSDP_CONFIG_NAME = "accelerate_fsdp.yaml"
PRECISIONS = ("no", "fp16", "bf16")


def fsdp_config_text(num_processes: int, num_machines: int = 1, machine_rank: int = 0,
                     main_process_ip: str | None = None, main_process_port: int = 29500,
                     mixed_precision: str = "bf16", reshard_after_forward: bool = True) -> str:
    """`num_processes` counts every GPU of every machine (accelerate's meaning)."""
    _check(num_processes, num_machines, machine_rank, main_process_ip, mixed_precision)
    lines = [
        "# accelerate config for a sharded full finetune (FSDP2): accelerate launch --config_file THIS -m engine train ...",
        "compute_environment: LOCAL_MACHINE",
        "distributed_type: FSDP",
        "downcast_bf16: 'no'",
        "fsdp_config:",
        "  fsdp_version: 2",
        f"  fsdp_reshard_after_forward: {str(reshard_after_forward).lower()}",
        "  fsdp_auto_wrap_policy: NO_WRAP",
        "  fsdp_state_dict_type: SHARDED_STATE_DICT",
        "  fsdp_offload_params: false",
        "  fsdp_cpu_ram_efficient_loading: false",
        f"machine_rank: {machine_rank}",
    ]
    if num_machines > 1:
        lines += [f"main_process_ip: {main_process_ip}", "rdzv_backend: static", "same_network: true"]
    lines += [f"main_process_port: {main_process_port}", "main_training_function: main",
              f"mixed_precision: '{mixed_precision}'",          # quoted: YAML reads a bare no as false
              f"num_machines: {num_machines}",
              f"num_processes: {num_processes}", "use_cpu: false"]
    return "\n".join(lines) + "\n"


def write_fsdp_config(path: str | Path, **kwargs) -> Path:
    atomic_write_text(Path(path), fsdp_config_text(**kwargs))
    return Path(path)


def _check(num_processes, num_machines, machine_rank, main_process_ip, mixed_precision) -> None:
    if num_processes < 2:
        raise OptionError(f"FSDP with {num_processes} process(es): sharding needs at least 2 GPUs.",
                          "Set Processes (GPUs) to the number of GPUs, or train on one GPU without FSDP.")
    if num_machines < 1 or num_processes % num_machines:
        raise OptionError(f"FSDP: {num_processes} processes over {num_machines} machine(s) is not the same number "
                          "per machine.", "Give the total GPU count, a multiple of the machine count.")
    if not 0 <= machine_rank < num_machines:
        raise OptionError(f"FSDP: machine rank {machine_rank} of {num_machines} machine(s).",
                          "Number the machines 0 .. machines − 1 (0 is the main one).")
    if num_machines > 1 and not main_process_ip:
        raise OptionError("FSDP over several machines needs the main machine's address.",
                          "Give the IP address of machine 0, reachable from every machine.")
    if mixed_precision not in PRECISIONS:
        raise OptionError(f"FSDP: mixed precision {mixed_precision!r}.", f"Use one of {', '.join(PRECISIONS)}.")
