"""Dataset tab panel: captions (edit instructions for pairs) written by the text encoder, then reviewed.

"Write captions" runs `caption_images` as a job with `--review_file`, so the engine writes nothing of the person's:
each caption becomes a proposal in `<data_dir>/captions/<run>/captions_review.jsonl`. The review list shows the
proposals as they arrive; a proposal is accepted (as shown or edited) or rejected one by one, or all at once.
Accepting writes the caption file atomically after copying the one it replaces under
`<data_dir>/caption_backups/` (engine/spec/dataset/captions.py: accept). The dataset config is the tab's TOML text,
saved into the run folder so the job reads exactly what the tab shows.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from app.forms import build_form, values_to_config
from app.jobs import FINAL
from app.views import error_markdown, progress_label, status_line
from engine.spec.config import CaptionImagesConfig, ConfigError, atomic_write_text
from engine.spec.dataset import captions as C
from engine.spec.errors import DatasetError, EngineError
from engine.spec.vram import estimate_config

FORM = ["text_encoder", "tokenizer", "caption_style", "caption_prompt", "trigger_word", "max_new_tokens",
        "overwrite", "fp8_vl", "device", "do_sample", "temperature", "top_p", "seed", "caption_image_area"]
REVIEW_HEADERS = ["item", "kind", "status", "proposed caption", "caption now"]
POLL_S = 1.0


def build(ctx, toml) -> None:
    """The panel, inside the Dataset tab; `toml` is the tab's dataset-config text box."""
    with gr.Accordion("Write captions with the text encoder (review before saving)", open=False,
                      elem_id="caption-panel"):
        gr.Markdown("Qwen2.5-VL, the text encoder you already have, writes a caption for each image without one "
                    "(*overwrite*: for every image), and for an edit pair the instruction that turns the control "
                    "image(s) into the target. **Nothing is saved until you accept it below**; an accepted caption "
                    "replaces the file after a copy of it is kept in the Studio's `caption_backups/` folder.")
        gr.Markdown(memory_note(), elem_id="caption-memory")
        form = build_form(CaptionImagesConfig, include=FORM, values=_defaults(ctx), elem_prefix="caption")
        with gr.Accordion("Built-in instructions (copy one into Caption prompt to edit it)", open=False):
            gr.Markdown("\n\n".join([f"**{k}**: {v}" for k, v in C.STYLE_PROMPTS.items()]
                                    + [f"**edit pairs**: {C.EDIT_PROMPT}"]))
        run_btn = gr.Button("Write captions", variant="primary", elem_id="caption-run")
        command = gr.Textbox(label="Command line", interactive=False, buttons=["copy"], elem_id="caption-command")
        progress = gr.Markdown(elem_id="caption-progress")
        review = gr.Textbox(label="Review file (a finished run's file can be pasted here to review it again)",
                            elem_id="caption-review-file")
        table = gr.Dataframe(headers=REVIEW_HEADERS, value=[], interactive=False, wrap=True, max_height=360,
                             column_widths=["14%", "8%", "10%", "40%", "28%"], elem_id="caption-review")
        with gr.Row():
            pick = gr.Dropdown(label="Proposal", choices=[], value=None, elem_id="caption-pick", scale=1)
            text = gr.Textbox(label="Caption (edit it before accepting)", lines=2, elem_id="caption-text", scale=4)
        with gr.Row():
            accept_btn = gr.Button("Accept", elem_id="caption-accept")
            reject_btn = gr.Button("Reject", elem_id="caption-reject")
            accept_all_btn = gr.Button("Accept all pending", variant="primary", elem_id="caption-accept-all")
        message = gr.Markdown(elem_id="caption-message")
        job = gr.State("")
        timer = gr.Timer(POLL_S, active=False)

        def caption_run(toml_text, *values):
            try:
                cfg = values_to_config(CaptionImagesConfig, dict(zip(form.names, values)))
                job_id, cmdline, path = start(ctx, toml_text, cfg)
            except (ConfigError, EngineError) as e:
                return {message: "Cannot start. " + error_markdown(e)}
            return {job: job_id, command: cmdline, review: path, message: f"Started **{job_id}**.",
                    timer: gr.Timer(active=True)}

        def caption_poll(job_id, path, chosen):
            line, running = job_progress(ctx, job_id, path)
            return {progress: line, timer: gr.Timer(active=running), **_review_view(table, pick, path, chosen)}

        def caption_review(path, chosen):
            return _review_view(table, pick, path, chosen)

        def caption_decide(path, chosen, caption_text, accepted: bool):
            said = decide(ctx, path, chosen, caption_text if accepted else None)
            return {message: said, text: "", **_review_view(table, pick, path, None)}

        def caption_accept_all(path):
            return {message: accept_all(ctx, path), **_review_view(table, pick, path, None)}

        run_btn.click(caption_run, [toml, *form.inputs], [job, command, review, message, timer],
                      api_name="caption_run")
        timer.tick(caption_poll, [job, review, pick], [progress, timer, table, pick],
                   show_progress="hidden", api_visibility="private")
        review.submit(caption_review, [review, pick], [table, pick], api_name="caption_review")
        pick.input(lambda path, chosen: proposal_text(path, chosen), [review, pick], text, api_visibility="private")
        accept_btn.click(lambda p, c, t: caption_decide(p, c, t, True), [review, pick, text],
                         [message, text, table, pick], api_name="caption_accept")
        reject_btn.click(lambda p, c, t: caption_decide(p, c, t, False), [review, pick, text],
                         [message, text, table, pick], api_name="caption_reject")
        accept_all_btn.click(caption_accept_all, review, [message, table, pick], api_name="caption_accept_all")


