"""Builds the Gradio app from the tab modules (app/tabs/__init__.py: TABS) and launches it.

Start-up imports no torch/diffusers/transformers: tabs talk to the engine through subprocesses.
"""

from __future__ import annotations

import importlib

import gradio as gr
from starlette.middleware import Middleware

from app.security import Guard, is_loopback_host
from app.tabs import TABS

TITLE = "Qwen-Image Studio"
CSS = "#jobs-log textarea, #jobs-command input { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }"


def offline_theme() -> gr.themes.Base:
    """The default look with system fonts: nothing is fetched from Google Fonts (works air-gapped)."""
    return gr.themes.Default(font=["system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


def build_app(ctx) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}" + ("  \n*demo models loaded*" if ctx.demo is not None else ""))
        with gr.Tabs():
            for name in TABS:
                importlib.import_module(f"app.tabs.{name}").build(ctx)
    return demo


def launch(ctx, token: str | None, host: str = "127.0.0.1", port: int | None = None,
           auth: tuple[str, str] | None = None) -> gr.Blocks:
    """Start serving and return at once (the caller prints the address and then waits: demo.block_thread()).

    Every route sits behind app/security.py's Guard (Host, Origin, the per-launch `token`, the login). gradio's
    own browser opening and address print are off: the address that works carries the token, and launch.py
    prints and opens that one. Files are served from the data dir only (the demo, results, uploads, inputs)."""
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    guard = Middleware(Guard, token=token, loopback_only=is_loopback_host(host), auth=auth is not None)
    demo.launch(server_name=host, server_port=port, inbrowser=False, auth=auth, quiet=True,
                theme=offline_theme(), css=CSS, footer_links=[], allowed_paths=[str(ctx.data_dir)],
                blocked_paths=[str(ctx.data_dir / "settings.json"), str(ctx.data_dir / "private")],
                prevent_thread_lock=True, show_error=True, app_kwargs={"middleware": [guard]})
    return demo
