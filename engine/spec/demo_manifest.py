"""The demo manifest (`<demo dir>/demo.json`): what the app reads at start-up to pre-fill its forms.

`python -m engine make_demo DIR` (engine/demo.py) writes it last, so it exists only in a complete demo. The app
checks it without importing torch: a missing, older, moved or incomplete demo reads as None and is rebuilt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEMO_VERSION = 1
MANIFEST = "demo.json"


def load_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a complete, current demo in `root`, or None (missing, older version, moved, a file gone)."""
    root = Path(root).expanduser().resolve()
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != DEMO_VERSION:
        return None
    if manifest.get("root") != str(root):  # moved: the absolute paths inside are stale
        return None
    files = manifest.get("files") or []
    if not files or not all((root / f).is_file() for f in files):
        return None
    return manifest
