"""Generate / Edit tab: text-to-image and image editing through `python -m engine generate_image`.

The form is GenerateImageConfig (app/forms.py), in sections: essentials open, the rest folded. Control images are
image inputs; control image 1 is a painter whose white-brush layer is the inpaint mask (its alpha, not a diff of
the composite). A run copies the images into `<data_dir>/generate/inputs/<run>/`, pre-checks what it can without
torch (engine/spec/checks.py's own checks), then goes through the job manager, so it outlives a browser
refresh: the timer follows the newest generate job and rebuilds progress, the newest live preview
(--preview_every), results, errors and the RCM view from its event log (app/generate_media.py). VRAM preset cards
and the live estimate come from app/presets_ui.py.
"""

from __future__ import annotations

import dataclasses
import random
import secrets
import time
from pathlib import Path

import gradio as gr
from PIL import Image

from app import mask_painter, presets_ui
from app import generate_media as M
from app import workflow as W
from app.forms import Form, gui_fields, make_widget, to_widget
from app.jobs import FINAL
from app.generate_view import run_view
from app.places import allowed_roots, is_allowed
from app.tabs.tools import inspect_markdown
from app.views import error_markdown, progress_html, shown_error
from engine.spec import checks
from engine.spec import config as C
from engine.spec.errors import EngineError
from engine.spec.jobs import jobs_from_config
from engine.spec.variants import get_variant

PREFIX = "generate"
IMAGE_FIELDS = ("control_image_path", "mask_path")      # filled from the image inputs, not typed
# what shows open, in order: prompt, the control image + mask, size and steps; the rest is folded
OPEN_FIELDS = ("image_size", "infer_steps", "seed", "model_version")
RCM_FIELDS = ("rcm_threshold", "rcm_relative_threshold", "rcm_kernel_size", "rcm_dilate_size", "rcm_debug_save")
EDIT_FIELDS = ("resize_control_to_image_size", "resize_control_to_official_size", "append_original_name")
LORA_FIELDS = ("lora_weight", "lora_multiplier")
MEMORY_FIELDS = ("fp8", "fp8_scaled", "text_encoder_cpu", "blocks_to_swap", "vae_enable_tiling")
MODEL_FIELDS = ("dit", "vae", "text_encoder", "tokenizer")
EXTRA_CONTROLS = 2          # image slots after the painter; more go in the file box (Edit-2509/2511)
# the result widgets each event writes, in the order its API endpoint returns them
RUN_OUTPUTS = ("job", "cmdline", "error", "note", "seen", "status", "strip", "heatmap", "rcm_md", "preview", "timer")
REFRESH_OUTPUTS = ("job", "status", "cmdline", "error", "note", "gallery", "selected", "strip", "heatmap", "rcm_md",
                   "preview", "seen", "timer")
POLL_S = 1.0


def form_fields() -> list[str]:
    """The form's option names in input order (what the run / load endpoints take first)."""
    return [f.name for f in gui_fields(C.GenerateImageConfig, exclude=IMAGE_FIELDS)]


def defaults(ctx) -> C.GenerateImageConfig:
    """The form's first values. The model boxes stay empty: they follow the Models tab (app/workflow.fill_models)."""
    version = "edit" if ctx.demo else "original"
    cfg = C.GenerateImageConfig(model_version=version, save_path=str(ctx.data_dir / "outputs" / "generate"))
    if ctx.demo:   # the demo works out of the box: its edit example, tiny size, few steps
        ex = ctx.demo["examples"]
        cfg = dataclasses.replace(cfg, prompt=ex["edit_prompt"], image_size=[ex["height"], ex["width"]],
                                  infer_steps=8, seed=ex["seed"], preview_every=2)   # a tiny VAE decode: cheap
    return cfg


