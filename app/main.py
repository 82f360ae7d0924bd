"""Builds the Gradio app from the tab modules (app/tabs/__init__.py: TABS) and launches it.

Start-up imports no torch/diffusers/transformers: tabs talk to the engine through subprocesses.
Polling timers run only for the tab on screen and only while that tab has something running (ctx.register_timer),
so an idle page costs no CPU; the Jobs tab, while shown, also looks every few seconds for jobs started elsewhere.
"""

from __future__ import annotations

import importlib

import gradio as gr
from starlette.middleware import Middleware

from app.security import Guard, is_loopback_host
from app.tabs import TABS

TITLE = "Qwen-Image Studio"
CSS = ("#jobs-log textarea, #jobs-command input { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }\n"
       ".qis-applied { outline: 3px solid #3b82f6; border-radius: 8px; }\n"
       ".qis-fits { border-left: 4px solid #10b981; padding-left: 6px; }")
TAB_LABELS = {"Models": "models", "Dataset": "dataset", "Cache": "cache", "Train": "train",
              "Generate / Edit": "generate", "Jobs": "jobs"}


def offline_theme() -> gr.themes.Base:
    """The default look with system fonts: nothing is fetched from Google Fonts (works air-gapped)."""
    return gr.themes.Default(font=["system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


def build_app(ctx) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}" + ("  \n*demo models loaded*" if ctx.demo is not None else ""))
        with gr.Tabs() as tabs:
            ctx.tabs = tabs
            for name in TABS:
                importlib.import_module(f"app.tabs.{name}").build(ctx)
        wire_timers(ctx, tabs)
        wire_gotos(ctx)
    return demo


def timer_states(ctx, shown: str | None) -> list:
    """Each polling timer on only when its tab is the one shown and has something running."""
    return [gr.Timer(active=tab_id == shown and bool(busy())) for tab_id, _, busy in ctx.timers]


def wire_timers(ctx, tabs) -> None:
    if not ctx.timers:
        return

    def shown_tab(evt: gr.SelectData):
        data = getattr(evt, "_data", {}) or {}
        return timer_states(ctx, data.get("id") or TAB_LABELS.get(str(evt.value)))

    tabs.select(shown_tab, None, [t for _, t, _ in ctx.timers], show_progress="hidden", api_visibility="private")


def wire_gotos(ctx) -> None:
    """A button that leads to another tab runs that tab's openers next, then starts its timer if it is busy."""
    timers = [t for _, t, _ in ctx.timers]
    for dependency, tab_id in ctx.gotos:
        chain = dependency
        for fn, inputs, outputs in ctx.openers.get(tab_id, []):
            chain = chain.then(fn, inputs, outputs, show_progress="hidden", api_visibility="private")
        if timers:
            chain.then(lambda t=tab_id: timer_states(ctx, t), None, timers, show_progress="hidden",
                       api_visibility="private")


def quiet_queue(demo) -> None:
    """Gradio's queue checks for work every 1 ms (and for progress every 10 ms) on Linux and macOS: about 6% of a
    core while nothing happens. 50 ms / 100 ms, the values gradio itself uses on Windows, bring an idle server
    to ~0.5% and add at most 50 ms before an event starts. (The attributes are gradio's own, without a public
    setter; a gradio without them is left as it is.)"""
    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, 0.05)
        queue.progress_update_sleep_when_free = max(getattr(queue, "progress_update_sleep_when_free", 0.1), 0.1)


def launch(ctx, token: str | None, host: str = "127.0.0.1", port: int | None = None,
           auth: tuple[str, str] | None = None) -> gr.Blocks:
    """Start serving and return at once (the caller prints the address and then waits: demo.block_thread()).

    Every route sits behind app/security.py's Guard (Host, Origin, the per-launch `token`, the login). gradio's
    own browser opening and address print are off: the address that works carries the token, and launch.py
    prints and opens that one. Files are served from the data dir only (the demo, results, uploads, inputs)."""
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    quiet_queue(demo)
    guard = Middleware(Guard, token=token, loopback_only=is_loopback_host(host), auth=auth is not None)
    demo.launch(server_name=host, server_port=port, inbrowser=False, auth=auth, quiet=True,
                theme=offline_theme(), css=CSS, footer_links=[], allowed_paths=[str(ctx.data_dir)],
                blocked_paths=[str(ctx.data_dir / "settings.json"), str(ctx.data_dir / "private")],
                prevent_thread_lock=True, show_error=True, app_kwargs={"middleware": [guard]})
    return demo
