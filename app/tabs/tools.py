"""Tools tab: inspect, convert, merge, extract and resize LoRAs (docs/lora-tools.md).

Inspect reads only headers through engine/spec/lora_keys.py, in this process (no torch, instant even for big
files); the same summary appears under the Generate tab's LoRA picker. The other tools are engine commands
(`python -m engine convert_lora|merge_lora|extract_lora|resize_lora`): each form is generated from its config
class (app/forms.py), the run goes through the job manager like every other job (so it shows in the Jobs tab and
outlives a browser refresh), and the tab follows it with the one progress view (app/views.py).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.forms import build_form, values_to_config
from app.jobs import FINAL
from app.views import error_markdown, progress_html
from engine.spec import config as C
from engine.spec.errors import EngineError
from engine.spec.lora_keys import summarize, summary_markdown
from engine.spec.vram.tools import estimate_line, estimate_tool

PREFIX = "tools"
POLL_S = 1.0
# (command, config class, label, fields shown, one sentence about it)
TOOLS = (
    ("convert_lora", C.ConvertLoraConfig, "Convert", ("input", "output", "format", "device"),
     "Rewrite a LoRA in another layout; the factors are copied exactly and the training metadata is kept."),
    ("merge_lora", C.MergeLoraConfig, "Merge into DiT",
     ("dit", "model_version", "lora_weight", "lora_multiplier", "save_merged_model", "merged_precision", "device"),
     "Bake LoRAs into the DiT and write a new single-file DiT, streamed (the DiT is never whole in memory)."),
    ("extract_lora", C.ExtractLoraConfig, "Extract from finetune",
     ("model_org", "model_tuned", "model_version", "save_to", "dim", "save_precision", "clamp_quantile", "device"),
     "A LoRA from the difference of a finetuned DiT and its base (SVD per Linear layer); the share of each "
     "layer's change it keeps is reported."),
    ("resize_lora", C.ResizeLoraConfig, "Resize",
     ("model", "save_to", "new_rank", "dynamic_method", "dynamic_param", "save_precision", "device"),
     "Lower a LoRA's rank by SVD, to a fixed rank or by kept energy; each module's error is reported."),
)


def build(ctx) -> None:
    with gr.Tab("Tools", id="tools"):
        gr.Markdown("LoRA tools. **Inspect** reads only the file headers. The other tools run as engine jobs "
                    "(also listed in the Jobs tab) and never modify their input files.")
        with gr.Accordion("Inspect LoRA files", open=True):
            files = gr.Textbox(label="LoRA files (one path per line)", lines=2, elem_id=f"{PREFIX}-inspect-files")
            inspect_btn = gr.Button("Inspect", variant="primary", elem_id=f"{PREFIX}-inspect")
            report = gr.Markdown(elem_id=f"{PREFIX}-inspect-report")
        inspect_btn.click(inspect_markdown, files, report, api_name="tools_inspect")
        status = _run_area()
        for command, cls, label, names, about in TOOLS:
            with gr.Accordion(label, open=command == "convert_lora"):
                gr.Markdown(about)
                form = build_form(cls, include=names, values=_defaults(ctx, cls), elem_prefix=f"{PREFIX}-{command}")
                run_btn = gr.Button(label, variant="primary", elem_id=f"{PREFIX}-{command}-run")
            run_btn.click(lambda *v, c=command, k=cls, f=form: start(ctx, c, k, f.names, v), form.inputs,
                          [status["watch"], status["command"], status["message"], status["timer"]],
                          api_name=f"tools_{command}")
        status["timer"].tick(lambda w: poll(ctx, w), status["watch"],
                             [status["progress"], status["result"], status["log"], status["timer"]],
                             show_progress="hidden", api_name="tools_poll")


def _run_area() -> dict:
    """The widgets that follow the tool job started last."""
    with gr.Group():
        message = gr.Markdown(elem_id=f"{PREFIX}-message")
        command = gr.Textbox(label="Command line (exactly what runs; copy to run in a terminal)", lines=1,
                             interactive=False, buttons=["copy"], elem_id=f"{PREFIX}-command")
        progress = gr.HTML(elem_id=f"{PREFIX}-progress")
        result = gr.Markdown(elem_id=f"{PREFIX}-result")
        log = gr.Textbox(label="Log (last lines)", lines=6, max_lines=6, autoscroll=True, interactive=False,
                         elem_id=f"{PREFIX}-log")
    return {"message": message, "command": command, "progress": progress, "result": result, "log": log,
            "watch": gr.State(None), "timer": gr.Timer(POLL_S, active=False)}


def _defaults(ctx, cls):
    """Start from the Models tab's text-to-image DiT for the tools that read one. Device: the engine's auto."""
    dit = ctx.dit_path("original") or None
    fields = cls.__dataclass_fields__
    return cls(**{name: dit for name in ("dit", "model_org") if name in fields})


def inspect_markdown(text: str, empty: str = "Give at least one LoRA file.") -> str:
    """One summary table per file (one path a line); a file that is not a Qwen-Image LoRA gets its error and fix
    instead. The Generate tab's LoRA picker shows the same."""
    paths = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not paths:
        return empty
    return "\n\n".join(lora_summary(p) for p in paths)


def lora_summary(path: str) -> str:
    try:
        return summary_markdown(summarize(path))
    except EngineError as e:
        return f"**{Path(path).name}**\n\n" + error_markdown(e)


def start(ctx, command: str, cls, names: list[str], values: tuple) -> tuple:
    """Build the config from the form, refuse what validate refuses, and queue the engine command.
    Returns (job to watch, command line, message, timer)."""
    try:
        cfg = values_to_config(cls, dict(zip(names, values)))
        est = estimate_tool(command, cfg)       # reads the headers: a wrong path is refused before the job starts
        job = ctx.submit_config(command, cfg, title=f"{command} {_target(cfg)}")
    except EngineError as e:
        return gr.skip(), gr.skip(), "Cannot start. " + error_markdown(e), gr.skip()
    said = f"Started **{job.id}** ({job.status}); progress below and in the Jobs tab."
    if est is not None:
        said += " " + estimate_line(est)
    return job.id, job.cmdline, said, gr.Timer(active=True)


def _target(cfg) -> str:
    for name in ("output", "save_merged_model", "save_to"):
        if getattr(cfg, name, None):
            return Path(getattr(cfg, name)).name
    return ""


def poll(ctx, job_id: str | None) -> tuple:
    """(progress, result, log tail, timer) of the followed job; the timer stops once it has ended."""
    view = ctx.jobs.get(job_id) if job_id else None
    if view is None:
        return "", "", "", gr.Timer(active=False)
    return (progress_html(view), result_markdown(view), "\n".join(view["tail"][-30:]),
            gr.Timer(active=view["status"] not in FINAL))


def result_markdown(view: dict) -> str:
    """What the ended job made (with the summary of a LoRA it wrote), or its error."""
    if view["status"] not in FINAL:
        return ""
    if view.get("error") and view["status"] != "done":
        return error_markdown(view["error"])
    outputs = (view.get("done") or {}).get("outputs") or []
    lines = [f"Wrote `{p}`" for p in outputs]
    loras = [p for p in outputs if view["command"] != "merge_lora"]
    return "\n\n".join(lines + [lora_summary(p) for p in loras])
