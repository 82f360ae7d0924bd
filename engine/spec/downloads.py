"""Which files to download, from where (the seed's "Download the model" section, as data).

Used by the README, the GUI's Models tab and error hints. Importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Download:
    component: str          # dit / text_encoder / vae
    variant: str | None     # model version for a DiT; None = shared by every version
    repo: str               # Hugging Face repository
    file: str               # path inside the repository
    note: str = ""

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/blob/main/{self.file}"

    @property
    def filename(self) -> str:
        return self.file.rsplit("/", 1)[-1]


COMFY_T2I = "Comfy-Org/Qwen-Image_ComfyUI"
COMFY_EDIT = "Comfy-Org/Qwen-Image-Edit_ComfyUI"

DOWNLOADS: tuple[Download, ...] = (
    Download("dit", "original", COMFY_T2I, "split_files/diffusion_models/qwen_image_bf16.safetensors",
             "The fp8_scaled version cannot be used."),
    Download("dit", "edit", COMFY_EDIT, "split_files/diffusion_models/qwen_image_edit_bf16.safetensors",
             "fp8_e4m3fn cannot be used."),
    Download("dit", "edit-2509", COMFY_EDIT, "split_files/diffusion_models/qwen_image_edit_2509_bf16.safetensors",
             "fp8_e4m3fn cannot be used."),
    Download("dit", "edit-2511", COMFY_EDIT, "split_files/diffusion_models/qwen_image_edit_2511_bf16.safetensors",
             "fp8 variants cannot be used."),
    Download("text_encoder", None, COMFY_T2I, "split_files/text_encoders/qwen_2.5_vl_7b.safetensors",
             "The fp8_scaled version cannot be used."),
    Download("vae", None, "Qwen/Qwen-Image", "vae/diffusion_pytorch_model.safetensors",
             "The ComfyUI VAE (split_files/vae/qwen_image_vae.safetensors) is converted automatically too."),
)

FP8_NOTE = ("Pre-quantized fp8 checkpoints (fp8_scaled / fp8_e4m3fn / fp8mixed) cannot be used; download the bf16 "
            "file and use --fp8_base / --fp8_scaled / --fp8_vl to store it in fp8 at load time.")

# Official diffusers sharded weights also work: pass the first shard (…-00001-of-0000N.safetensors) or the folder.
OFFICIAL_REPOS = {"original": "Qwen/Qwen-Image", "edit": "Qwen/Qwen-Image-Edit",
                  "edit-2509": "Qwen/Qwen-Image-Edit-2509", "edit-2511": "Qwen/Qwen-Image-Edit-2511"}


def for_component(component: str, variant: str | None = None) -> Download | None:
    """The recommended download for a component (and DiT model version)."""
    for d in DOWNLOADS:
        if d.component == component and (d.variant is None or d.variant == (variant or "original")):
            return d
    return None


def hint(component: str, variant: str | None = None) -> str:
    """One sentence naming the file to download, for error hints."""
    d = for_component(component, variant)
    if d is None:
        return "See the download table in the README."
    return f"Download {d.filename} from https://huggingface.co/{d.repo} ({d.file})."


def as_rows() -> list[dict]:
    """The table as plain dicts (for the Models tab and the README generator)."""
    return [{"component": d.component, "variant": d.variant or "all", "repo": d.repo, "file": d.file,
             "url": d.url, "note": d.note} for d in DOWNLOADS]
