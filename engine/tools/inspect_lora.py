"""`python -m engine inspect_lora FILE... [--json]`: what a LoRA file is, from its header alone.

Format, kind, rank and alpha (one value when uniform, else per module), the layers and blocks covered, the model
version its metadata names, dtype, size and the training metadata (ss_* / modelspec). The summary itself is
engine/spec/lora_keys.py's, so the app shows the same without torch or a subprocess.
"""

from __future__ import annotations

import json

from engine.spec.errors import EngineError, OptionError
from engine.spec.lora_keys import summarize, summary_text


def inspect_file(path: str) -> dict:
    """The summary, or {"path", "error", "hint"} for a file that is not a Qwen-Image LoRA."""
    try:
        return summarize(path)
    except EngineError as e:
        return {"path": path, "error": e.message, "hint": e.hint}


def run(cfg, events) -> list[str]:
    if not cfg.files:
        raise OptionError("inspect_lora needs at least one FILE.",
                          "Example: python -m engine inspect_lora my_lora.safetensors --json")
    results = [inspect_file(p) for p in cfg.files]
    if cfg.json:
        print(json.dumps(results, ensure_ascii=False), flush=True)
    else:
        for r in results:
            print(r["path"])
            print(f"  error: {r['error']}\n  fix:   {r['hint']}" if "error" in r else summary_text(r), flush=True)
    failed = [r for r in results if "error" in r]
    if failed and len(failed) == len(results):
        first = failed[0]
        raise OptionError(first["error"], first["hint"])
    return []
