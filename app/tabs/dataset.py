"""Dataset tab: import a folder of images (+ captions, + control images for edit models) as a musubi-tuner
dataset config, look through it (gallery, control | target pairs), edit captions, check it, save the TOML.

The dataset config's TOML text is the one state everything works from: Import writes it from the form, Open
reads it from a file, the box shows it (and may be edited), Check / the gallery / caption saves read it through
the engine's own schema, and Save writes exactly that text. The user's files are only read; a caption is written
only by "Save caption", after its previous text is backed up (app/dataset_files.py).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from app import caption_panel
from app import dataset_files as F
from app import dataset_masks
from app import workflow as W
from app.forms import build_form
from app.places import PlaceError, dataset_config_file
from app.views import error_markdown
from engine.spec.config import CheckDatasetConfig
from engine.spec.errors import DatasetError

PROBLEM_HEADERS = ["level", "file", "problem", "fix"]
# what the dataset view and the item view write, in the order their API endpoints return them
VIEW_OUTPUTS = ("toml", "save_path", "message", "summary", "problems", "histogram", "pick", "gallery", "stems")
ITEM_OUTPUTS = ("stem", "caption", "target", "controls", "info")
GALLERY_MAX = 400        # thumbnails shown at once; any image is reachable by typing its name
RECENT_MAX = 20


def build(ctx) -> None:
    d = _defaults(ctx)
    with gr.Tab("Dataset", id="dataset"):
        gr.Markdown("Import a folder of training images. Captions are `<image name>.txt` next to each image; edit "
                    "models also need control images (`<name>.png` or `<name>_0.png`, `<name>_1.png` ... in a control "
                    "folder; several folders with the same file names work too). **Your files are only read**: "
                    "the dataset config points at them, and captions change only when you press *Save caption*.")
        with gr.Accordion("Import a folder", open=True):
            with gr.Row():
                folder = gr.Textbox(label="Image folder (targets + captions, or a dataset folder holding images/)",
                                    value=d["folder"], elem_id="dataset-folder", scale=2)
                controls = gr.Textbox(label="Control folder(s) for edit models, one per line (empty: look for "
                                      "control*/ folders)", value=d["controls"], lines=2, elem_id="dataset-controls",
                                      scale=2)
                name = gr.Textbox(label="Dataset name", value=d["name"], elem_id="dataset-name", scale=1)
            version = build_form(CheckDatasetConfig, include=["model_version"], values=d["version_cfg"],
                                 elem_prefix="dataset").inputs[0]
            with gr.Row():
                width = gr.Number(label="Resolution width", value=d["resolution"][0], precision=0,
                                  elem_id="dataset-width")
                height = gr.Number(label="Resolution height", value=d["resolution"][1], precision=0,
                                   elem_id="dataset-height")
                caption_ext = gr.Textbox(label="Caption extension", value=".txt", elem_id="dataset-caption-ext")
                batch = gr.Number(label="Batch size", value=1, precision=0, minimum=1, elem_id="dataset-batch")
                repeats = gr.Number(label="Repeats", value=1, precision=0, minimum=1, elem_id="dataset-repeats")
            with gr.Row():
                bucket = gr.Checkbox(label="Aspect-ratio buckets (enable_bucket)", value=True)
                no_upscale = gr.Checkbox(label="Never upscale (bucket_no_upscale)", value=False)
                allow_missing = gr.Checkbox(label="Skip images without captions (allow_missing_captions)",
                                            value=False)
                cache_dir = gr.Textbox(label="Cache folder (empty: in the Studio's data folder)", value="",
                                       elem_id="dataset-cache-dir", scale=2)
            import_btn = gr.Button("Import", variant="primary", elem_id="dataset-import")
            gr.Markdown("Then **Train on it** (or **Cache it**): the config is saved and the Train (Cache) tab opens "
                        "with it and its model version.")
        with gr.Accordion("Open an existing dataset config", open=False):
            with gr.Row():
                open_path = gr.Textbox(label="Dataset config (.toml)", value=d["open"], elem_id="dataset-open-path",
                                       scale=4)
                open_btn = gr.Button("Open", elem_id="dataset-open", scale=1)
        message = gr.Markdown(elem_id="dataset-message")
        with gr.Row():
            with gr.Column(scale=3):
                toml = gr.Code(label="Dataset config (musubi-tuner TOML): exactly what Save writes", language=None,
                               interactive=True, lines=14, max_lines=30, buttons=["copy"], elem_id="dataset-toml")
                with gr.Row():
                    save_path = gr.Textbox(label="Save as", value=d["save_path"], elem_id="dataset-save-path",
                                           scale=4)
                    save_btn = gr.Button("Save dataset config", elem_id="dataset-save", scale=1)
                    check_btn = gr.Button("Check", elem_id="dataset-check", scale=1)
                with gr.Row():
                    cache_it = gr.Button("Cache it", elem_id="dataset-cache-it", scale=1)
                    train_it = gr.Button("Train on it", variant="primary", elem_id="dataset-train-on-it", scale=1)
            with gr.Column(scale=2):
                summary = gr.Markdown(elem_id="dataset-summary")
                histogram = gr.BarPlot(x="bucket", y="items", height=220, y_lim=[0, None], visible=False,
                                       label="Buckets (items × repeats)", elem_id="dataset-histogram")
        problems = gr.Dataframe(headers=PROBLEM_HEADERS, value=[], interactive=False, wrap=True,
                                column_widths=["8%", "32%", "32%", "28%"], label="Problems", elem_id="dataset-problems")
        pick = gr.Dropdown(label="Dataset", choices=[], value=None, elem_id="dataset-pick")
        gallery = gr.Gallery(label="Images (click one to see its pair and edit its caption)", columns=6, height=320,
                             allow_preview=False, elem_id="dataset-gallery")
        stems = gr.State([])
        with gr.Row(equal_height=True):
            control_view = gr.Gallery(label="Control image(s)", columns=2, height=300, object_fit="contain",
                                      allow_preview=False, fit_columns=False,
                                      elem_id="dataset-controls-view")
            target_view = gr.Image(label="Target", height=300, interactive=False, elem_id="dataset-target-view")
        with gr.Row():
            stem = gr.Textbox(label="Image (type a name + Enter to go to it)", elem_id="dataset-stem", scale=1)
            caption = gr.Textbox(label="Caption", lines=3, elem_id="dataset-caption", scale=4)
            save_caption_btn = gr.Button("Save caption", elem_id="dataset-save-caption", scale=1)
        item_info = gr.Markdown(elem_id="dataset-item-info")
        caption_panel.build(ctx, toml)      # captions written by the text encoder, reviewed before saving

        # the functions below return values by these names; `named` turns them into component updates
        ui = dict(toml=toml, save_path=save_path, message=message, summary=summary, problems=problems,
                  histogram=histogram, pick=pick, gallery=gallery, stems=stems, stem=stem, caption=caption,
                  target=target_view, controls=control_view, info=item_info)
        view = [ui[k] for k in VIEW_OUTPUTS]
        item = [ui[k] for k in ITEM_OUTPUTS]

        def named(values: dict) -> dict:
            return {ui[k]: v for k, v in values.items()}

        # Named functions: their parameter names are what the API page and gradio_client show.
        def dataset_import(image_folder, control_folders, name, model_version, width, height, caption_extension,
                           batch_size, num_repeats, enable_bucket, bucket_no_upscale, allow_missing_captions,
                           cache_directory):
            return named(import_folder(ctx, image_folder, control_folders, name, model_version, width, height,
                                       caption_extension, batch_size, num_repeats, enable_bucket, bucket_no_upscale,
                                       allow_missing_captions, cache_directory))

        def dataset_open(path, model_version):
            return named(open_config(ctx, path, model_version))

        def dataset_check(toml_text, save_as, model_version, dataset_index):
            return named(show(ctx, toml_text, save_as, model_version, dataset_index, "Checked."))

        def dataset_item(toml_text, save_as, dataset_index, image_stem):
            return named(show_item(ctx, toml_text, save_as, dataset_index, image_stem))

        def dataset_save_caption(toml_text, save_as, dataset_index, image_stem, caption_text):
            return named(save_caption(ctx, toml_text, save_as, dataset_index, image_stem, caption_text))

        def dataset_save(toml_text, save_as, model_version=None):
            return save_config(ctx, toml_text, save_as, model_version)

        def go(where):
            def save_and_go(toml_text, save_as, model_version):
                said = save_config(ctx, toml_text, save_as, model_version)
                ok = said.startswith("Saved")
                return {message: said, ctx.tabs: gr.Tabs(selected=where) if ok else gr.skip()}
            return save_and_go

        def select(names: list, toml_text: str, save_as: str, dataset_index, evt: gr.SelectData):
            stem_name = names[evt.index] if evt.index < len(names) else ""
            return named(show_item(ctx, toml_text, save_as, dataset_index, stem_name))

        import_inputs = [folder, controls, name, version, width, height, caption_ext, batch, repeats, bucket,
                         no_upscale, allow_missing, cache_dir]
        import_btn.click(dataset_import, import_inputs, view, api_name="dataset_import")
        open_btn.click(dataset_open, [open_path, version], view, api_name="dataset_open")
        check_btn.click(dataset_check, [toml, save_path, version, pick], view, api_name="dataset_check")
        pick.input(lambda t, p, v, i: named(show(ctx, t, p, v, i, "")), [toml, save_path, version, pick], view,
                   api_visibility="private")
        picked = gallery.select(select, [stems, toml, save_path, pick], item, api_visibility="private")
        typed = stem.submit(dataset_item, [toml, save_path, pick, stem], item, api_name="dataset_item")
        dataset_masks.build(ctx, toml, save_path, pick, stem, [picked, typed])
        save_caption_btn.click(dataset_save_caption, [toml, save_path, pick, stem, caption], [message, gallery],
                               api_name="dataset_save_caption")
        save_btn.click(dataset_save, [toml, save_path, version], message, api_name="dataset_save")
        for button, where in ((cache_it, "cache"), (train_it, "train")):
            ctx.go_to(button.click(go(where), [toml, save_path, version], [message, ctx.tabs],
                                   api_name=f"dataset_{where}_it"), where)
        # another image folder: its own control folders (none typed yet), its own name and model version
        folder.change(lambda f: folder_changed(ctx, f), folder, [controls, name, version], api_visibility="private",
                      trigger_mode="always_last")


def _defaults(ctx) -> dict:
    """Pre-fill: the person's last import (kept in settings.json), else the demo's edit dataset when the demo is
    in use, else empty boxes."""
    mine = W.last(ctx, "dataset_form")
    if mine:
        version = mine.get("version") or None
        return {"folder": mine.get("folder", ""), "controls": mine.get("controls", ""), "name": mine.get("name", ""),
                "version_cfg": CheckDatasetConfig(model_version=version),
                "resolution": tuple(mine.get("resolution") or (1024, 1024)),
                "open": W.last(ctx, "dataset_config") or "", "save_path": mine.get("save_path", "")}
    ds = (ctx.demo or {}).get("dataset") or {}
    demo = bool(ds)
    name = "demo_edit" if demo else ""
    return {"folder": ds.get("images", ""), "controls": ds.get("control", ""), "name": name,
            "version_cfg": CheckDatasetConfig(model_version="edit" if demo else None),
            "resolution": (64, 64) if demo else (1024, 1024),
            "open": ((ctx.demo or {}).get("dataset_config") or {}).get("edit", ""),
            "save_path": str(default_save_path(ctx, name)) if demo else ""}


def folder_changed(ctx, folder: str) -> dict:
    """A newly typed image folder: the control box is emptied (the old one belonged to the old folder), the name
    follows the folder, and the model version follows its layout (control folders found: an edit model)."""
    try:
        image_dir, found, _ = F.detect_layout(Path((folder or "").strip()))
    except DatasetError:
        return ["", gr.skip(), gr.skip()]
    return ["", F.safe_name(image_dir.name if image_dir.name not in F.TARGET_NAMES else image_dir.parent.name),
            "edit" if found else "original"]


def datasets_dir(ctx) -> Path:
    return ctx.data_dir / "datasets"


def default_save_path(ctx, name: str) -> Path:
    return datasets_dir(ctx) / f"{F.safe_name(name)}.toml"


def error_text(e: DatasetError) -> str:
    return error_markdown(e)


# ------------------------------------------------------------------------------------------ import / open

def import_folder(ctx, folder, controls, name, version, width, height, caption_ext, batch, repeats, bucket,
                  no_upscale, allow_missing, cache_dir):
    """Write the TOML text for a folder (nothing is saved yet) and show it checked."""
    try:
        text, save_as, notes = import_text(ctx, folder, controls, name, version, (width, height), caption_ext,
                                           batch, repeats, bucket, no_upscale, allow_missing, cache_dir)
    except DatasetError as e:
        return {"message": error_text(e), **_empty_view()}
    W.remember(ctx, dataset_form={"folder": folder, "controls": controls, "name": name, "version": version,
                                  "resolution": [width, height], "save_path": save_as})
    note = "Imported (not saved yet): check it, then press *Train on it*, *Cache it* or *Save dataset config*."
    if notes:
        note += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return show(ctx, text, save_as, version, 0, note, replace_text=True)


def import_text(ctx, folder, controls, name, version, resolution, caption_ext, batch, repeats, bucket, no_upscale,
                allow_missing, cache_dir) -> tuple[str, str, list[str]]:
    if not (folder or "").strip():
        raise DatasetError("no image folder given.", "Type the path of the folder with your training images.")
    image_dir, found, notes = F.detect_layout(Path(folder.strip()))
    name = F.safe_name(name or image_dir.name)
    control_dirs = [Path(line.strip()).expanduser() for line in (controls or "").splitlines() if line.strip()]
    edit = bool(version) and version != "original"
    if not control_dirs and edit and found:
        control_dirs = found[:1]
        notes.append(f"using `{found[0]}` as the control folder")
    for c in control_dirs:
        if not c.is_dir():
            raise DatasetError(f"{c}: control folder not found.", "Fix the path, or leave the box empty.")
    control_dir = None
    if len(control_dirs) == 1:
        control_dir = control_dirs[0].resolve()
    elif control_dirs:
        stems = sorted(p.stem for p in image_dir.iterdir() if p.is_file() and F.is_image(p))
        control_dir, missing = F.merged_control_folder([c.resolve() for c in control_dirs], stems,
                                                       datasets_dir(ctx) / name / "control")
        notes.append(f"{len(control_dirs)} control folders joined as links in `{control_dir}` "
                     f"(control image N of each target comes from folder N)")
        notes += missing
    cache = Path(cache_dir.strip()).expanduser() if (cache_dir or "").strip() else datasets_dir(ctx) / name / "cache"
    general = {"resolution": [int(resolution[0] or 1024), int(resolution[1] or 1024)],
               "caption_extension": (caption_ext or "").strip() or ".txt", "batch_size": int(batch or 1),
               "enable_bucket": bool(bucket), "bucket_no_upscale": bool(no_upscale)}
    if allow_missing:
        general["allow_missing_captions"] = True
    dataset = {"image_directory": str(image_dir.resolve()), "cache_directory": str(cache.resolve()),
               "num_repeats": int(repeats or 1), "control_directory": str(control_dir) if control_dir else None}
    return F.config_text(general, dataset), str(default_save_path(ctx, name)), notes


def open_config(ctx, path: str, version):
    """Open a dataset config: only a .toml of at most 1 MiB in an allowed place (app/places.py)."""
    try:
        path = dataset_config_file(ctx, path)
    except PlaceError as e:
        return {"message": error_text(e), **_empty_view()}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return {"message": error_text(DatasetError(f"{path}: cannot read the dataset config ({e}).", "Check the path.")),
                **_empty_view()}
    return show(ctx, text, str(path), version, 0, f"Opened `{path}`.", replace_text=True)


# ------------------------------------------------------------------------------------------ the view

def _empty_view() -> dict:
    return {"summary": "", "problems": [], "histogram": gr.update(visible=False),
            "pick": gr.update(choices=[], value=None), "gallery": [], "stems": []}


def show(ctx, text: str, save_as: str, version, index, note: str, replace_text: bool = False) -> dict:
    """Check the text and fill the report, histogram and gallery of datasets[index] (by VIEW_OUTPUTS name)."""
    head = {"toml": text, "save_path": save_as} if replace_text else {}
    shown = (save_as or "").strip() or "the unsaved dataset config"
    work = datasets_dir(ctx) / ".drafts"
    try:
        config = F.parse_config(text or "", work, shown)
        rep = F.check_report(text, version, work, shown)
    except DatasetError as e:
        return {**head, "message": error_text(e), **_empty_view()}
    index = int(index) if isinstance(index, (int, float)) and 0 <= int(index) < len(config.datasets) else 0
    items, _ = F.dataset_items(config, index)
    notes = [n for n in (note, F.relative_path_note(config)) if n]
    if len(items) > GALLERY_MAX:
        notes.append(f"The gallery shows the first {GALLERY_MAX} of {len(items)} images; type a name under it to "
                     "open any other.")
    choices = [(f"datasets[{d['index']}]: {d['source']} ({d['items']} items)", d["index"]) for d in rep["datasets"]]
    return {**head, "message": "\n\n".join(notes), "summary": summary_text(rep),
            "problems": [[p["level"], p["file"], p["message"], p["fix"]] for p in rep["problems"]],
            "histogram": histogram_update(rep["buckets"]), "pick": gr.update(choices=choices, value=index),
            "gallery": gallery_value(ctx, items[:GALLERY_MAX]), "stems": [it.stem for it in items[:GALLERY_MAX]]}


def summary_text(rep: dict) -> str:
    items = sum(d["items"] for d in rep["datasets"])
    controls = sum(d["controls"] for d in rep["datasets"])
    skipped = sum(len(d["skipped"]) for d in rep["datasets"])
    verdict = "**Ready**" if rep["ok"] else f"**{rep['errors']} error(s)**: fix them before caching"
    lines = [f"{verdict} · {rep['warnings']} warning(s) · model version: {rep['model_version'] or 'not given'}",
             f"{items} item(s) · {controls} control image(s) · {skipped} skipped · "
             f"{len(rep['buckets'])} bucket(s)"]
    for d in rep["datasets"]:
        lines.append(f"- datasets[{d['index']}]: {d['items']} items, resolution {d['resolution'][0]}×"
                     f"{d['resolution'][1]}, batch {d['batch_size']}, repeats {d['num_repeats']}, "
                     f"cache `{d['cache_directory']}`")
    text = "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:])
    if rep["buckets"]:
        text += "\n\nBuckets: " + ", ".join(f"{b} × {n}" for b, n in rep["buckets"].items())
    return text


def histogram_update(buckets: dict[str, int]):
    if not buckets:
        return gr.update(visible=False)
    return gr.update(value=pd.DataFrame({"bucket": list(buckets), "items": list(buckets.values())}), visible=True)


def gallery_value(ctx, items) -> list[tuple[str, str]]:
    thumbs = ctx.data_dir / "thumbs"
    out = []
    for it in items:
        pic = F.picture(it.image_path, thumbs) or unreadable_picture(thumbs)
        label = it.caption if it.caption is not None else "(no caption)"
        out.append((pic, f"{it.stem}: {label[:80]}"))
    return out


def unreadable_picture(folder: Path) -> str:
    """A grey square standing in for an image that cannot be read (the report says why)."""
    path = folder / "unreadable.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (128, 128, 128)).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------ one item

def show_item(ctx, text: str, save_as: str, index, stem: str) -> dict:
    """One image with its control images and caption (by ITEM_OUTPUTS name)."""
    try:
        config = F.parse_config(text or "", datasets_dir(ctx) / ".drafts", save_as or "the dataset config")
        it = F.find_item(config, int(index or 0), stem or "")
    except DatasetError as e:
        return {"stem": "", "caption": "", "target": None, "controls": [], "info": error_text(e)}
    previews = ctx.data_dir / "previews"
    target = F.picture(it.image_path, previews, F.PREVIEW_SIDE, min_side=F.THUMB_SIDE)
    controls = [(F.picture(p, previews, F.PREVIEW_SIDE, min_side=F.THUMB_SIDE)
                 or unreadable_picture(ctx.data_dir / "thumbs"), p.name) for p in it.control_paths]
    where = f"caption file `{it.caption_path}`" if it.caption_path else (
        "no caption file yet: *Save caption* creates it" if it.caption is None else "caption from the JSONL file")
    info = f"`{it.image_path}` · {len(it.control_paths)} control image(s) · {where}"
    return {"stem": it.stem, "caption": it.caption or "", "target": target, "controls": controls, "info": info}


def save_caption(ctx, text: str, save_as: str, index, stem: str, caption: str) -> dict:
    try:
        config = F.parse_config(text or "", datasets_dir(ctx) / ".drafts", save_as or "the dataset config")
        said = F.save_caption(config, int(index or 0), stem or "", caption or "", ctx.data_dir / "caption_backups")
        items, _ = F.dataset_items(config, int(index or 0))
    except DatasetError as e:
        return {"message": error_text(e)}
    except OSError as e:
        return {"message": error_text(DatasetError(f"the caption could not be written ({e}).",
                                                   "Check that the image folder is writable."))}
    return {"message": said, "gallery": gallery_value(ctx, items[:GALLERY_MAX])}


# ------------------------------------------------------------------------------------------ save

def save_config(ctx, text: str, path: str, version: str | None = None) -> str:
    path = (path or "").strip()
    if not path:
        return error_text(DatasetError("no file name to save the dataset config as.", "Fill *Save as*."))
    target = Path(path).expanduser()
    if not target.is_absolute():          # a bare name goes with the other configs, not into the app's folder
        target = datasets_dir(ctx) / target
    if target.suffix.lower() != ".toml":
        return error_text(DatasetError(f"{target}: a dataset config is a .toml file.", "End the name with .toml."))
    try:
        F.parse_config(text or "", datasets_dir(ctx) / ".drafts", str(target))
    except DatasetError as e:
        return error_text(e) + "\n\nNothing was written."
    try:
        backup = F.save_config(target, text, ctx.data_dir / "config_backups")
    except OSError as e:
        return error_text(DatasetError(f"{target}: cannot be written ({e}).", "Choose a folder you can write to."))
    remember(ctx, str(target.resolve()), version)
    kept = f" The previous version is kept in `{backup}`." if backup else ""
    return (f"Saved `{target}`.{kept} The Cache and Train tabs offer it now; train with "
            f"`--dataset_config {target}`.")


def remember(ctx, path: str, version: str | None = None) -> None:
    """Recent dataset configs (newest first) with their model version, for the other tabs' menus; offered to
    Cache and Train (app/workflow.py keeps them in settings.json)."""
    W.remember_dataset(ctx, path, version)
    ctx.hand_off("cache.dataset_config", path)
    ctx.hand_off("train.dataset_config", path)
