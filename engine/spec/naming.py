"""Names the engine writes and the app reads back: one definition each, so the two sides cannot drift apart.

- Training outputs (musubi-tuner's names): the final `<output_name>.safetensors`, per epoch
  `<output_name>-{epoch:06d}.safetensors`, per step `<output_name>-step{step:08d}.safetensors`; a resumable
  state is the same stem + `-state` (a folder); the resolved run config is `<output_name>_config.toml`.
- Generated images carry their generation parameters as JSON in the PNG text chunk `parameters`; live previews
  go to `<save_path>/previews/`.
- Cache files (musubi's, so its trainer reads ours and we read its): latents
  `<stem>_<W:04d>x<H:04d>_<arch>.safetensors` (W, H = the original image size), text-encoder outputs
  `<stem>_<arch>_te.safetensors`, with arch `qi` (text-to-image) or `qie` (any edit version).
- `QIS_EVENTS=json` in a command's environment makes it write JSON event lines even to a terminal.
"""

from __future__ import annotations

import re
from pathlib import Path

PNG_PARAMETERS_KEY = "parameters"
PREVIEW_FOLDER = "previews"
RUN_TOML_SUFFIX = "_config.toml"
STATE_SUFFIX = "-state"
EMA_SUFFIX = "-ema"            # --use_ema: the averaged weights beside each checkpoint
EVENTS_ENV = "QIS_EVENTS"
EVENTS_ENV_JSON = "json"


# ------------------------------------------------------------------ training outputs

def output_stem(output_name: str, epoch: int | None = None, step: int | None = None) -> str:
    if step is not None:
        return f"{output_name}-step{step:08d}"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}"
    return output_name


def model_file(output_dir: str | Path, output_name: str, epoch: int | None = None, step: int | None = None) -> Path:
    return Path(output_dir) / f"{output_stem(output_name, epoch, step)}.safetensors"


def ema_file(model_path: str | Path) -> Path:
    """`<stem>-ema.safetensors` beside the checkpoint `<stem>.safetensors` (--use_ema)."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}{EMA_SUFFIX}{model_path.suffix}")


def state_folder(output_dir: str | Path, output_name: str, epoch: int | None = None,
                 step: int | None = None) -> Path:
    return Path(output_dir) / f"{output_stem(output_name, epoch, step)}{STATE_SUFFIX}"


def is_state_folder(path: Path) -> bool:
    return path.is_dir() and path.name.endswith(STATE_SUFFIX)


def run_toml(output_dir: str | Path, output_name: str) -> Path:
    """Where a training run keeps its resolved config, next to its outputs."""
    return Path(output_dir) / f"{output_name}{RUN_TOML_SUFFIX}"


def intermediate_save(output_name: str, kind: str) -> re.Pattern:
    """The files and states of the intermediate saves of one kind ("epoch" or "step"); group 1 is the number."""
    number = r"-(\d{6})" if kind == "epoch" else r"-step(\d{8})"
    return re.compile(re.escape(output_name) + number
                      + rf"((?:{EMA_SUFFIX})?(?:\.safetensors|_diffusers\.safetensors)|{STATE_SUFFIX})$")


# ------------------------------------------------------------------ caches

def latent_cache_name(stem: str, size: tuple[int, int], arch: str) -> str:
    w, h = size
    return f"{stem}_{w:04d}x{h:04d}_{arch}.safetensors"


def text_cache_name(stem: str, arch: str) -> str:
    return f"{stem}_{arch}_te.safetensors"


def is_text_cache_name(name: str) -> bool:
    return name.endswith("_te.safetensors")


def is_cache_name(name: str, arch: str) -> bool:
    """Only files with our naming pattern are ever removed (never images or anything else)."""
    if name.endswith(f"_{arch}_te.safetensors"):
        return True
    if not name.endswith(f"_{arch}.safetensors"):
        return False
    size = name[: -len(f"_{arch}.safetensors")].rsplit("_", 1)[-1]
    w, _, h = size.partition("x")
    return w.isdigit() and h.isdigit()


# Metadata key marking an fp8 DiT that merge_lora wrote (engine/models/fp8_files.py): the loader and
# inspect_model accept such a file, while other pre-quantized fp8 checkpoints are refused.
FP8_MARKER_KEY = "qis_fp8"
