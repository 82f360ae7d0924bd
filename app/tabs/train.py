"""Train tab: a LoRA (`train_network`) or a full finetune (`train`), set up from the option dataclasses, launched
through the job manager and watched live.

- The form is engine/spec/options.py's fields (app/forms.build_form), essentials first, the rest folded. LoRA-only
  (Network) and finetune-only (Finetune) groups show for their kind; the other widgets are shared, so switching
  kind keeps what was typed. Two Form views over the same widgets give each kind its typed config.
- What will run is shown before it runs: the exact argument list (`python -m engine ...`, or `accelerate launch
  ... -m engine ...` for several GPUs or mixed precision) and the run TOML. Start writes that TOML into the run's
  output folder (the resolved config next to its outputs) and queues the job (ctx.submit_config).
- The live view polls the job manager (a timer), never a generator bound to one browser: a refresh or a second
  browser re-attaches to the newest training job. Checkpoints go to the Generate tab through ctx.hand_off.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr
from PIL import Image

from app import presets_ui
from app import train_runs as R
from app import workflow as W
from app.forms import Form, build_form, gui_fields, make_widget
from app.jobs import FINAL
from app.views import error_markdown, gauge_html, loss_frame, progress_html
from engine.spec import config as C
from engine.spec import naming
from engine.spec.errors import EngineError

POLL_S = 1.0
# engine/train/loop.py catches the SIGINT that JobManager.stop sends and saves before it exits.
STOP_NOTE = ("**Stop** saves first: the engine writes the LoRA/DiT of the last finished step (and its state when "
             "*Save state* is on, for resuming), then exits. **Stop without saving** kills it at once.")


def build(ctx) -> None:
    with gr.Tab("Train", id="train") as tab:
        ui = layout(ctx)
        wire(ctx, tab, ui)


# ------------------------------------------------------------------ layout

TOP_FIELDS = ("output_name", "max_train_steps", "learning_rate")     # the three decisions before Start


def initial_config(ctx, version: str | None = None):
    """The form's starting values: the person's last dataset (else the demo's), its model version, a run folder
    in the data dir. The model boxes stay empty: they follow the Models tab (app/workflow.fill_models). With the
    demo, a short run that finishes in a minute on a CPU."""
    demo = ctx.demo or {}
    dataset = W.current_dataset(ctx)
    version = version or W.dataset_version(ctx, dataset)
    name = W.last(ctx, "output_name") or ("demo_lora" if demo else "my_lora")
    values = {"model_version": version, "dataset_config": dataset,
              "output_dir": str(Path(ctx.data_dir) / "runs" / name), "output_name": name}
    if demo:
        values.update(sample_prompts=demo["sample_prompts"][version], max_train_steps=60, learning_rate=1e-3,
                      save_every_n_steps=20, sample_every_n_steps=30, seed=42, max_data_loader_n_workers=0)
    return C.from_dict(C.TrainNetworkConfig, {k: v for k, v in values.items() if v not in (None, "")},
                       source="Train tab defaults")


def layout(ctx) -> SimpleNamespace:
    ui = SimpleNamespace()
    cfg = initial_config(ctx)
    fields = {f.name: f for f in gui_fields(C.TrainNetworkConfig)}
    with gr.Row(equal_height=True):
        ui.kind = gr.Radio(R.KIND_CHOICES, value="train_network", label="What to train", elem_id="train-kind",
                           scale=2)
        ui.version_note = gr.Markdown(version_text(cfg.model_version), elem_id="train-version", scale=2)
    with gr.Row(equal_height=True):
        dataset = gr.Dropdown(label="Dataset (saved configs; the Dataset tab makes one)",
                              choices=W.dataset_choices(ctx), value=cfg.dataset_config, allow_custom_value=True,
                              elem_id="train-dataset-pick", scale=5)
        ui.cache_now = gr.Button("Cache now", size="sm", elem_id="train-cache-now", scale=1)
    ui.dataset_status = gr.Markdown(W.cache_state(ctx, cfg.dataset_config, cfg.model_version)["text"],
                                    elem_id="train-dataset-status")
    ui.preset_slot = gr.Column()            # the VRAM cards, filled once the form exists (they need its widgets)
    with gr.Row(equal_height=True):
        top = {n: make_widget(fields[n], getattr(cfg, n), "train") for n in TOP_FIELDS}
        ui.start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=1)
    ui.cache_first = gr.Checkbox(True, label="When the dataset's cache is incomplete, queue the caching first",
                                 elem_id="train-cache-first")
    ui.message = gr.Markdown(elem_id="train-message")
    with gr.Row():      # shown when the output name is taken (R.name_conflict): the two ways on besides resuming
        ui.use_free = gr.Button("Use a new name", visible=False, elem_id="train-use-free")
        ui.overwrite_go = gr.Button("Overwrite the earlier run", variant="stop", visible=False,
                                    elem_id="train-overwrite")
    ui.free_name = gr.State("")
    ui.components, ui.sections = form_sections(cfg, {**top, "dataset_config": dataset})
    ui.names = R.form_names()          # the order the events take the widgets in (and the API documents)
    ui.forms = {kind: Form(cls, {n: ui.components[n] for n in R.kind_names(kind, ui.names)})
                for kind, cls in R.KINDS.items()}
    with ui.preset_slot:
        blocks = lambda cfg: W.dit_blocks(W.fill_models(ctx, cfg).dit)   # noqa: E731  (presets adapt to the DiT)
        with gr.Column(visible=True) as ui.presets_lora:
            presets_ui.build("train_network", ui.forms["train_network"], elem_prefix="train-lora", blocks=blocks)
        with gr.Column(visible=False) as ui.presets_ft:
            presets_ui.build("train", ui.forms["train"], elem_prefix="train-ft", blocks=blocks)
    with gr.Accordion("Command line and run TOML", open=False, elem_id="train-command-box"):
        ui.procs = gr.Number(1, precision=0, minimum=1, label="Processes (GPUs)", elem_id="train-procs",
                             info="More than 1, or mixed precision, launches with `accelerate launch`.")
        ui.fsdp = gr.Checkbox(False, label="Several GPUs (FSDP)", elem_id="train-fsdp",
                              info="Full finetune only: shards the DiT over the GPUs; writes the accelerate config "
                                   "next to the outputs (docs/multi-gpu.md).")
        with gr.Row():
            ui.command = gr.Textbox(label="Command line (exactly what Start runs; copy it to run it in a terminal)",
                                    interactive=False, buttons=["copy"], lines=2, elem_id="train-command", scale=3)
            ui.toml = gr.Textbox(label="Run TOML (saved next to the outputs; `--config_file` runs it)", lines=8,
                                 max_lines=14, interactive=False, buttons=["copy"], elem_id="train-toml", scale=2)
        with gr.Row(equal_height=True):
            ui.toml_path = gr.Textbox(label="Run TOML file", elem_id="train-toml-path", scale=3,
                                      placeholder="path/to/run.toml")
            ui.save = gr.Button("Save TOML", elem_id="train-save", scale=1)
            ui.load = gr.Button("Load TOML", elem_id="train-load", scale=1)
    live_section(ui)
    return ui


def version_text(version: str | None) -> str:
    return (f"Model version **{version or 'original'}**, from the dataset (change it under *Models (override)*). "
            "The model files are the Models tab's.")


def form_sections(cfg, placed: dict) -> tuple[dict, dict]:
    """The option widgets by name: `placed` (already on the page), the models under a folded "Models
    (override)" (empty = the Models tab's), every other group folded under "More options". Returns the widgets
    and the column of each kind-specific group, whose visibility follows the kind."""
    components, sections = dict(placed), {}
    with gr.Accordion("Models (override)", open=False, elem_id="train-models"):
        gr.Markdown("Empty boxes use the Models tab's files; fill one to use another file for this run.")
        components.update(build_form(C.TrainNetworkConfig, include=R.group_names("Model"), values=cfg,
                                     elem_prefix="train").components)
    with gr.Accordion("More options (values are kept while folded)", open=False, elem_id="train-more"):
        for group in R.all_groups():
            names = [n for n in R.group_names(group) if n not in components]
            if not names:
                continue
            cls = C.TrainConfig if group == "Finetune" else C.TrainNetworkConfig
            values = C.TrainConfig() if group == "Finetune" else cfg
            with gr.Column(visible=group != "Finetune") as column:
                components.update(build_form(cls, include=names, values=values, elem_prefix="train").components)
            sections[group] = column
    return components, sections


def live_section(ui) -> None:
    with gr.Accordion("Run", open=True, elem_id="train-run"):
        with gr.Row(equal_height=True):
            ui.run = gr.Dropdown(label="Training run", choices=[], value=None, allow_custom_value=True,
                                 elem_id="train-run-id", scale=3)
            ui.stop = gr.Button("Stop", elem_id="train-stop", scale=1)
            ui.kill = gr.Button("Stop without saving", variant="stop", elem_id="train-kill", scale=1)
        gr.Markdown(STOP_NOTE)
        ui.status = gr.Markdown(elem_id="train-status")
        ui.progress = gr.HTML(elem_id="train-progress")
        ui.gauge = gr.HTML(elem_id="train-gauge")
        ui.loss = gr.LinePlot(x="step", y="loss", color="series", height=260, label="Loss (raw and smoothed)",
                              visible=False, elem_id="train-loss")
        ui.samples = gr.Gallery(label="Samples", columns=4, height=260, elem_id="train-samples")
        with gr.Row(equal_height=True):
            ui.ckpt = gr.Dropdown(label="Checkpoints", choices=[], allow_custom_value=True, elem_id="train-ckpt",
                                  scale=3)
            ui.use = gr.Button("Use in Generate", elem_id="train-use", scale=1)
        with gr.Row(equal_height=True):
            ui.state = gr.Dropdown(label="Saved states (--save_state)", choices=[], allow_custom_value=True,
                                   elem_id="train-state", scale=3)
            ui.resume = gr.Button("Resume from this state", elem_id="train-resume", scale=1)
        ui.run_message = gr.Markdown(elem_id="train-run-message")
        ui.seen = gr.State({})      # what this browser shows (resend plot/gallery/menus only on change) and the
                                    # newest run it knows (a newer one is followed)
        ui.timer = gr.Timer(POLL_S, active=False)     # on only while a run of this tab is shown (app/main.py)


# ------------------------------------------------------------------ events

def wire(ctx, tab, ui) -> None:
    comps = [ui.components[n] for n in ui.names]
    form_in = [ui.kind, ui.procs, *comps, ui.fsdp]       # fsdp last: the order of the widgets' values is kept

    def fsdp_of(values) -> bool:
        return bool(values[len(ui.names)]) if len(values) > len(ui.names) else False

    def config(kind, values):
        cfg = ui.forms[kind].to_config(*[values[ui.names.index(n)] for n in ui.forms[kind].names])
        return W.fill_models(ctx, cfg)          # empty model boxes: the Models tab's files

    def preview(kind, procs, *values):
        try:
            cfg = config(kind, values)
            return R.launch_text(kind, cfg, procs, fsdp_of(values)), C.toml_text(cfg)
        except C.ConfigError as e:
            return f"(cannot build the command: {e})", ""

    def start(kind, procs, cache_first, *values):
        try:
            cfg = config(kind, values)
            R.launch_argv(kind, cfg, procs, fsdp_of(values))      # validates the launcher options too
        except C.ConfigError as e:
            return {ui.message: "⚠️ " + error_markdown(e)}
        problems = R.preflight(cfg)
        if problems:
            return {ui.message: "⚠️ Not started:\n\n" + "\n".join(f"- {p}" for p in problems), **hide}
        conflict = R.name_conflict(cfg, ctx.jobs.list())
        if conflict is not None:
            text, free, can_overwrite = conflict
            return {ui.message: f"⚠️ Not started: {text}\n\nUse the new name `{free}`"
                                + (", overwrite the earlier run, or resume it from one of its saved states (below)"
                                   if can_overwrite else "") + ".",
                    ui.use_free: gr.update(value=f"Use {free}", visible=True),
                    ui.overwrite_go: gr.update(visible=can_overwrite), ui.free_name: free}
        if fsdp_of(values):
            R.write_fsdp(kind, cfg, procs)
        accelerate = R.fsdp_options(kind, cfg, procs) if fsdp_of(values) else R.accelerate_options(cfg, procs)
        state = W.cache_state(ctx, cfg.dataset_config, cfg.model_version)
        try:
            queued = []
            if cache_first and not state["ok"] and state["total"]:
                queued = [ctx.submit_config(cmd, c, title=f"{cmd} {Path(cfg.dataset_config).name} "
                                                           f"({cfg.model_version})")
                          for cmd, c in W.cache_configs(ctx, cfg.dataset_config, cfg.model_version)]
            job = ctx.submit_config(kind, cfg, title=f"{kind} {cfg.output_name}", accelerate=accelerate)
        except OSError as e:                        # the job list could not be saved: nothing more was queued
            return {ui.message: f"⚠️ Not started: {e}", **hide}
        W.remember(ctx, output_name=cfg.output_name, dataset_config=cfg.dataset_config,
                   model_version=cfg.model_version)
        first = (f"Queued the caching first ({', '.join(j.id for j in queued)}); then " if queued else "")
        return {ui.run: gr.update(value=job.id), ui.command: job.cmdline, ui.timer: gr.Timer(active=True), **hide,
                ui.message: f"{first}Started **{job.id}** ({job.status}). The run keeps its resolved config in "
                            f"`{R.run_toml_path(cfg)}`."}

    hide = {ui.use_free: gr.update(visible=False), ui.overwrite_go: gr.update(visible=False)}
    start_out = [ui.run, ui.message, ui.command, ui.use_free, ui.overwrite_go, ui.free_name, ui.timer]

    gr.on([c.change for c in form_in], preview, form_in, [ui.command, ui.toml], api_name="train_preview",
          show_progress="hidden", trigger_mode="always_last")
    ctx.on_open(tab, "train", preview, form_in, [ui.command, ui.toml])
    lora_only, finetune_only = (ui.sections["Network"], ui.presets_lora), (ui.sections["Finetune"], ui.presets_ft)
    ui.kind.change(lambda k: {**{c: gr.update(visible=k == "train_network") for c in lora_only},
                              **{c: gr.update(visible=k == "train") for c in finetune_only}},
                   ui.kind, [*lora_only, *finetune_only], api_visibility="private")
    start_in = [ui.kind, ui.procs, ui.cache_first, *comps, ui.fsdp]
    ui.start.click(start, start_in, start_out, api_name="train_start")
    # the choice on a taken name: the proposed free name, or --overwrite; either then starts
    ui.use_free.click(lambda free: free, ui.free_name, ui.components["output_name"], api_visibility="private") \
        .then(start, start_in, start_out, api_visibility="private")
    ui.overwrite_go.click(lambda: True, None, ui.components["overwrite"], api_visibility="private") \
        .then(start, start_in, start_out, api_visibility="private")
    wire_files(ctx, ui, form_in, config)
    wire_defaults(ctx, tab, ui)
    wire_live(ctx, tab, ui, form_in)


def wire_files(ctx, ui, form_in, config) -> None:
    comps = form_in[2:]

    def save(path, kind, procs, *values):
        try:
            cfg = config(kind, values)
        except C.ConfigError as e:
            return f"⚠️ Not saved: {e}"
        if not (path or "").strip():
            return "⚠️ Not saved: type a file name into **Run TOML file** first."
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        C.save_toml(cfg, target)
        return f"Saved `{target}`."

    def load(path, kind):
        try:
            kind, cfg = R.load_run_toml((path or "").strip(), kind)
        except C.ConfigError as e:
            return {ui.message: f"⚠️ Not loaded: {e}"}
        return {**form_update(ui, kind, cfg), ui.message: f"Loaded `{path}` ({kind})."}

    ui.save.click(save, [ui.toml_path, *form_in], ui.message, api_name="train_save_toml")
    ui.load.click(load, [ui.toml_path, ui.kind], [ui.kind, *comps, ui.message], api_name="train_load_toml")


def wire_defaults(ctx, tab, ui) -> None:
    """The dataset decides the model version (and the demo's sample prompts for it); its cache status shows under
    the picker, with "Cache now". A dataset the Dataset tab offers ("Train on it") is taken when this tab opens."""
    c = ui.components
    dataset, version, prompts = c["dataset_config"], c["model_version"], c["sample_prompts"]
    demo_prompts = (ctx.demo or {}).get("sample_prompts") or {}

    def on_dataset(path, current_prompts):
        v = W.dataset_version(ctx, path)
        out = {version: v, ui.version_note: version_text(v),
               ui.dataset_status: W.cache_state(ctx, path, v)["text"]}
        if (current_prompts or "") in {*demo_prompts.values(), ""} and demo_prompts.get(v):
            out[prompts] = demo_prompts[v]          # the demo's prompts follow; the person's own stay
        return out

    dataset.change(on_dataset, [dataset, prompts], [version, ui.version_note, ui.dataset_status, prompts],
                   api_name="train_dataset")
    version.input(lambda v, p: {ui.version_note: version_text(v), ui.dataset_status: W.cache_state(ctx, p, v)["text"]},
                  [version, dataset], [ui.version_note, ui.dataset_status], api_visibility="private")

    def cache_now(path, v):
        if not path:
            return {ui.message: "⚠️ Pick a dataset first."}
        try:
            jobs = [ctx.submit_config(cmd, cfg, title=f"{cmd} {Path(path).name} ({v})")
                    for cmd, cfg in W.cache_configs(ctx, path, v)]
        except (C.ConfigError, EngineError) as e:
            return {ui.message: "⚠️ " + error_markdown(e)}
        return {ui.message: "Caching queued: " + ", ".join(f"**{j.id}**" for j in jobs) +
                            " (progress in the Cache and Jobs tabs); the status above updates when it ends.",
                ui.timer: gr.Timer(active=True)}

    ui.cache_now.click(cache_now, [dataset, version], [ui.message, ui.timer], api_name="train_cache_now")

    def opened(current):
        offered = ctx.take("train.dataset_config")
        choices = W.dataset_choices(ctx)
        if offered is None:
            return gr.update(choices=choices)
        return gr.update(choices=choices, value=offered)

    ctx.on_open(tab, "train", opened, dataset, dataset)


def wire_live(ctx, tab, ui, form_in) -> None:
    jobs = ctx.jobs
    ctx.register_timer("train", ui.timer, lambda: bool(busy_jobs(ctx)))

    def refresh(run_id, seen, dataset, version):
        seen = seen if isinstance(seen, dict) else {}
        everything = jobs.list()
        busy = busy_jobs(ctx, everything)
        views = [v for v in everything if R.is_train_job(v)]
        choices = [(f"{v['id']} ({v['status']})", v["id"]) for v in views]
        newest = views[0]["id"] if views else None
        if seen.get("newest") and newest != seen["newest"]:
            run_id = newest                  # a run started since the last tick (here or in another browser)
        elif run_id not in {v["id"] for v in views}:
            run_id = R.default_run(views)
        view = jobs.get(run_id) if run_id else None
        ckpts, states = (R.checkpoints(view), R.states(view)) if view else ([], [])
        sig = repr((choices, run_id, len(view["metrics"]) if view else 0, view and view["samples"], ckpts, states,
                    busy))
        out = {ui.status: R.status_markdown(view), ui.progress: progress_html(view, heading=False),
               ui.gauge: gauge_html(view, "train"), ui.seen: {"sig": sig, "newest": newest},
               ui.timer: gr.Timer(active=bool(busy))}         # the last tick after the end shows the final state
        if sig != seen.get("sig"):        # menus, chart and gallery are resent only when they changed
            out[ui.dataset_status] = W.cache_state(ctx, dataset, version)["text"]
            frame = loss_frame(view["metrics"]) if view else None
            out.update({ui.run: gr.update(choices=choices, value=run_id),
                        ui.loss: gr.update(value=frame, visible=frame is not None and len(frame) > 0),
                        ui.samples: [(viewable(ctx, p), Path(p).name) for p in (view or {}).get("samples") or []
                                     if Path(p).exists()],
                        ui.ckpt: gr.update(choices=ckpts, value=ckpts[-1] if ckpts else None),
                        ui.state: gr.update(choices=states, value=states[-1] if states else None)})
        return out

    outputs = [ui.run, ui.loss, ui.samples, ui.ckpt, ui.state, ui.status, ui.progress, ui.gauge, ui.seen, ui.timer,
               ui.dataset_status]
    here = [ui.components["dataset_config"], ui.components["model_version"]]
    ui.timer.tick(refresh, [ui.run, ui.seen, *here], outputs, show_progress="hidden", concurrency_limit=None,
                  api_name="train_refresh")
    ui.run.input(refresh, [ui.run, gr.State({}), *here], outputs, show_progress="hidden", api_visibility="private")
    ctx.on_open(tab, "train", refresh, [ui.run, gr.State({}), *here], outputs)

    def act(fn, run_id, done):
        if not run_id:
            return "No training run selected."
        return f"`{run_id}`: {done}; status now **{fn(run_id)['status']}**."

    ui.stop.click(lambda r: act(jobs.stop, r, "asked to stop (it saves first)"), ui.run, ui.run_message,
                  api_name="train_stop")
    ui.kill.click(lambda r: act(jobs.kill, r, "killed"), ui.run, ui.run_message, api_name="train_kill")

    def use(run_id, path):
        view = jobs.get(run_id) if run_id else None
        if not path or view is None:
            return "Pick a checkpoint of a run first."
        if not Path(path).exists():
            return f"⚠️ `{path}` does not exist (any more)."
        key = R.handoff_key(view["command"])
        ctx.hand_off(key, path)
        what = "LoRA" if key.endswith("lora_weight") else "DiT"
        return f"The Generate tab will use `{Path(path).name}` as its {what} when you open it."

    ui.use.click(use, [ui.run, ui.ckpt], ui.run_message, api_name="train_use_in_generate")

    def resume(run_id, state):
        view = jobs.get(run_id) if run_id else None
        if view is None or not state:
            return {ui.run_message: "Pick a run and one of its saved states first."}
        kind = view["command"]
        run_toml = naming.run_toml(R.arg_value(view["argv"], "output_dir"), R.arg_value(view["argv"], "output_name"))
        try:
            cfg = C.load_toml(R.KINDS[kind], run_toml)
        except C.ConfigError as e:
            return {ui.run_message: f"⚠️ Cannot read the run's config: {e}"}
        cfg.resume = state
        return {**form_update(ui, kind, cfg),
                ui.run_message: f"Loaded `{run_toml}` with `--resume {state}`. Check the options, then "
                                "**Start training**."}

    ui.resume.click(resume, [ui.run, ui.state], [ui.kind, *form_in[2:], ui.run_message], api_name="train_resume")


def busy_jobs(ctx, views: list[dict] | None = None) -> list[str]:
    """Trainings and cachings not ended yet: what this tab's timer follows."""
    views = ctx.jobs.list() if views is None else views
    return [v["id"] for v in views if v["status"] not in FINAL and
            (R.is_train_job(v) or v["command"] in ("cache_latents", "cache_text_encoder_outputs"))]


def form_update(ui, kind: str, cfg) -> dict:
    """The kind radio and every widget of that kind's form, set to `cfg` (the other kind's widgets keep theirs)."""
    form = ui.forms[kind]
    return {ui.kind: kind, **dict(zip(form.inputs, form.values(cfg)))}


def viewable(ctx, path: str):
    """Gradio serves files from the data dir only (launch's allowed_paths); an image elsewhere is sent as pixels."""
    if Path(path).resolve().is_relative_to(Path(ctx.data_dir).resolve()):
        return path
    with Image.open(path) as im:
        return im.copy()