def build(ctx) -> None:
    cfg = defaults(ctx)
    parts: dict = {}
    with gr.Tab("Generate / Edit", id="generate") as tab:
        with gr.Row():
            with gr.Column(scale=3):
                parts.update(_widgets(cfg, ("prompt",)))
                parts["prompt"].lines = 3
                with gr.Column(visible=get_variant(cfg.resolved_version()).is_edit,
                               elem_id=f"{PREFIX}-controls") as controls_box:
                    w = control_widgets(ctx)
                parts.update(_widgets(cfg, OPEN_FIELDS, columns=4))
                with gr.Row():
                    random_btn = gr.Button("Random seed", size="sm", elem_id=f"{PREFIX}-seed-random")
                    reuse_btn = gr.Button("Reuse the selected result's seed", size="sm",
                                          elem_id=f"{PREFIX}-seed-reuse")
                conflicts = gr.Markdown(elem_id=f"{PREFIX}-conflicts")
                with gr.Accordion("RCM: keep what the prompt does not change (edit models)", open=False,
                                  elem_id=f"{PREFIX}-rcm-options"):
                    parts.update(_widgets(cfg, RCM_FIELDS))
                    parts.update(_widgets(cfg, EDIT_FIELDS))
                with gr.Accordion("LoRA", open=False, elem_id=f"{PREFIX}-lora"):
                    parts.update(_widgets(cfg, LORA_FIELDS, columns=2))
                    lora_info = gr.Markdown(elem_id=f"{PREFIX}-lora-summary")     # the Tools tab's LoRA summary
                    parts["lora_weight"].change(lambda t: inspect_markdown(t, empty=""), parts["lora_weight"],
                                                lora_info, api_visibility="private")
                with gr.Accordion("Memory and VRAM presets", open=False, elem_id=f"{PREFIX}-memory"):
                    parts.update(_widgets(cfg, MEMORY_FIELDS))
                    presets_slot = gr.Column()
                with gr.Accordion("Models (override)", open=False, elem_id=f"{PREFIX}-models"):
                    gr.Markdown("Empty boxes use the Models tab's files (the DiT of the model version above).")
                    parts.update(_widgets(cfg, MODEL_FIELDS, columns=2))
                rest = [n for n in form_fields() if n not in parts]
                with gr.Accordion("More options", open=False, elem_id=f"{PREFIX}-more"):
                    parts.update(_widgets(cfg, rest))
                form = Form(C.GenerateImageConfig, {n: parts[n] for n in form_fields()})
                with presets_slot:
                    presets_ui.build("generate_image", form, elem_prefix=PREFIX,
                                     blocks=lambda c: W.dit_blocks(W.fill_models(ctx, c).dit))
            with gr.Column(scale=2):
                out = result_widgets()
                out["tab"] = tab
        w["conflicts"] = conflicts
        _wire(ctx, form, w, out, controls_box, random_btn, reuse_btn)
        wire_handoffs(ctx, tab, parts)
        ctx.register_timer("generate", out["timer"], lambda: bool(busy_jobs(ctx)))


def _widgets(cfg, names, columns: int = 3) -> dict:
    """The option widgets of `names` (in the config's order) in rows, without group headings."""
    fs = gui_fields(C.GenerateImageConfig, include=names)
    made = {}
    for i in range(0, len(fs), columns):
        with gr.Row():
            for f in fs[i:i + columns]:
                made[f.name] = make_widget(f, getattr(cfg, f.name), PREFIX)
    return made


def busy_jobs(ctx, views: list[dict] | None = None) -> list[str]:
    views = ctx.jobs.list() if views is None else views
    return [v["id"] for v in views if v["command"] == "generate_image" and v["status"] not in FINAL]


def wire_handoffs(ctx, tab, parts: dict) -> None:
    """A checkpoint the Train tab offers ("use in Generate") lands in the form when this tab opens: a LoRA
    replaces the LoRA list (multiplier 1), a finetuned DiT replaces the DiT path."""
    names = ("lora_weight", "lora_multiplier", "dit")
    by_name = {f.name: f for f in gui_fields(C.GenerateImageConfig, include=names)}

    def opened():
        lora, dit = ctx.take("generate.lora_weight"), ctx.take("generate.dit")
        out = {}
        if lora is not None:
            out[parts["lora_weight"]] = to_widget(by_name["lora_weight"], [lora])
            out[parts["lora_multiplier"]] = to_widget(by_name["lora_multiplier"], [1.0])
        if dit is not None:
            out[parts["dit"]] = dit
        return out or gr.skip()

    tab.select(opened, None, [parts[n] for n in names], api_name="generate_opened")


