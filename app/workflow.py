"""The person's path through the tabs, as plain Python (no gradio, no torch): what follows what.

- Models: the Models tab sets the model files once (ctx.model_path); a tab's "Models (override)" boxes are empty
  by default and an empty box means "the Models tab's file" (fill_models).
- Dataset: a dataset config carries its model version (remembered when the Dataset tab imports or saves it;
  the demo's from its manifest; otherwise guessed from its control folder) to the Cache and Train tabs.
- Last choices: the dataset, model version, folders and run name a person last used are kept in settings.json
  (written atomically) and pre-fill the tabs after a restart, before the demo's.
- Presets: a preset's blocks_to_swap is clamped to the DiT in use (engine/spec/checks.py: at least one block
  stays on the GPU), so a 12 GB card works on the 2-block demo DiT too.
- Runs: a training whose output name is taken by a queued or running one is refused before it is queued.
- Generate: option conflicts (mask + RCM, RCM debug save without a threshold) are named before the run.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from app.context import save_settings
from engine.spec import config as C
from engine.spec.checks import check_blocks_to_swap
from engine.spec.dataset.cache_files import staleness_report
from engine.spec.dataset.schema import load_dataset_config
from engine.spec.errors import EngineError, OptionError
from engine.spec.safetensors_header import read_headers

LAST_KEY = "last"                    # settings.json: the person's last choices
VERSIONS_KEY = "dataset_versions"    # settings.json: dataset config path -> model version
RECENT_KEY = "dataset_configs"       # settings.json: recent dataset configs, newest first (the Dataset tab's)
MODEL_FIELDS = ("dit", "vae", "text_encoder", "tokenizer")
_BLOCK_KEY = re.compile(r"(?:^|\.)transformer_blocks\.(\d+)\.")


# ------------------------------------------------------------------ last choices

def last(ctx, key: str, default=None):
    return (ctx.settings.get(LAST_KEY) or {}).get(key) or default


def remember(ctx, **values) -> None:
    """Keep the person's choices across restarts (settings.json is written atomically)."""
    mine = ctx.settings.setdefault(LAST_KEY, {})
    changed = {k: v for k, v in values.items() if mine.get(k) != v}
    if changed:
        mine.update(changed)
        save_settings(ctx.data_dir, ctx.settings)


# ------------------------------------------------------------------ datasets

def demo_version_of(ctx, path: str) -> str | None:
    for version, p in ((ctx.demo or {}).get("dataset_config") or {}).items():
        if p == path:
            return version
    return None


def dataset_version(ctx, path: str | None) -> str:
    """The model version a dataset config is for: as remembered, the demo's, else guessed from its layout
    (a control folder means an edit model)."""
    if not path:
        return "original"
    known = (ctx.settings.get(VERSIONS_KEY) or {}).get(str(path)) or demo_version_of(ctx, str(path))
    if known:
        return known
    try:
        config = load_dataset_config(path)
    except (EngineError, OSError):
        return "original"
    return "edit" if any(getattr(s, "control_directory", None) for s in config.datasets) else "original"


def remember_dataset(ctx, path: str, version: str | None) -> None:
    """A saved dataset config: first in the recent list, with its model version, and the last choice."""
    path = str(path)
    recent = [p for p in ctx.settings.get(RECENT_KEY, []) if p != path]
    ctx.settings[RECENT_KEY] = [path, *recent][:20]
    if version:
        ctx.settings.setdefault(VERSIONS_KEY, {})[path] = version
    ctx.settings.setdefault(LAST_KEY, {}).update(dataset_config=path, model_version=version or "original")
    save_settings(ctx.data_dir, ctx.settings)


def known_datasets(ctx) -> list[str]:
    """Dataset configs the person saved (newest first), then the demo's."""
    demo = list(((ctx.demo or {}).get("dataset_configs") or {}).values())
    return list(dict.fromkeys([*ctx.settings.get(RECENT_KEY, []), *demo]))


def dataset_choices(ctx) -> list[tuple[str, str]]:
    """(label, path) for a picker: the file name and its model version."""
    return [(f"{Path(p).stem} · {dataset_version(ctx, p)}", p) for p in known_datasets(ctx)]


def current_dataset(ctx) -> str | None:
    """The dataset to start with: the person's last one (if it still exists), else the newest saved, else the
    demo's text-to-image one."""
    mine = last(ctx, "dataset_config")
    if mine and Path(mine).is_file():
        return mine
    saved = [p for p in ctx.settings.get(RECENT_KEY, []) if Path(p).is_file()]
    if saved:
        return saved[0]
    return ((ctx.demo or {}).get("dataset_config") or {}).get("original")


