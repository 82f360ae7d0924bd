"""Dataset tab: the loss mask of one training image (`mask_directory` of its dataset entry; white = train here),
painted with the Generate tab's painter (app/mask_painter.py) or imported from a file, saved as
`<mask_directory>/<stem>.png`.

The painter shows the same preview copy of the image as the item view (Gradio serves only the app's own folder;
tiny images are enlarged, large ones reduced), and the mask is resized to the image's own size when saved, since
the engine requires a mask of its image's size (engine/spec/dataset/masks.py). A mask that is replaced is backed
up first, like a caption; nothing else in the user's folders is written.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from app import dataset_files as F
from app import generate_media as M
from app import mask_painter
from engine.spec.dataset.sources import is_image
from engine.spec.errors import DatasetError


def build(ctx, toml, save_path, pick, stem, item_events: list) -> None:
    """The mask painter under the item view; `item_events` (an image picked) load the picked image into it."""
    with gr.Accordion("Loss mask (white = train here, black = ignore)", open=False, elem_id="dataset-mask"):
        editor = mask_painter.editor("Paint the loss mask on the target (white = train here)", "dataset-mask-editor")
        with gr.Row():
            upload = gr.Image(type="filepath", label="Import a mask file (white = train here)", height=180,
                              sources=("upload", "clipboard"), elem_id="dataset-mask-import")
            with gr.Column():
                invert = gr.Checkbox(False, label="Invert (I painted what to ignore)", elem_id="dataset-mask-invert")
                save = gr.Button("Save mask", variant="primary", elem_id="dataset-mask-save")
                remove = gr.Button("Remove mask", elem_id="dataset-mask-remove")
        info = gr.Markdown(elem_id="dataset-mask-info")

    def dataset_mask_load(toml_text, save_as, dataset_index, image_stem):
        return load_painter(ctx, toml_text, save_as, dataset_index, image_stem)

    def dataset_mask_save(toml_text, save_as, dataset_index, image_stem, painter, invert_mask):
        return save_mask(ctx, toml_text, save_as, dataset_index, image_stem, painter, invert_mask)

    def dataset_mask_remove(toml_text, save_as, dataset_index, image_stem):
        return remove_mask(ctx, toml_text, save_as, dataset_index, image_stem)

    where = [toml, save_path, pick, stem]
    for event in item_events:
        event.then(dataset_mask_load, where, [editor, info], api_visibility="private")
    upload.upload(lambda painter, path: imported_layer(ctx, painter, path), [editor, upload], [editor, info],
                  api_visibility="private")
    save.click(dataset_mask_save, [*where, editor, invert], info, api_name="dataset_mask_save")
    remove.click(dataset_mask_remove, where, info, api_name="dataset_mask_remove").then(
        dataset_mask_load, where, [editor, info], api_visibility="private")


def _target(ctx, text: str, save_as: str, index, stem: str):
    config = F.parse_config(text or "", ctx.data_dir / "datasets" / ".drafts", save_as or "the dataset config")
    item = F.find_item(config, int(index or 0), stem or "")
    return item, config.datasets[int(index or 0)]


def existing_masks(mask_dir: Path | None, stem: str) -> list[Path]:
    if mask_dir is None or not mask_dir.is_dir():
        return []
    return sorted(p for p in mask_dir.iterdir() if p.is_file() and p.stem == stem and is_image(p))


def load_painter(ctx, text: str, save_as: str, index, stem: str) -> tuple[dict | None, str]:
    """The painter's value for one item (its preview, with its saved mask as the layer) and a note."""
    try:
        item, spec = _target(ctx, text, save_as, index, stem)
    except DatasetError as e:
        return None, f"{e.message}"
    picture = F.picture(item.image_path, ctx.data_dir / "previews", F.PREVIEW_SIDE, min_side=F.THUMB_SIDE)
    if picture is None:
        return None, f"`{item.image_path}` cannot be read."
    layers = []
    masks = existing_masks(spec.mask_directory, item.stem)
    if masks:
        with Image.open(picture) as bg:
            layer = M.mask_layer(str(masks[0])).resize(bg.size, Image.Resampling.BILINEAR)
        name = f"{item.stem}-{masks[0].stat().st_mtime_ns}.png"
        layers.append(str(M.save_png(layer, ctx.data_dir / "mask_layers" / name)))
    if spec.mask_directory is None:
        note = ("This dataset has no `mask_directory`: add `mask_directory = \"<folder>\"` to its `[[datasets]]` "
                "entry above (and save the config) to give its images loss masks.")
    elif masks:
        note = f"Mask `{masks[0]}` (white = train here). Paint or erase, then *Save mask*."
    else:
        note = "No mask yet: the whole image trains. Paint white where it should train, then *Save mask*."
    return {"background": picture, "layers": layers, "composite": picture}, note