def control_widgets(ctx) -> dict:
    example = ctx.demo["examples"]["control"] if ctx.demo else None
    w = {"editor": mask_painter.editor(
        "Control image 1 — paint the mask (white = change)", f"{PREFIX}-control1",
        value={"background": example, "layers": [], "composite": example} if example else None,
        small_picture=bool(example))}
    with gr.Row():
        w["grow"] = gr.Slider(-32, 32, value=0, step=1, label="Grow (+) / shrink (−) mask, px",
                              elem_id=f"{PREFIX}-mask-grow")
        w["feather"] = gr.Slider(0, 32, value=0, step=0.5, label="Feather, px", elem_id=f"{PREFIX}-mask-feather")
        w["invert"] = gr.Checkbox(False, label="Invert mask", elem_id=f"{PREFIX}-mask-invert")
        w["clear"] = gr.Button("Clear mask", size="sm", elem_id=f"{PREFIX}-mask-clear")
    w["mask_info"] = gr.Markdown(elem_id=f"{PREFIX}-mask-info")
    with gr.Accordion("Effective mask, and more control images (Edit-2509/2511)", open=False,
                      elem_id=f"{PREFIX}-more-images"):
        w["preview"] = gr.Image(label="Effective mask (what --mask_path gets)", interactive=False, height=200,
                                image_mode="L", format="png", elem_id=f"{PREFIX}-mask-preview")
        with gr.Row():
            w["slots"] = [gr.Image(type="filepath", label=f"Control image {i + 2}", sources=("upload", "clipboard"),
                                   elem_id=f"{PREFIX}-control{i + 2}") for i in range(EXTRA_CONTROLS)]
        w["more"] = gr.File(file_count="multiple", file_types=["image"], label="More control images",
                            elem_id=f"{PREFIX}-more-controls")
    return w


def result_widgets() -> dict:
    o = {}
    with gr.Row():
        o["run"] = gr.Button("Generate", variant="primary", elem_id=f"{PREFIX}-run", scale=3)
        o["stop"] = gr.Button("Stop", elem_id=f"{PREFIX}-stop", scale=1)
    o["note"] = gr.Markdown(elem_id=f"{PREFIX}-note")
    o["error"] = gr.Markdown(visible=False, elem_id=f"{PREFIX}-error")
    o["status"] = gr.HTML(elem_id=f"{PREFIX}-status")
    o["preview"] = gr.Image(label="Live preview (set Preview every)", interactive=False, format="png", height=200,
                            elem_id=f"{PREFIX}-preview")
    o["gallery"] = gr.Gallery(label="Results since the Studio started (newest first)", columns=3, height=300,
                              format="png", elem_id=f"{PREFIX}-gallery")
    o["selected"] = gr.Textbox(label="Selected result", interactive=False, elem_id=f"{PREFIX}-selected")
    with gr.Row():
        o["send"] = gr.Button("Send to control image 1", size="sm", elem_id=f"{PREFIX}-send")
        o["load_sel"] = gr.Button("Load its parameters", size="sm", elem_id=f"{PREFIX}-load-selected")
    with gr.Accordion("Job, command line, PNG parameters", open=False, elem_id=f"{PREFIX}-job-box"):
        o["job"] = gr.Textbox(label="Job", interactive=False, elem_id=f"{PREFIX}-job")
        o["cmdline"] = gr.Textbox(label="Command line (exactly what runs)", interactive=False, buttons=["copy"],
                                  elem_id=f"{PREFIX}-command")
        o["png"] = gr.File(label="Drop a PNG to load its parameters", file_types=[".png"], elem_id=f"{PREFIX}-png")
    with gr.Accordion("RCM / mask view", open=True, elem_id=f"{PREFIX}-rcm"):
        o["strip"] = gr.Gallery(label="RCM mask per step (red = still changing)", columns=8, height=160,
                                format="png", elem_id=f"{PREFIX}-rcm-strip")
        o["heatmap"] = gr.Image(label="|output − control 1|", interactive=False, format="png", height=200,
                                elem_id=f"{PREFIX}-heatmap")
        o["rcm_md"] = gr.Markdown(elem_id=f"{PREFIX}-rcm-stats")
    o["seen"] = gr.State("")
    o["timer"] = gr.Timer(POLL_S, active=False)      # on only while a job runs and this tab is shown (app/main.py)
    return o


# ---------------------------------------------------------------------------------------------- wiring

def _wire(ctx, form: Form, w: dict, o: dict, controls_box, random_btn, reuse_btn) -> None:
    shown: set[str] = set()          # result paths this tab handed out: the only ones it reads back
    _wire_run(ctx, form, w, o, shown)
    _wire_results(ctx, form, w, o, shown, random_btn, reuse_btn)
    _wire_mask_and_model(ctx, form, w, controls_box)


