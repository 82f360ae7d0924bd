"""Cache tab: per-dataset cache status (fresh / stale / missing, with the reason) and the two caching steps,
`cache_latents` and `cache_text_encoder_outputs`, run as jobs through the job manager.

The options are the commands' own config fields (engine/spec/options.py via app/forms.build_form); a button builds
the config and hands it to ctx.submit_config, which runs the exact `python -m engine ...` shown here. Progress
and the log come from the job's events (the job manager's views, formatted as the Jobs tab does); when a job
ends, the status is read again. The status itself is `engine.spec.dataset.cache_files.staleness_report`: file headers
and source fingerprints only, no model loaded, no torch imported.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app import workflow as W
from app.forms import build_form, values_to_config
from app.jobs import FINAL
from app.views import error_markdown, shown_error, progress_label, status_line
from engine.spec.config import CacheLatentsConfig, CacheTextEncoderConfig, ConfigError
from engine.spec.dataset.cache_files import staleness_report
from engine.spec.dataset.schema import load_dataset_config
from engine.spec.errors import EngineError

SHARED = ["model_version", "device", "batch_size", "num_workers", "skip_existing", "keep_cache"]
LATENT_ONLY = ["vae"]
TEXT_ONLY = ["text_encoder", "tokenizer", "fp8_vl"]
STATUS_HEADERS = ["dataset", "image", "cache", "state", "why", "made by"]
STATE_NAMES = {"ok": "fresh", "stale": "stale", "missing": "missing"}
MAX_ROWS = 500
CACHE_COMMANDS = ("cache_latents", "cache_text_encoder_outputs")
POLL_S = 1.0


def build(ctx) -> None:
    with gr.Tab("Cache", id="cache") as tab:
        gr.Markdown("Encode the dataset once, before training: the VAE turns images into latents, the text "
                    "encoder turns captions (and control images) into embeddings. Each cache file records what it "
                    "was made from, so an edited caption, a replaced image or another model version shows as "
                    "**stale** here. *Skip existing* re-encodes only what is missing or stale. Empty model boxes "
                    "use the Models tab's files; the model version follows the dataset.")
        with gr.Row(equal_height=True):
            dataset = gr.Dropdown(label="Dataset config", choices=known_configs(ctx), value=default_config(ctx),
                                  allow_custom_value=True, elem_id="cache-dataset", scale=5)
            refresh_btn = gr.Button("Refresh status", elem_id="cache-refresh", scale=1)
        summary = gr.Markdown(elem_id="cache-summary")
        with gr.Accordion("Cache entries (not fresh first)", open=False):
            table = gr.Dataframe(headers=STATUS_HEADERS, value=[], interactive=False, wrap=True, max_height=400,
                                 column_widths=["13%", "15%", "9%", "9%", "42%", "12%"], elem_id="cache-table")
        shared = build_form(CacheLatentsConfig, include=SHARED, values=_defaults(ctx, CacheLatentsConfig),
                            elem_prefix="cache")
        with gr.Row():
            with gr.Column():
                gr.Markdown("**Latents** (VAE)")
                latent_form = build_form(CacheLatentsConfig, include=LATENT_ONLY, elem_prefix="cache",
                                         values=_defaults(ctx, CacheLatentsConfig), columns=1)
                latents_btn = gr.Button("Cache latents", variant="primary", elem_id="cache-latents")
            with gr.Column():
                gr.Markdown("**Text encoder outputs**")
                text_form = build_form(CacheTextEncoderConfig, include=TEXT_ONLY, elem_prefix="cache",
                                       values=_defaults(ctx, CacheTextEncoderConfig), columns=2)
                text_btn = gr.Button("Cache text encoder outputs", variant="primary", elem_id="cache-text")
        both_btn = gr.Button("Cache both (latents, then text)", elem_id="cache-both")
        message = gr.Markdown(elem_id="cache-message")
        command = gr.Textbox(label="Command line(s) (exactly what runs; copy to run in a terminal)", lines=2,
                             interactive=False, buttons=["copy"], elem_id="cache-command")
        progress = gr.Markdown(elem_id="cache-progress")
        log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8, autoscroll=True, interactive=False,
                         elem_id="cache-log")
        watching = gr.State({})          # this page's jobs: {"jobs": all ids, "open": not ended at the last poll}
        timer = gr.Timer(POLL_S, active=False)
        ctx.register_timer("cache", timer, lambda: any(v["status"] not in FINAL and v["command"] in CACHE_COMMANDS
                                                        for v in ctx.jobs.list()))

        model_inputs = [shared.components["model_version"], latent_form.components["vae"],
                        text_form.components["text_encoder"], text_form.components["tokenizer"]]
        form_inputs = [dataset, *shared.inputs, *latent_form.inputs, *text_form.inputs]
        n_shared, n_latent = len(shared.inputs), len(latent_form.inputs)

        def configs(values):
            ds, rest = values[0], values[1:]
            common = dict(zip(shared.names, rest[:n_shared]), dataset_config=ds or None)
            latent = dict(zip(latent_form.names, rest[n_shared:n_shared + n_latent]))
            text = dict(zip(text_form.names, rest[n_shared + n_latent:]))
            return (W.fill_models(ctx, values_to_config(CacheLatentsConfig, {**common, **latent})),
                    W.fill_models(ctx, values_to_config(CacheTextEncoderConfig, {**common, **text})))

        def start(which, *values):
            try:
                latents_cfg, text_cfg = configs(values)
                chosen = {"latents": [latents_cfg], "text": [text_cfg], "both": [latents_cfg, text_cfg]}[which]
                ids, command_text, said = submit(ctx, chosen)
            except (ConfigError, EngineError) as e:
                return {message: "Cannot start. " + error_markdown(e)}
            return {watching: {"jobs": ids, "open": ids}, command: command_text, message: said,
                    timer: gr.Timer(active=True)}

        started = [watching, command, message, timer]
        latents_btn.click(lambda *v: start("latents", *v), form_inputs, started, api_name="cache_latents")
        text_btn.click(lambda *v: start("text", *v), form_inputs, started, api_name="cache_text")
        both_btn.click(lambda *v: start("both", *v), form_inputs, started, api_name="cache_both")

        status_out = [summary, table]

        def status_view(dataset_config, model_version, vae, text_encoder, tokenizer):
            # empty model boxes: the Models tab's files, as the jobs will use them
            return status_of(dataset_config, model_version, vae or ctx.model_path("vae"),
                             text_encoder or ctx.model_path("text_encoder"), tokenizer or ctx.model_path("tokenizer"))

        def cache_status(dataset_config, model_version, vae, text_encoder, tokenizer):
            return status_view(dataset_config, model_version, vae, text_encoder, tokenizer)

        def cache_poll(jobs, dataset_config, model_version, vae, text_encoder, tokenizer):
            watched, lines, tail, ended = poll(ctx, jobs)
            out = {progress: lines, log: tail, watching: watched, timer: gr.Timer(active=bool(watched.get("open")))}
            if ended:                     # a job of this page has just ended: read the status again
                out.update(zip(status_out, status_view(dataset_config, model_version, vae, text_encoder, tokenizer)))
            return out

        refresh_btn.click(cache_status, [dataset, *model_inputs], status_out, api_name="cache_status")
        version_box = shared.components["model_version"]

        def dataset_picked(dataset_config, vae, text_encoder, tokenizer):
            version = W.dataset_version(ctx, dataset_config) if dataset_config else None
            return [version or "", *status_view(dataset_config, version, vae, text_encoder, tokenizer)]

        # the model version follows the dataset (remembered by the Dataset tab), then the status is read for it
        dataset.change(dataset_picked, [dataset, *model_inputs[1:]], [version_box, *status_out],
                       api_name="cache_dataset")
        timer.tick(cache_poll, [watching, dataset, *model_inputs], [progress, log, watching, timer, *status_out],
                   show_progress="hidden", api_name="cache_poll")
        ctx.on_open(tab, "cache", lambda d: take_offer(ctx, d), dataset, dataset)


def _defaults(ctx, cls):
    """Pre-fill: the model version of the dataset shown first; the model boxes stay empty (the Models tab's)."""
    values = dict(skip_existing=True, model_version=W.dataset_version(ctx, default_config(ctx)))
    names = {f for f in cls.__dataclass_fields__}
    return cls(**{k: v for k, v in values.items() if k in names})


def known_configs(ctx) -> list[str]:
    """Dataset configs saved from the Dataset tab (newest first), then the demo's."""
    return W.known_datasets(ctx)


def default_config(ctx) -> str | None:
    return W.current_dataset(ctx)


def take_offer(ctx, current):
    """A config the Dataset tab just saved becomes the choice when this tab is opened."""
    offered = ctx.take("cache.dataset_config")
    if not offered:
        return gr.update(choices=known_configs(ctx))
    return gr.update(choices=known_configs(ctx), value=offered)


# ------------------------------------------------------------------------------------------ jobs

def submit(ctx, cfgs: list) -> tuple[list[str], str, str]:
    """Queue the caching commands: (job ids, their command lines, a sentence for the user)."""
    jobs = []
    for cfg in cfgs:
        command = "cache_latents" if isinstance(cfg, CacheLatentsConfig) else "cache_text_encoder_outputs"
        title = f"{command} {Path(cfg.dataset_config or '').name} ({cfg.resolved_version()})"
        jobs.append(ctx.submit_config(command, cfg, title=title))
    said = "Started " + ", ".join(f"**{j.id}** ({j.status})" for j in jobs) + ". Progress below and in the Jobs tab."
    return [j.id for j in jobs], "\n".join(j.cmdline for j in jobs), said


def poll(ctx, watching: dict) -> tuple[dict, str, str, bool]:
    """This page's latest jobs: (what to watch next, their progress lines, the log tail of the current one, whether
    one of them has just ended)."""
    watching = watching or {}
    views = [v for v in (ctx.jobs.get(i) for i in watching.get("jobs", [])) if v is not None]
    if not views:
        return {}, "", "", False
    still_open = [v["id"] for v in views if v["status"] not in FINAL]
    current = next((v for v in views if v["status"] not in FINAL), views[-1])
    ended = bool(set(watching.get("open", [])) - set(still_open))
    return ({"jobs": watching["jobs"], "open": still_open}, "\n\n".join(job_line(ctx, v) for v in views),
            "\n".join(current["tail"][-40:]), ended)


def job_line(ctx, v: dict) -> str:
    if v["status"] in FINAL:
        return status_line(v) + _error_tail(v)
    return f"**{v['status']}** · {v['title']} · {progress_label(v) or 'starting'}"


def _error_tail(v: dict) -> str:
    err = shown_error(v)
    if not err:
        return ""
    return "\n\n" + error_markdown(err)


# ------------------------------------------------------------------------------------------ status

def status_of(dataset, version, vae, text_encoder, tokenizer):
    """(summary markdown, table rows) for the dataset config; errors become the summary."""
    if not dataset:
        return "Pick a dataset config (save one in the Dataset tab).", []
    try:
        config = load_dataset_config(dataset)
        rep = staleness_report(dataset, version or "original", vae=vae or None, text_encoder=text_encoder or None,
                               tokenizer=tokenizer or None)
    except (EngineError, OSError) as e:
        return "Cannot read the status. " + error_markdown(e), []
    labels = {str(s.cache_directory): f"datasets[{s.index}]" for s in config.datasets}
    return summary_text(rep, config, labels), table_rows(rep, labels)


def summary_text(rep: dict, config, labels: dict[str, str]) -> str:
    lines = [f"Model version **{rep['model_version']}** · latents: {counts_text(rep['latents'])} · "
             f"text encoder outputs: {counts_text(rep['text'])}"]
    for spec in config.datasets:
        mine = [e for e in rep["entries"] if str(Path(e["path"]).parent) == str(spec.cache_directory)]
        per = {k: _count([e for e in mine if e["kind"] == k]) for k in ("latents", "text")}
        lines.append(f"- {labels[str(spec.cache_directory)]} ({spec.image_directory or spec.image_jsonl_file} → "
                     f"`{spec.cache_directory}`): latents {counts_text(per['latents'])}; "
                     f"text {counts_text(per['text'])}")
    foreign = [e for e in rep["entries"] if e.get("origin", "qis") != "qis"]
    if foreign:
        tools = ", ".join(sorted({e["origin"] for e in foreign}))
        lines.append(f"\n{len(foreign)} cache file(s) came from another tool ({tools}): checked by their shapes, "
                     "keys and file times, and used as they are (the table's *made by* column lists them).")
    if rep["dataset_errors"]:
        lines.append(f"\n**{len(rep['dataset_errors'])} dataset problem(s)** (items with problems are not listed; "
                     "the Dataset tab's Check shows them):")
        lines += [f"- `{p['file']}`: {p['message']} Fix: {p['fix']}" for p in rep["dataset_errors"][:10]]
    return "\n".join(lines)


def _count(entries: list[dict]) -> dict[str, int]:
    out = {"ok": 0, "missing": 0, "stale": 0}
    for e in entries:
        out[e["state"]] += 1
    return out


def counts_text(c: dict[str, int]) -> str:
    total = sum(c.values())
    if total == 0:
        return "no items"
    if c["ok"] == total:
        return f"**cache complete** ({total})"
    parts = [f"{c[k]} {k}" for k in ("stale", "missing") if c[k]]
    return "**" + ", ".join(parts) + f"** of {total}"


def table_rows(rep: dict, labels: dict[str, str]) -> list[list]:
    order = {"stale": 0, "missing": 1, "ok": 2}
    entries = sorted(rep["entries"], key=lambda e: order[e["state"]])[:MAX_ROWS]
    return [[labels.get(str(Path(e["path"]).parent), ""), e["stem"], e["kind"], STATE_NAMES[e["state"]],
             e["reason"] or Path(e["path"]).name, _made_by(e)] for e in entries]


def _made_by(entry: dict) -> str:
    """Who wrote the file: this app, another tool (musubi-tuner), or nobody yet."""
    if entry["state"] == "missing":
        return ""
    return "this app" if entry.get("origin", "qis") == "qis" else entry["origin"]
