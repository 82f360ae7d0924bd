"""Builds the Gradio app from the tab modules (app/tabs/__init__.py: TABS) and launches it.

Start-up imports no torch/diffusers/transformers: tabs talk to the engine through subprocesses.
"""

from __future__ import annotations

import importlib

import gradio as gr

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


def launch(ctx, host: str = "127.0.0.1", port: int | None = None, inbrowser: bool = True,
           auth: tuple[str, str] | None = None, prevent_thread_lock: bool = False):
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    return demo.launch(server_name=host, server_port=port, inbrowser=inbrowser, auth=auth,
                       theme=offline_theme(), css=CSS, footer_links=[], allowed_paths=[str(ctx.data_dir)],
                       prevent_thread_lock=prevent_thread_lock, show_error=True)