def _wire_run(ctx, form: Form, w: dict, o: dict, shown: set) -> None:
    """Generate, and the timer that follows the job (progress, results, errors, RCM view)."""
    image_inputs = [w["editor"], *w["slots"], w["more"], w["grow"], w["feather"], w["invert"]]
    n = len(form.inputs)

    def run(*values):
        try:
            cfg = W.fill_models(ctx, form.to_config(*values[:n]))     # empty model boxes: the Models tab's
            cfg = attach_images(ctx, cfg, *values[n:])
            precheck(cfg)
            job = ctx.submit_config("generate_image", cfg, title=title_of(cfg))
        except (C.ConfigError, EngineError, M.MaskError, ValueError, OSError) as e:
            # the previous job's bar goes too: beside a new error it would read as this run's result
            return {o["error"]: error_update(e), o["note"]: "Not started.", o["status"]: ""}
        # this job's view replaces the previous one; the results gallery keeps every result since launch
        return {o["job"]: job.id, o["cmdline"]: job.cmdline, o["error"]: gr.update(visible=False, value=""),
                o["note"]: f"Queued **{job.id}**.", o["seen"]: "", o["status"]: "<b>queued</b>",
                o["strip"]: [], o["heatmap"]: None, o["rcm_md"]: "", o["preview"]: None,
                o["timer"]: gr.Timer(active=True)}

    o["run"].click(run, [*form.inputs, *image_inputs], [o[k] for k in RUN_OUTPUTS], api_name="generate_run")

    def refresh(job_id, seen):
        # the job box is written only when it was empty (a fresh page follows the newest job): a tick that
        # started before "Generate" answered must not put the previous job back
        picked = job_id or latest_job(ctx)
        view = ctx.jobs.get(picked) if picked else None
        busy = busy_jobs(ctx)
        if view is None:
            return {o["timer"]: gr.Timer(active=bool(busy))}
        sig = repr((view["id"], view["status"], view.get("progress"), len(view.get("images") or []), view["error"]))
        if sig == seen:
            return {o["timer"]: gr.Timer(active=bool(busy))}
        v = run_view(ctx, view)
        results = history(ctx)
        shown.update(results)
        err = shown_error(view)
        out = {o["status"]: progress_html(view, v.memory), o["cmdline"]: view["cmdline"],
               o["error"]: error_update(err) if err else gr.update(visible=False, value=""),
               o["note"]: note_for(view),
               o["gallery"]: [(servable(ctx, p), Path(p).name) for p in results],
               o["selected"]: v.outputs[0] if v.outputs else (results[0] if results else ""), o["strip"]: v.strip,
               o["heatmap"]: v.heatmap, o["rcm_md"]: v.markdown, o["preview"]: preview_update(ctx, v.preview),
               o["seen"]: sig, o["timer"]: gr.Timer(active=bool(busy))}
        if not job_id:
            out[o["job"]] = view["id"]
        return out

    o["timer"].tick(refresh, [o["job"], o["seen"]], [o[k] for k in REFRESH_OUTPUTS], show_progress="hidden",
                    concurrency_limit=None, api_name="generate_refresh")
    ctx.on_open(o["tab"], "generate", refresh, [o["job"], o["seen"]], [o[k] for k in REFRESH_OUTPUTS])

    def stop(job_id):
        if not job_id:
            return "No job to stop."
        return f"**{job_id}**: {ctx.jobs.stop(job_id)['status']}."

    o["stop"].click(stop, o["job"], o["note"], api_name="generate_stop")


def note_for(view: dict) -> str:
    """The line under Generate: what the shown job is doing now (never "Queued" once it has ended)."""
    if view["status"] == "queued":
        return f"Queued **{view['id']}**."
    if view["status"] == "running":
        return f"Running **{view['id']}**."
    return f"**{view['id']}**: {view['status']}."


def history(ctx) -> list[str]:
    """Every result of the generate jobs since the Studio started, newest first (files still there)."""
    out = []
    for v in ctx.jobs.list():
        if v["command"] != "generate_image" or (v["queued_at"] or 0) < ctx.started:
            continue
        out += [p for p in reversed(M.read_run(ctx.jobs.log_path(v["id"])).outputs) if Path(p).is_file()]
    return out


