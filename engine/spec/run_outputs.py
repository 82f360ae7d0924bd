"""A training run never silently replaces the work of an earlier run with the same output name.

Before a `train_network` / `train` run loads anything, the files its output name would write are looked up in
its output folder: the final model (`<name>.safetensors`, `<name>_diffusers.safetensors`), the run config
(`<name>_config.toml`), intermediate saves (`<name>-000001…`, `<name>-step00000010…`) and states (`…-state`).
If any exists the run is refused, and the message says the three ways on: another name (the first free
`<name>_2`, `<name>_3` … is proposed), `--overwrite` to replace them, or `--resume <state>` to continue that run.
The Train tab offers the same choice as buttons and refuses a second queued run with the same name
(app/tabs/train.py).

Torch-free: the app and the engine use the same rule.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.spec import naming
from engine.spec.errors import OptionError

MAX_LISTED = 4


def existing_outputs(output_dir: str | Path | None, output_name: str | None) -> list[Path]:
    """The files and state folders of an earlier run named `output_name` in `output_dir` (sorted)."""
    if not output_dir or not output_name or not Path(output_dir).is_dir():
        return []
    own = re.compile(re.escape(output_name) + r"(\.safetensors|_diffusers\.safetensors|"
                     + re.escape(naming.RUN_TOML_SUFFIX) + "|" + re.escape(naming.STATE_SUFFIX) + ")$")
    patterns = [own, naming.intermediate_save(output_name, "epoch"), naming.intermediate_save(output_name, "step")]
    try:
        names = [p for p in Path(output_dir).iterdir() if any(r.match(p.name) for r in patterns)]
    except OSError:
        return []
    return sorted(names)


def free_name(output_dir: str | Path | None, output_name: str, taken: set[str] = frozenset()) -> str:
    """`output_name` itself when nothing uses it, else the first of `<name>_2`, `<name>_3` … that is free
    on disk and not in `taken` (names of runs already queued)."""
    if not existing_outputs(output_dir, output_name) and output_name not in taken:
        return output_name
    base = re.sub(r"_\d+$", "", output_name) or output_name
    n = 2
    while existing_outputs(output_dir, f"{base}_{n}") or f"{base}_{n}" in taken:
        n += 1
    return f"{base}_{n}"


def check_name_free(cfg) -> None:
    """Refuse a run whose output name is already used in its output folder, unless it resumes or overwrites."""
    if getattr(cfg, "resume", None) or getattr(cfg, "overwrite", False):
        return
    found = existing_outputs(cfg.output_dir, cfg.output_name)
    if not found:
        return
    listed = ", ".join(p.name for p in found[:MAX_LISTED]) + (f" and {len(found) - MAX_LISTED} more"
                                                             if len(found) > MAX_LISTED else "")
    raise OptionError(f"--output_name {cfg.output_name}: {cfg.output_dir} already holds the output of a run with "
                      f"this name ({listed}); starting would replace it.",
                      f"Use another name (e.g. --output_name {free_name(cfg.output_dir, cfg.output_name)}), add "
                      "--overwrite to replace those files, or --resume <its -state folder> to continue that run.")
