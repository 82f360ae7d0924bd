"""What every tab's build(ctx) gets: the data dir, settings (model paths per role), the demo manifest, the job
manager, and a helper that runs a short engine command and returns its JSON answer.

Nothing here imports torch: engine work happens in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.jobs import JobManager, engine_argv
from engine.spec.config import atomic_write_text, check_no_plumbing, to_argv, validate
from engine.spec.demo_manifest import load_manifest
from engine.spec.events import human, parse_line
from engine.spec.naming import EVENTS_ENV, EVENTS_ENV_JSON

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Role:
    key: str                 # settings key
    component: str           # inspect_model's component name
    variant: str | None      # model version for a DiT
    label: str


ROLES: tuple[Role, ...] = (
    Role("dit", "dit", "original", "DiT: Qwen-Image (text to image)"),
    Role("dit_edit", "dit", "edit", "DiT: Qwen-Image-Edit"),
    Role("dit_edit-2509", "dit", "edit-2509", "DiT: Qwen-Image-Edit-2509"),
    Role("dit_edit-2511", "dit", "edit-2511", "DiT: Qwen-Image-Edit-2511"),
    Role("text_encoder", "text_encoder", None, "Text encoder: Qwen2.5-VL 7B"),
    Role("vae", "vae", None, "VAE"),
    Role("tokenizer", "tokenizer", None, "Tokenizer folder"),
)
ROLE_BY_KEY = {r.key: r for r in ROLES}


class EngineCommandError(RuntimeError):
    """An engine command answered with an error event (kind, message, hint) or failed without one."""

    def __init__(self, message: str, hint: str = "", kind: str = "engine"):
        super().__init__(message)
        self.message, self.hint, self.kind = message, hint, kind

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


@dataclass
class AppContext:
    data_dir: Path
    jobs: JobManager
    settings: dict = field(default_factory=dict)
    demo: dict | None = None          # the demo manifest (demo.json) when the demo is in use
    demo_dir: Path | None = None
    demo_first: bool = False          # --demo: the demo's paths win over saved settings
    handoffs: dict = field(default_factory=dict)   # values one tab offers another (hand_off / take)
    chosen_models: dict = field(default_factory=dict)   # the Models tab's boxes as last inspected (this session)
    timers: list = field(default_factory=list)     # (tab id, gr.Timer, is_busy()) of tabs that poll jobs
    openers: dict = field(default_factory=dict)    # tab id -> [(fn, inputs, outputs)] run when the tab is opened
    gotos: list = field(default_factory=list)      # (event dependency, tab id): buttons that open another tab
    tabs: Any = None                               # the app's gr.Tabs (a button's handler may select a tab)
    started: float = field(default_factory=time.time)   # when this Studio started (Generate's history)

    # ---- models ----------------------------------------------------------------------------------
    def model_path(self, key: str) -> str:
        """The path for a role: what the Models tab was last given in this session, else saved settings, then the
        demo model set (the other way round with --demo). Every tab reads the models from here."""
        if key in self.chosen_models:
            return self.chosen_models[key]
        saved = self.settings.get("models", {}).get(key) or ""
        demo = demo_paths(self.demo).get(key, "") if self.demo else ""
        return (demo or saved) if self.demo_first else (saved or demo)

    def dit_path(self, version: str) -> str:
        return self.model_path("dit" if version == "original" else f"dit_{version}")

    def model_paths(self) -> dict[str, str]:
        return {r.key: self.model_path(r.key) for r in ROLES}

    def save_model_paths(self, paths: dict[str, str]) -> None:
        unknown = set(paths) - set(ROLE_BY_KEY)
        if unknown:
            raise ValueError(f"unknown model roles: {', '.join(sorted(unknown))}")
        self.settings.setdefault("models", {}).update({k: (v or "").strip() for k, v in paths.items()})
        self.choose_models(paths)
        save_settings(self.data_dir, self.settings)

    def choose_models(self, paths: dict[str, str]) -> None:
        """The Models tab's paths for this session (Inspect): every tab uses them from now on."""
        unknown = set(paths) - set(ROLE_BY_KEY)
        if unknown:
            raise ValueError(f"unknown model roles: {', '.join(sorted(unknown))}")
        self.chosen_models.update({k: (v or "").strip() for k, v in paths.items()})

    def on_open(self, tab, tab_id: str, fn, inputs, outputs, **kw) -> None:
        """Run `fn` when the tab is opened: by a click on it (its select event) or by another tab's button that
        leads there (go_to)."""
        tab.select(fn, inputs, outputs, api_visibility="private", show_progress="hidden", **kw)
        self.openers.setdefault(tab_id, []).append((fn, inputs, outputs))

    def go_to(self, dependency, tab_id: str) -> None:
        """After `dependency` (a button's event, whose handler selects the tab through ctx.tabs) the tab's
        openers run, as if it had been clicked (app/main.py wires them once every tab exists)."""
        self.gotos.append((dependency, tab_id))

    def register_timer(self, tab_id: str, timer, busy) -> None:
        """A tab's polling timer: app/main.py runs it only while its tab is shown and `busy()` is true."""
        self.timers.append((tab_id, timer, busy))

    # ---- engine ----------------------------------------------------------------------------------
    def submit_config(self, command: str, cfg, title: str = "", exclusive: bool | None = None,
                      accelerate: list[str] | None = None):
        """Queue `python -m engine <command>` with the arguments that reproduce `cfg` (engine.spec.config.to_argv),
        or `accelerate launch <accelerate options> -m engine <command> ...` when `accelerate` is given.
        Returns the Job; its `cmdline` is the exact command, for the tab to show. The plumbing options
        (--events_file, --config_file) never come from a form, a loaded TOML or a PNG: refused here."""
        validate(cfg)
        check_no_plumbing(cfg, command)
        if accelerate is None:
            return self.jobs.submit(command, to_argv(cfg), title=title, exclusive=exclusive)
        argv = accelerate_argv(command, to_argv(cfg), accelerate)
        return self.jobs.submit_argv(argv, command, title=title, exclusive=exclusive)

    # ---- hand-offs between tabs ------------------------------------------------------------------
    def hand_off(self, key: str, value: Any) -> None:
        """Offer a value to another tab, e.g. "generate.lora_weight" (Train → Generate: a LoRA file) or
        "train.dataset_config" (Dataset → Train). The receiving tab takes it when the user opens it (its
        gr.Tab.select), so it does not matter which tab was built first. One local user: state is per server."""
        self.handoffs[key] = value

    def take(self, key: str) -> Any:
        """The value offered under `key` (None when there is none); taking it clears it, so re-opening the tab
        does not overwrite what the user typed since."""
        return self.handoffs.pop(key, None)

    def run_engine_json(self, command: str, args: list[str], timeout: float = 120.0) -> Any:
        return run_engine_json(command, args, timeout)


