"""Every check that can fail a generate_image run, done before any model is loaded (design.md §2.6).

Mask and RCM follow musubi's rules, but where musubi logs an error and silently disables the feature we refuse:
mask + RCM together, either without an edit model, or a first control image whose VAE size is not the output
size (the blend needs the reference on the output's token grid).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from engine.spec.errors import ModelFileError, OptionError
from engine.spec.controls import control_sizes
from engine.spec.jobs import Job
from engine.spec.variants import Variant


def check_run_files(cfg) -> None:
    """The run's options and files. A --latent_path run needs only the VAE and its latent files."""
    if not cfg.save_path:
        raise OptionError("--save_path is missing", "give the folder the images should be written to")
    if cfg.resize_control_to_image_size and cfg.resize_control_to_official_size:
        raise OptionError("--resize_control_to_image_size and --resize_control_to_official_size were both given",
                          "choose one: the output size, or the official pipelines' sizes (recommended for 2509/2511)")
    _require_file(cfg.vae, "--vae", "the Qwen-Image VAE (qwen_image_vae.safetensors)")
    check_preview(cfg)
    if cfg.latent_path:
        for p in cfg.latent_path:
            _require_file(p, "--latent_path", "a latent file written with --output_type latent")
        return
    _require_file(cfg.dit, "--dit", "the Qwen-Image DiT (.safetensors file, shard or transformer/ folder)")
    _require_file(cfg.text_encoder, "--text_encoder", "Qwen2.5-VL (qwen_2.5_vl_7b.safetensors or a folder)")


def check_run_jobs(cfg, jobs: list[Job], variant: Variant) -> None:
    """The LoRA list, the prompt and every job (one per --from_file line)."""
    check_loras(cfg)
    if not cfg.from_file and not cfg.prompt and cfg.prompt != "":
        raise OptionError("no prompt: give --prompt or --from_file", "e.g. --prompt \"a red fox in the snow\"")
    for job in jobs:
        check_job(job, variant, cfg)


def check_preview(cfg) -> None:
    if cfg.preview_every is not None and cfg.preview_every < 1:
        raise OptionError(f"--preview_every {cfg.preview_every}: must be at least 1",
                          "give the number of steps between previews (e.g. 5), or leave it out for none")


def check_loras(cfg) -> None:
    for p in cfg.lora_weight:
        _require_file(p, "--lora_weight", "a LoRA .safetensors file")
    n, m = len(cfg.lora_weight), len(cfg.lora_multiplier)
    if m not in (0, 1, n):
        raise OptionError(f"--lora_multiplier has {m} values for {n} --lora_weight files",
                          "give one multiplier per LoRA, one for all, or none (1.0)")


def check_job(job: Job, variant: Variant, cfg) -> None:
    where = job.where()
    if job.width <= 0 or job.height <= 0 or job.width % 16 or job.height % 16:
        raise OptionError(f"{where}: image size {job.height}x{job.width} (H x W) is not a multiple of 16",
                          "use sizes divisible by 16, e.g. --image_size 1024 1024 (or --w/--h in a prompt line)")
    if job.steps < 1:
        raise OptionError(f"{where}: --infer_steps {job.steps}", "use at least 1 step (25 is the default)")
    if variant.is_edit:
        if not job.control_paths:
            raise OptionError(f"{where}: {variant.title} needs a control image",
                              "give --control_image_path IMAGE (or --ci IMAGE in the prompt line)")
    elif job.control_paths:
        raise OptionError(f"{where}: control images were given but the model version is {variant.name}",
                          "add --model_version edit / edit-2509 / edit-2511 for an edit model, or drop the images")
    sizes = [_image_size(p, f"{where}: control image") for p in job.control_paths]
    if variant.name == "edit" and len(sizes) > 1:
        raise OptionError(f"{where}: Qwen-Image-Edit takes one control image, {len(sizes)} were given",
                          "use --model_version edit-2509 or edit-2511 for several control images")
    check_mask_rcm(job, variant, cfg, sizes)


def check_mask_rcm(job: Job, variant: Variant, cfg, control_image_sizes: list) -> None:
    where = job.where()
    use_mask, use_rcm = job.mask_path is not None, job.rcm_threshold is not None
    if not (use_mask or use_rcm):
        return
    if use_mask and use_rcm:
        raise OptionError(f"{where}: --mask_path and --rcm_threshold cannot be used together",
                          "use the inpaint mask or the Reference Consistency Mask, not both")
    what = "--mask_path" if use_mask else "--rcm_threshold"
    if not variant.is_edit:
        raise OptionError(f"{where}: {what} needs an edit model, the model version is {variant.name}",
                          "add --model_version edit / edit-2509 / edit-2511 and a control image")
    first = control_sizes(variant, control_image_sizes[0], (job.width, job.height),
                          cfg.resize_control_to_official_size, cfg.resize_control_to_image_size).vae
    if (first[0] // 16, first[1] // 16) != (job.width // 16, job.height // 16):
        raise OptionError(
            f"{where}: {what} needs the first control image at the output size {job.width}x{job.height} (W x H), "
            f"but it is used at {first[0]}x{first[1]}",
            "add --resize_control_to_image_size, or set --image_size to the control image's size")
    if use_mask:
        _image_size(job.mask_path, f"{where}: --mask_path")
    else:
        if job.rcm_threshold < 0:
            raise OptionError(f"{where}: --rcm_threshold {job.rcm_threshold} is negative",
                              "use 0.01-0.1 (absolute) or 0.1-0.5 with --rcm_relative_threshold")
        if job.rcm_kernel_size < 1 or job.rcm_dilate_size < 0:
            raise OptionError(f"{where}: --rcm_kernel_size must be >= 1 and --rcm_dilate_size >= 0",
                              "the defaults are 3 and 0")


def _require_file(path: str | None, option: str, what: str) -> None:
    if not path:
        raise OptionError(f"{option} is missing", f"give the path of {what}")
    if not Path(path).exists():
        raise ModelFileError(f"{option} {path}: no such file or folder", f"check the path of {what}")


def _image_size(path: str, what: str) -> tuple[int, int]:
    if not Path(path).is_file():
        raise OptionError(f"{what} {path}: no such file", "check the path")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise OptionError(f"{what} {path}: not a readable image ({e})", "use a PNG, JPEG or WebP file") from None
