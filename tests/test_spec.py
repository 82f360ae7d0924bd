"""engine/spec is the whole contract between the app and the engine: it imports without torch (or diffusers,
transformers, accelerate, gradio), and the app imports nothing else from the engine."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "engine" / "spec"
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "gradio")


def spec_modules() -> list[str]:
    mods = []
    for path in sorted(SPEC.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


def test_every_spec_module_imports_without_the_heavy_libraries():
    mods = spec_modules()
    assert "engine.spec.config" in mods and "engine.spec.vram.estimate" in mods and len(mods) > 20
    code = ("import importlib, json, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(h for h in {HEAVY!r} if h in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def engine_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an engine module in a file, at any depth (function-level too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "engine"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "engine":          # `from engine import x` names the submodules
                out += [(node.lineno, f"engine.{a.name}") for a in node.names]
            elif node.module.split(".")[0] == "engine":
                out.append((node.lineno, node.module))
    return out


def test_the_app_imports_nothing_from_the_engine_outside_engine_spec():
    files = sorted((ROOT / "app").rglob("*.py")) + [ROOT / "launch.py"]
    found = {str(f.relative_to(ROOT)): engine_imports(f) for f in files}
    assert any(found.values()), "the check sees no engine import at all"
    outside = [f"{f}:{line} imports {mod}" for f, imports in found.items() for line, mod in imports
               if mod != "engine.spec" and not mod.startswith("engine.spec.")]
    assert outside == [], "run engine code through an engine subprocess instead:\n" + "\n".join(outside)


def test_the_check_catches_a_stage_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from engine.infer import generate\n    import engine.models.dit\n"
                   "from engine import demo\n")
    assert sorted(m for _, m in engine_imports(bad)) == ["engine.demo", "engine.infer", "engine.models.dit"]