def imported_layer(ctx, editor: dict | None, upload: str | None) -> tuple[dict | None, str]:
    """An imported mask file (white = train here) as the painter's layer, resized to the picture."""
    if not upload or not editor or not editor.get("background"):
        return editor, "Pick an image first, then import its mask."
    with Image.open(editor["background"]) as bg, Image.open(upload) as m:
        grey = m.convert("L")
        note = "" if grey.size == bg.size else f" (resized from {grey.width}×{grey.height})"
        grey = grey.resize(bg.size, Image.Resampling.BILINEAR)
    layer = Image.new("RGBA", grey.size, (255, 255, 255, 0))
    layer.putalpha(grey)
    path = M.save_png(layer, ctx.data_dir / "mask_layers" / f"import-{Path(upload).stem}.png")
    return {"background": editor["background"], "layers": [str(path)], "composite": editor["background"]}, \
        f"Imported mask loaded{note}: check it, then *Save mask*."


def save_mask(ctx, text: str, save_as: str, index, stem: str, editor: dict | None, invert: bool) -> str:
    """Write `<mask_directory>/<stem>.png` at the image's size; an existing mask of that image is backed up."""
    try:
        item, spec = _target(ctx, text, save_as, index, stem)
        if spec.mask_directory is None:
            raise DatasetError(f"datasets[{int(index or 0)}] has no mask_directory.",
                               "Add mask_directory = \"<folder>\" to its [[datasets]] entry and save the config.")
        mask = M.painted_mask((editor or {}).get("background"), (editor or {}).get("layers"))
    except (DatasetError, M.MaskError) as e:
        return f"**Not saved:** {getattr(e, 'message', e)} {getattr(e, 'hint', '')}"
    if mask is None and not invert:
        return ("**Not saved:** nothing is painted, which would train nothing of this image. Paint where it should "
                "train, or *Remove mask* to train on the whole image.")
    if mask is None:                    # nothing painted + invert: the whole image trains
        with Image.open(editor["background"]) as bg:
            mask = Image.new("L", bg.size, 0)
    if invert:
        mask = Image.fromarray(255 - np.asarray(mask), mode="L")
    with Image.open(item.image_path) as img:
        size = img.size
    mask = mask.resize(size, Image.Resampling.BILINEAR if mask.width < size[0] else Image.Resampling.BOX)
    backups = [F._backup(p, ctx.data_dir / "mask_backups") for p in existing_masks(spec.mask_directory, item.stem)]
    dest = M.save_png(mask, spec.mask_directory / f"{item.stem}.png")
    for old in existing_masks(spec.mask_directory, item.stem):
        if old != dest:
            old.unlink()
    share = np.asarray(mask, dtype=np.float32).mean() / 2.55
    kept = f" (previous mask backed up to `{backups[0]}`)" if backups else ""
    return f"Saved `{dest}`: {share:.1f}% of the image trains{kept}. Re-run caching to use it."


def remove_mask(ctx, text: str, save_as: str, index, stem: str) -> str:
    try:
        item, spec = _target(ctx, text, save_as, index, stem)
    except DatasetError as e:
        return f"**Not removed:** {e.message}"
    masks = existing_masks(spec.mask_directory, item.stem)
    if not masks:
        return "This image has no mask: it trains on the whole image."
    for p in masks:
        F._backup(p, ctx.data_dir / "mask_backups")
        p.unlink()
    return f"Removed the mask of {item.stem} (backed up): the whole image trains. Re-run caching to use it."