def _wire_results(ctx, form: Form, w: dict, o: dict, shown: set, random_btn, reuse_btn) -> None:
    """What can be done with a result: pick it, send it to control 1, load its parameters, reuse its seed."""
    o["gallery"].select(_select_handler(shown), o["selected"], o["selected"], api_visibility="private")

    def send(path):
        _check_shown(path, shown)
        return {"background": servable(ctx, path), "layers": [], "composite": servable(ctx, path)}

    o["send"].click(send, o["selected"], w["editor"], api_name="generate_send_to_control")

    load_outputs = [*form.inputs, w["editor"], *w["slots"], w["more"], w["grow"], w["feather"], w["invert"],
                    o["note"]]

    def load(path, *values):
        try:
            return load_parameters(ctx, form, w, o["note"], path, values)
        except (C.ConfigError, ValueError, OSError) as e:
            return {o["note"]: f"⚠️ Could not load parameters: {e}"}

    o["png"].upload(load, [o["png"], *form.inputs], load_outputs, api_name="generate_load_params")
    o["load_sel"].click(lambda p, *v: load(_check_shown(p, shown), *v), [o["selected"], *form.inputs],
                        load_outputs, api_name="generate_load_selected_params")
    # the seed box is text (empty = random in the engine); a number here makes the command line reproducible
    random_btn.click(lambda: str(random.randint(0, 2**32 - 1)), None, form.components["seed"],
                     api_name="generate_seed_random")
    reuse_btn.click(lambda p: str(M.read_png_parameters(_check_shown(p, shown))["seed"]), o["selected"],
                    form.components["seed"], api_name="generate_seed_reuse")


def _wire_mask_and_model(ctx, form: Form, w: dict, controls_box) -> None:
    c = form.components
    preview_inputs = [w["editor"], w["grow"], w["feather"], w["invert"]]
    option_inputs = [c["rcm_threshold"], c["rcm_debug_save"], c["model_version"]]
    # painting fires the editor's `input` only; `change` covers values set by buttons (send, load, clear). One
    # handler draws the mask and names the conflicts: a second listener on the painter loses its layers.
    gr.on([w["editor"].input, *[x.change for x in [*preview_inputs, *option_inputs]]], mask_and_conflicts,
          [*preview_inputs, *option_inputs], [w["preview"], w["mask_info"], w["conflicts"]],
          trigger_mode="always_last", show_progress="hidden", api_name="generate_mask_preview")
    w["clear"].click(lambda e: {"background": e["background"], "layers": [], "composite": e["background"]}
                     if e and e.get("background") else None, w["editor"], w["editor"],
                     api_name="generate_mask_clear")

    def version_changed(version):
        return gr.update(visible=get_variant(version or "original").is_edit)

    form.components["model_version"].change(version_changed, form.components["model_version"], controls_box,
                                            api_name="generate_version")


def _select_handler(shown: set):
    def select(selected, evt: gr.SelectData):
        value = evt.value or {}
        path = (value.get("image") or {}).get("path") if isinstance(value, dict) else None
        caption = value.get("caption") if isinstance(value, dict) else None
        match = [p for p in shown if Path(p).name == caption]
        return match[0] if match else (path if path in shown else selected)
    return select


def _check_shown(path: str, shown: set) -> str:
    if not path or path not in shown:
        raise gr.Error("Pick one of the results shown in the gallery first.")
    return path


# ---------------------------------------------------------------------------------------------- run helpers

def attach_images(ctx, cfg, editor, *rest):
    """The config with the control images (copied into a run folder) and the painted mask (as a PNG file).
    Images are used with edit models only; for text-to-image the control section is hidden and ignored."""
    *slots, more, grow, feather, invert = rest
    if not get_variant(cfg.resolved_version()).is_edit:
        return cfg
    editor = editor or {}
    sources = [editor.get("background"), *slots, *(more or [])]
    folder = ctx.data_dir / "generate" / "inputs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    controls = [str(M.save_control(p, folder, i + 1)) for i, p in enumerate(s for s in sources if s)]
    mask = M.painted_mask(editor.get("background"), editor.get("layers"))
    mask_path = None
    if mask is not None:
        mask_path = str(M.save_png(M.refine_mask(mask, grow, feather, invert), folder / "mask.png"))
    return dataclasses.replace(cfg, control_image_path=controls, mask_path=mask_path)


def precheck(cfg) -> None:
    """What can be refused in milliseconds, without torch: the engine's own pre-load checks
    (engine/spec/checks.py); the engine runs them again, with the DiT header check, before it loads a model."""
    checks.check_run_files(cfg)
    if not cfg.latent_path:
        checks.check_run_jobs(cfg, jobs_from_config(cfg), get_variant(cfg.resolved_version()))