def _defaults(ctx) -> CaptionImagesConfig:
    return CaptionImagesConfig(text_encoder=ctx.model_path("text_encoder") or None,
                               tokenizer=ctx.model_path("tokenizer") or None)


def memory_note() -> str:
    """The estimator's figures for the default image size (engine/spec/vram: the caption_images target)."""
    bf16 = estimate_config(CaptionImagesConfig())
    fp8 = estimate_config(CaptionImagesConfig(fp8_vl=True))
    return (f"GPU memory (estimate, one {bf16['inputs']['width']}² image): about **{bf16['vram_gib']:.1f} GiB**, "
            f"**{fp8['vram_gib']:.1f} GiB** with *Fp8 vl*; each control image of a pair adds its vision tokens.")


def _review_view(table, pick, path: str, chosen: str | None) -> dict:
    rows, pending = review_rows(path)
    value = chosen if chosen in pending else None
    return {table: rows, pick: gr.update(choices=pending, value=value)}


# ------------------------------------------------------------------------------------------ run

def start(ctx, toml_text: str, cfg: CaptionImagesConfig) -> tuple[str, str, str]:
    """Save the tab's dataset config into a new run folder and queue caption_images with a review file there:
    (job id, its command line, the review file)."""
    if not (toml_text or "").strip():
        raise DatasetError("there is no dataset config yet.", "Import a folder or open a dataset config first.")
    run_dir = ctx.data_dir / "captions" / time.strftime("%Y%m%d-%H%M%S")
    while run_dir.exists():
        run_dir = run_dir.with_name(run_dir.name + "-1")
    dataset = run_dir / "dataset.toml"
    atomic_write_text(dataset, toml_text)
    cfg.dataset_config, cfg.review_file = str(dataset), str(run_dir / C.REVIEW_FILE)
    job = ctx.submit_config("caption_images", cfg, title=f"caption_images {run_dir.name}")
    return job.id, job.cmdline, cfg.review_file


def job_progress(ctx, job_id: str, review_path: str) -> tuple[str, bool]:
    """(a progress line, whether the job still runs)."""
    view = ctx.jobs.get(job_id) if job_id else None
    if view is None:
        return "", False
    if view["status"] in FINAL:
        err = view.get("error")
        tail = "\n\n" + error_markdown(err) if err and view["status"] != "done" else ""
        if view["status"] == "done" and not Path(review_path or "").is_file():
            tail = "\n\nEvery image already has a caption; tick *Overwrite* to have them all captioned again."
        return status_line(view) + tail, False
    return f"**{view['status']}** · {progress_label(view) or 'starting'}", True


# ------------------------------------------------------------------------------------------ review

def item_name(p: C.Proposal) -> str:
    return f"datasets[{p.dataset}] {p.stem}"


def _proposals(path: str) -> list[C.Proposal]:
    return C.read_review(path) if (path or "").strip() and Path(path).is_file() else []


def review_rows(path: str) -> tuple[list[list], list[str]]:
    """(table rows, names of the pending proposals) of a review file."""
    try:
        proposals = _proposals(path)
    except DatasetError:
        return [], []
    rows = [[item_name(p), p.kind, p.status, p.caption, p.previous or ""] for p in proposals]
    return rows, [item_name(p) for p in proposals if p.status == C.PENDING]


def proposal_text(path: str, chosen: str | None) -> str:
    return next((p.caption for p in _proposals(path) if item_name(p) == chosen), "")


def decide(ctx, path: str, chosen: str | None, text: str | None) -> str:
    """Accept (text) or reject (None) one proposal; a sentence for the person."""
    try:
        target = next((p for p in _proposals(path) if item_name(p) == chosen), None)
        if target is None:
            return "Pick a pending proposal first."
        if text is not None and not text.strip():
            return "The caption is empty: write one, or reject the proposal."
        changed = C.accept(path, {target.key: text}, ctx.data_dir / "caption_backups", per_folder=True)
    except (EngineError, OSError) as e:
        return "Nothing saved. " + error_markdown(e)
    return _said(changed)


def accept_all(ctx, path: str) -> str:
    try:
        pending = [p for p in _proposals(path) if p.status == C.PENDING]
        changed = C.accept(path, {p.key: p.caption for p in pending}, ctx.data_dir / "caption_backups",
                           per_folder=True)
    except (EngineError, OSError) as e:
        return "Stopped. " + error_markdown(e)
    return _said(changed) if changed else "No pending proposals."


def _said(changed: list[C.Proposal]) -> str:
    lines = []
    for p in changed:
        if p.status == C.REJECTED:
            lines.append(f"- {item_name(p)}: rejected (nothing written)")
        else:
            kept = f"; the previous one is kept in `{p.backup}`" if p.backup else ""
            lines.append(f"- {item_name(p)}: saved to `{p.write_to}`{kept}")
    return "\n".join(lines)