def cache_state(ctx, path: str | None, version: str | None = None) -> dict:
    """How far the dataset's caches are: {"ok": bool, "missing": n, "total": n, "text": markdown}."""
    if not path:
        return {"ok": False, "missing": 0, "total": 0, "text": "Pick a dataset (the Dataset tab saves one)."}
    version = version or dataset_version(ctx, path)
    try:
        rep = staleness_report(path, version, vae=ctx.model_path("vae") or None,
                               text_encoder=ctx.model_path("text_encoder") or None,
                               tokenizer=ctx.model_path("tokenizer") or None)
    except (EngineError, OSError) as e:
        return {"ok": False, "missing": 0, "total": 0, "text": f"Cannot read `{path}`: {e}"}
    entries = rep["entries"]
    bad = [e for e in entries if e["state"] != "ok"]
    if rep["dataset_errors"]:
        text = f"**{len(rep['dataset_errors'])} dataset problem(s)**: open it in the Dataset tab and press Check."
    elif not entries:
        text = "No items in this dataset."
    elif not bad:
        text = f"Model version **{version}** · cache **complete** ({len(entries)} files)."
    else:
        text = (f"Model version **{version}** · cache: **{len(bad)} of {len(entries)} missing or stale**. "
                "Start queues the caching first, or press *Cache now*.")
    return {"ok": bool(entries) and not bad and not rep["dataset_errors"], "missing": len(bad),
            "total": len(entries), "text": text}


# ------------------------------------------------------------------ models

def fill_models(ctx, cfg, version: str | None = None):
    """A copy of the config with each empty model box set to the Models tab's file (the DiT of its version)."""
    version = version or getattr(cfg, "model_version", None) or "original"
    paths = {"dit": ctx.dit_path(version), "vae": ctx.model_path("vae"),
             "text_encoder": ctx.model_path("text_encoder"), "tokenizer": ctx.model_path("tokenizer")}
    filled = {n: paths[n] for n in MODEL_FIELDS if hasattr(cfg, n) and not getattr(cfg, n) and paths[n]}
    return dataclasses.replace(cfg, **filled) if filled else cfg      # a copy: the form's own config stays


def dit_blocks(path: str | None) -> int | None:
    """How many transformer blocks a DiT file has (from its safetensors headers; None when unreadable)."""
    if not path or not Path(path).exists():
        return None
    try:
        names = read_headers([path])
    except (EngineError, OSError, ValueError):
        return None
    found = [int(m.group(1)) for n in names if (m := _BLOCK_KEY.search(n))]
    return max(found) + 1 if found else None


def adapt_blocks(fields: dict, num_blocks: int | None) -> tuple[dict, str]:
    """A preset's fields for a DiT of `num_blocks` blocks: blocks_to_swap clamped so the engine's rule holds
    (check_blocks_to_swap), and a note saying so."""
    n = fields.get("blocks_to_swap")
    if not n or num_blocks is None:
        return dict(fields), ""
    try:
        check_blocks_to_swap(n, num_blocks)
        return dict(fields), ""
    except OptionError:
        clamped = max(0, num_blocks - 1)
        check_blocks_to_swap(clamped, num_blocks)
        return {**fields, "blocks_to_swap": clamped}, (f"blocks_to_swap {n} → {clamped}: this DiT has "
                                                       f"{num_blocks} blocks.")


def preset_fits(vram_gib: float, gpu_gib: float | None) -> bool:
    return gpu_gib is not None and vram_gib <= gpu_gib


# ------------------------------------------------------------------ generate

def generate_conflicts(has_mask: bool, rcm_threshold, rcm_debug_save: bool, is_edit: bool) -> list[str]:
    """What the engine would refuse or ignore, said next to the fields before Generate."""
    rcm = rcm_threshold not in (None, "") and str(rcm_threshold).strip() != ""
    out = []
    if has_mask and rcm:
        out.append("A painted mask and an RCM threshold cannot be used together: clear the mask or the "
                   "*Rcm threshold*.")
    if rcm_debug_save and not rcm:
        out.append("*Rcm debug save* does nothing without an *Rcm threshold*: set one (e.g. 0.5 with *Rcm relative "
                   "threshold*) or untick it.")
    if rcm and not is_edit:
        out.append("RCM needs an edit model: pick an Edit model version or clear the *Rcm threshold*.")
    return out


def cache_configs(ctx, path: str, version: str) -> list[tuple[str, object]]:
    """The two caching commands for a dataset with the Models tab's VAE / text encoder, skipping fresh files."""
    common = dict(dataset_config=path, model_version=version, skip_existing=True)
    latents = C.CacheLatentsConfig(vae=ctx.model_path("vae") or None, **common)
    text = C.CacheTextEncoderConfig(text_encoder=ctx.model_path("text_encoder") or None,
                                    tokenizer=ctx.model_path("tokenizer") or None, **common)
    return [("cache_latents", latents), ("cache_text_encoder_outputs", text)]