def title_of(cfg) -> str:
    text = (cfg.prompt or "").strip().replace("\n", " ")
    return f"generate ({cfg.resolved_version()}): {text[:40]}"


def error_update(err):
    """The error panel: the engine's message and hint, or a pre-check's."""
    return gr.update(visible=True, value="⚠️ " + error_markdown(err))


def preview_update(ctx, preview: tuple[str, str] | None):
    """The newest preview with its step, or an empty box (a run without previews, or none written yet)."""
    if preview is None:
        return gr.update(value=None, label="Live preview (set Preview every)")
    return gr.update(value=servable(ctx, preview[0]), label=preview[1])


def latest_job(ctx) -> str | None:
    return next((v["id"] for v in ctx.jobs.list() if v["command"] == "generate_image"), None)


def servable(ctx, path: str):
    """Gradio serves files under the data dir; anything else is handed over as a picture."""
    if Path(path).resolve().is_relative_to(ctx.data_dir.resolve()):
        return path
    with Image.open(path) as im:
        return im.copy()


def mask_and_conflicts(editor, grow, feather, invert, rcm_threshold, rcm_debug_save, version):
    """The effective mask with its share, and what the engine would refuse or ignore (app/workflow.py)."""
    mask, info = mask_preview(editor, grow, feather, invert)
    found = W.generate_conflicts(mask is not None, rcm_threshold, rcm_debug_save,
                                 get_variant(version or "original").is_edit)
    return mask, info, "\n\n".join(f"⚠️ {t}" for t in found)


def mask_preview(editor, grow, feather, invert):
    if not editor or not editor.get("background"):
        return None, "Upload control image 1 to paint a mask on it."
    try:
        mask = M.painted_mask(editor["background"], editor.get("layers"))
    except M.MaskError as e:
        return None, f"⚠️ {e}"
    if mask is None:
        return None, "No mask painted: the whole image may change (paint white where it should)."
    mask = M.refine_mask(mask, grow, feather, invert)
    share = sum(mask.getdata()) / (255 * mask.width * mask.height) * 100
    return mask, f"Mask {mask.width}×{mask.height}: {share:.1f}% of the image may change."


def load_parameters(ctx, form: Form, w: dict, note_box, path: str, values) -> dict:
    """A PNG's `parameters` chunk into the form, through the typed config (unknown or mistyped keys are refused):
    the new value of each form field, of the control images and mask controls, and a note."""
    if not path:
        raise ValueError("no file")
    roots = allowed_roots(ctx)
    if not is_allowed(path, roots):
        raise ValueError(f"{Path(path).name} is not in the app's folders (drop the PNG on the page instead)")
    params = M.read_png_parameters(path)
    base = C.to_dict(form.to_config(*values), only_changed=False)
    cfg = C.from_dict(C.GenerateImageConfig, {**base, **params}, source=Path(path).name)
    C.validate(cfg)
    # a PNG names files; only those in an allowed place (app/places.py: the data dir, where a run copies its
    # control images) are loaded, so a crafted PNG cannot pull an arbitrary file into the page
    controls = [p for p in cfg.control_image_path if is_allowed(p, roots) and Path(p).is_file()]
    missing = [p for p in cfg.control_image_path if p not in controls]
    editor = None
    if controls:
        layers = []
        if cfg.mask_path and is_allowed(cfg.mask_path, roots) and Path(cfg.mask_path).is_file():
            folder = ctx.data_dir / "generate" / "inputs" / f"loaded-{secrets.token_hex(3)}"
            layers = [str(M.save_png(M.mask_layer(cfg.mask_path), folder / "mask_layer.png"))]
        editor = {"background": controls[0], "layers": layers, "composite": controls[0]}
    slots = [controls[i + 1] if len(controls) > i + 1 else None for i in range(EXTRA_CONTROLS)]
    more = controls[1 + EXTRA_CONTROLS:] or None
    note = f"Loaded the parameters of **{Path(path).name}** (seed {cfg.seed})."
    if missing:
        note += (" Not loaded (moved, deleted or outside the app's folders): "
                 + ", ".join(f"`{Path(p).name}`" for p in missing))
    return {**dict(zip(form.inputs, form.values(cfg))), w["editor"]: editor, **dict(zip(w["slots"], slots)),
            w["more"]: more, w["grow"]: 0, w["feather"]: 0, w["invert"]: False, note_box: note}
