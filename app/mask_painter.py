"""The mask painter shared by the Generate tab (inpaint mask on control image 1) and the Dataset tab (loss mask on
a training image): one white brush on one layer over the picture, an eraser, no transforms. The layer's alpha is
the mask (app/generate_media.py: painted_mask, mask_layer)."""

from __future__ import annotations

import gradio as gr


def editor(label: str, elem_id: str, value=None, small_picture: bool = False) -> gr.ImageEditor:
    """`small_picture`: gradio's "auto" brush is 25 image pixels: right for ~1 MP photos, most of a 64 px demo
    image, so a fixed 6 px brush then."""
    return gr.ImageEditor(
        value=value, type="filepath", image_mode="RGBA", format="png", label=label,
        brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed",
                       default_size=6 if small_picture else "auto"), eraser=gr.Eraser(),
        layers=gr.LayerOptions(allow_additional_layers=False, layers=["mask"]), transforms=(),
        sources=("upload", "clipboard"), elem_id=elem_id)