def accelerate_argv(command: str, args: list[str], options: list[str]) -> list[str]:
    """`accelerate launch <options> -m engine <command> <args>` as an argument list, with this Python's accelerate
    (the console script next to sys.executable) and the same engine module as engine_argv."""
    module_argv = engine_argv(command, args)          # [python, -m, module, command, *args]
    return [*accelerate_launcher(), *map(str, options), "-m", *module_argv[2:]]


def accelerate_launcher() -> list[str]:
    script = Path(sys.executable).with_name("accelerate")
    if script.exists():
        return [str(script), "launch"]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]


def run_engine_json(command: str, args: list[str], timeout: float = 120.0) -> Any:
    """Run a short engine command (e.g. `inspect_model ... --json`) to completion and return its JSON answer.

    The answer is stdout without event lines; an `error` event (on stderr or stdout) becomes an
    EngineCommandError with the engine's own message and hint."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", EVENTS_ENV: EVENTS_ENV_JSON, "PYTHONIOENCODING": "utf-8"}
    try:
        proc = subprocess.run(engine_argv(command, args), capture_output=True, text=True, encoding="utf-8",
                              errors="replace", cwd=REPO, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EngineCommandError(f"`{command}` did not answer within {timeout:g} s.",
                                 "Run it from the Jobs tab or a terminal to see what it is doing.") from None
    # a command with a result prints only that on stdout and its events on stderr; others mix them on stdout
    for line in [*proc.stderr.splitlines(), *proc.stdout.splitlines()]:
        event = parse_line(line)
        if event is not None and event["type"] == "error":
            raise EngineCommandError(event.get("message", "error"), event.get("hint", ""), event.get("kind", "engine"))
    answer_lines = [line for line in proc.stdout.splitlines() if parse_line(line) is None]
    text = "\n".join(answer_lines).strip()
    if proc.returncode != 0 or not text:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise EngineCommandError(f"`{command}` exited with code {proc.returncode} and no answer:\n{tail}",
                                 "The engine's output above says why.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EngineCommandError(f"`{command}` printed something that is not JSON ({e}): {text[:300]}") from None


# ---- settings and demo ---------------------------------------------------------------------------------

def load_settings(data_dir: Path) -> dict:
    path = Path(data_dir) / "settings.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path} is not valid JSON ({e}). Fix or delete it (it only holds GUI defaults).")


def save_settings(data_dir: Path, settings: dict) -> None:
    atomic_write_text(Path(data_dir) / "settings.json", json.dumps(settings, indent=2))


def has_models(settings: dict) -> bool:
    models = settings.get("models", {})
    return any(models.get(r.key) for r in ROLES if r.component == "dit")


def demo_paths(manifest: dict) -> dict[str, str]:
    """Role key → path from the demo manifest (engine/demo.py: {"dit": {version: path}, "vae": path, ...})."""
    out = {("dit" if v == "original" else f"dit_{v}"): p for v, p in (manifest.get("dit") or {}).items()}
    out.update({k: manifest[k] for k in ("text_encoder", "vae", "tokenizer") if manifest.get(k)})
    return out


def ensure_demo(demo_dir: Path, timeout: float = 900.0) -> dict:
    """The demo's manifest, building the demo first (`python -m engine make_demo DIR`) when it is missing,
    incomplete or moved. The build runs in a subprocess: the GUI process never imports torch."""
    manifest = load_manifest(demo_dir)
    if manifest is None:
        print(f"[studio] building the demo model set in {demo_dir} (once; tiny random models, CPU) ...", flush=True)
        env = {**os.environ, EVENTS_ENV: EVENTS_ENV_JSON, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(engine_argv("make_demo", [str(demo_dir)]), cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for line in proc.stdout:             # the engine's events as short readable lines, not JSON
            shown = demo_line(line)
            if shown:
                print(shown, flush=True)
        proc.wait(timeout=timeout)
        manifest = load_manifest(demo_dir)
        if proc.returncode != 0 or manifest is None:
            raise SystemExit(f"[studio] building the demo failed (exit code {proc.returncode}); see the output "
                             f"above. Retry with: python -m engine make_demo {demo_dir} --force")
    return manifest


def demo_line(line: str) -> str:
    """One line of the demo build for the terminal: its log messages and errors; progress and the rest stay
    quiet (a plain non-event line, e.g. a warning, is shown as it is)."""
    event = parse_line(line)
    if event is None:
        return line.rstrip()
    if event["type"] == "log":
        return f"[studio] {event.get('message', '')}"
    if event["type"] == "error":
        return "[studio] " + human(event)
    return ""


def open_context(data_dir: str | os.PathLike, demo: bool = False) -> AppContext:
    """The context for a GUI session. The demo is used when asked for, or when no DiT is configured."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = load_settings(data_dir)
    ctx = AppContext(data_dir=data_dir, jobs=JobManager(data_dir / "jobs"), settings=settings)
    if demo or not has_models(settings):
        ctx.demo_dir = data_dir / "demo"
        ctx.demo = ensure_demo(ctx.demo_dir)
        ctx.demo_first = demo
    return ctx
