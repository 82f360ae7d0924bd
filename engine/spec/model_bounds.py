"""Sane bounds for a model's architecture config, checked before anything is built from it.

A safetensors file may carry its config as JSON in the metadata key `config` (docs/architecture.md, "Model
files"). The loaders build the module from that config before they compare it with the tensor shapes, and
building allocates: RoPE tables, per-layer modules, buffers. A 200 KB file claiming 10 million layers or a
RoPE axis of a million dimensions would make the engine allocate gigabytes (or hang) before any shape check.
So every size-like value is bounded here, far above the published Qwen-Image / Qwen2.5-VL / VAE configs (60
layers, width 3584, RoPE axes [16, 56, 56]) and far below what could hurt. `inspect_model` reports the same
problems without loading anything.

API: `config_problems(config) -> [problem]`, `check_config(config, source)` raises ModelFileError.
"""

from __future__ import annotations

import re

from engine.spec.errors import ModelFileError

MAX_DEPTH = 6              # config → text_config → rope_scaling → ...: real configs nest 2-3 levels
MAX_KEYS = 4000
# key → (smallest, largest) for an int value or for each int of a list value
BOUNDS: dict[str, tuple[int, int]] = {
    "num_layers": (1, 1024), "num_hidden_layers": (1, 1024), "depth": (1, 1024), "num_res_blocks": (1, 64),
    "attention_head_dim": (1, 4096), "head_dim": (1, 4096),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "num_heads": (1, 1024),
    "joint_attention_dim": (1, 65536), "hidden_size": (1, 65536), "embed_dim": (1, 65536),
    "out_hidden_size": (1, 65536), "intermediate_size": (1, 262144),
    "in_channels": (1, 8192), "out_channels": (1, 8192), "z_dim": (1, 8192), "base_dim": (1, 8192),
    "in_chans": (1, 8192), "latent_channels": (1, 8192),
    "patch_size": (1, 64), "spatial_patch_size": (1, 64), "temporal_patch_size": (1, 64),
    "spatial_merge_size": (1, 64), "axes_dims_rope": (0, 1024), "dim_mult": (1, 64),
    "vocab_size": (1, 1 << 22), "max_position_embeddings": (1, 1 << 24), "window_size": (1, 1 << 16),
}
MAX_LIST = 64              # a list of sizes (axes_dims_rope, dim_mult, fullatt_block_indexes ...)
SIZE_LIKE = re.compile(r"(^|_)(num|n)_|_(dim|dims|size|layers|heads|channels|depth)$")
GENERIC_MAX = 1 << 20      # any other size-like integer


def config_problems(config: dict) -> list[str]:
    """What is out of bounds in `config` (an empty list: nothing)."""
    problems: list[str] = []
    count = [0]
    _walk(config, "", 1, problems, count)
    if not problems:
        problems += _dit_consistency(config)
    return problems


def check_config(config: dict, source: str) -> None:
    problems = config_problems(config)
    if problems:
        raise ModelFileError(f"{source}: the architecture config is not plausible: {'; '.join(problems[:3])}.",
                             "The file is damaged or not a Qwen-Image model file; download it again (or remove "
                             "the 'config' metadata to use the published config).")


def _walk(node: dict, prefix: str, depth: int, problems: list[str], count: list[int]) -> None:
    if depth > MAX_DEPTH:
        problems.append(f"'{prefix.rstrip('.')}' nests deeper than {MAX_DEPTH} levels")
        return
    for key, value in node.items():
        count[0] += 1
        if count[0] > MAX_KEYS:
            problems.append(f"more than {MAX_KEYS} keys")
            return
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _walk(value, name + ".", depth + 1, problems, count)
        elif isinstance(value, list):
            _check_list(str(key), name, value, problems)
        elif isinstance(value, int) and not isinstance(value, bool):
            _check_int(str(key), name, value, problems)


def _check_list(key: str, name: str, value: list, problems: list[str]) -> None:
    if len(value) > MAX_LIST and (key in BOUNDS or SIZE_LIKE.search(key)):
        problems.append(f"'{name}' lists {len(value)} values (at most {MAX_LIST})")
        return
    for v in value:
        if isinstance(v, (list, dict)):
            problems.append(f"'{name}' holds nested values")
            return
        if isinstance(v, int) and not isinstance(v, bool):
            if _check_int(key, name, v, problems):
                return


def _check_int(key: str, name: str, value: int, problems: list[str]) -> bool:
    low, high = BOUNDS.get(key, (0, GENERIC_MAX) if SIZE_LIKE.search(key) else (None, None))
    if low is None or low <= value <= high:
        return False
    problems.append(f"'{name}' = {value} is outside {low}..{high}")
    return True


def _dit_consistency(config: dict) -> list[str]:
    """The DiT's RoPE axes split each attention head: their sum must be the head width."""
    axes, head = config.get("axes_dims_rope"), config.get("attention_head_dim")
    if isinstance(axes, list) and isinstance(head, int) and all(isinstance(a, int) for a in axes) \
            and sum(axes) != head:
        return [f"'axes_dims_rope' {axes} sums to {sum(axes)}, not attention_head_dim {head}"]
    return []
