"""One registry of model variants. Everything that differs between Qwen-Image, Edit, Edit-2509 and
Edit-2511 lives here, not in `if model ==` branches across the engine.

Importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n")
_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n")
EDIT_TEMPLATE = _EDIT_SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_TEMPLATE = _EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_IMAGE_PREFIX = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"

VAE_AREA = 1024 * 1024          # official size of control images for the VAE (~1 MP)
VL_AREA_PLUS = 384 * 384        # Edit-2509/2511: per-image area fed to the vision encoder


@dataclass(frozen=True)
class Variant:
    name: str                 # --model_version value
    title: str                # human name
    is_edit: bool
    template: str             # prompt template (one "{}" for the user text)
    drop_idx: int             # template tokens dropped from the embeddings
    multi_image: bool         # "Picture N:" prefixes, any number of control images
    vl_area: int | None       # vision-encoder area for controls; None = same ~1 MP image as the VAE (Edit v1)
    zero_cond_t: bool         # reference tokens modulated at t = 0 (Edit-2511)
    cache_arch: str           # cache file suffix (musubi's)
    base_model_version: str   # ss_base_model_version
    modelspec_arch: str       # modelspec.architecture (without "/lora")
    modelspec_reso: str
    diffusers_pipeline: str   # the official pipeline this variant must match

    def prompt_text(self, prompt: str, num_images: int) -> str:
        """The full template text for one prompt with `num_images` control images."""
        if self.multi_image:
            prefix = "".join(EDIT_PLUS_IMAGE_PREFIX.format(i + 1) for i in range(num_images))
            return self.template.format(prefix + prompt)
        return self.template.format(prompt)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("original", "Qwen-Image", False, T2I_TEMPLATE, 34, False, None, False, "qi", "qwen_image",
            "Qwen-Image", "1328x1328", "QwenImagePipeline"),
    Variant("edit", "Qwen-Image-Edit", True, EDIT_TEMPLATE, 64, False, None, False, "qie", "qwen_image_edit",
            "Qwen-Image-Edit", "1024x1024", "QwenImageEditPipeline"),
    Variant("edit-2509", "Qwen-Image-Edit-2509", True, EDIT_PLUS_TEMPLATE, 64, True, VL_AREA_PLUS, False, "qie",
            "qwen_image_edit", "Qwen-Image-Edit-Plus", "1024x1024", "QwenImageEditPlusPipeline"),
    Variant("edit-2511", "Qwen-Image-Edit-2511", True, EDIT_PLUS_TEMPLATE, 64, True, VL_AREA_PLUS, True, "qie",
            "qwen_image_edit", "Qwen-Image-Edit-2511", "1024x1024", "QwenImageEditPlusPipeline"),
)}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model version {name!r}; choose one of {', '.join(VARIANTS)}") from None
