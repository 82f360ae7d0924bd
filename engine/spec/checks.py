"""The checks that refuse a run before any model is loaded, without torch: the app runs them before it queues a
job, the engine again before it loads a model. Each rule is written once, here or as a range in the option registry
(engine/spec/options.py, checked by engine.spec.config.validate).

generate_image: the files, the LoRA list, every job (one per --from_file line) with its sizes, control images and
the mask/RCM rules (the DiT's header check is engine/models/dit.py's, run by engine/infer/generate.py).

Mask and RCM follow musubi's rules, but where musubi logs an error and silently disables the feature we refuse:
mask + RCM together, either without an edit model, or a first control image whose VAE size is not the output
size (the blend needs the reference on the output's token grid).
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.spec import imageio
from engine.spec.config import check_value, option_fields
from engine.spec.controls import control_sizes
from engine.spec.errors import ModelFileError, OptionError
from engine.spec.jobs import JOB_FIELDS, Job
from engine.spec.options import GenerateImageConfig
from engine.spec.safetensors_header import FLOAT_DTYPES, read_header
from engine.spec.variants import Variant


def check_run_files(cfg) -> None:
    """The run's options and files. A --latent_path run needs only the VAE and its latent files."""
    if not cfg.save_path:
        raise OptionError("--save_path is missing", "give the folder the images should be written to")
    if cfg.resize_control_to_image_size and cfg.resize_control_to_official_size:
        raise OptionError("--resize_control_to_image_size and --resize_control_to_official_size were both given",
                          "choose one: the output size, or the official pipelines' sizes (recommended for 2509/2511)")
    _require_file(cfg.vae, "--vae", "the Qwen-Image VAE (qwen_image_vae.safetensors)")
    if cfg.latent_path:
        for p in cfg.latent_path:
            _require_file(p, "--latent_path", "a latent file written with --output_type latent")
            check_latent_file(p)
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


def check_loras(cfg) -> None:
    for p in cfg.lora_weight:
        _require_file(p, "--lora_weight", "a LoRA .safetensors file")
    n, m = len(cfg.lora_weight), len(cfg.lora_multiplier)
    if m not in (0, 1, n):
        raise OptionError(f"--lora_multiplier has {m} values for {n} --lora_weight files",
                          "give one multiplier per LoRA, one for all, or none (1.0)")


def check_job(job: Job, variant: Variant, cfg) -> None:
    where = job.where()
    for f in option_fields(GenerateImageConfig):      # a prompt line's values against the registry's ranges
        if f.name in JOB_FIELDS:
            check_value(f, getattr(job, f.name), where)
    if variant.is_edit:
        if not job.control_image_path:
            raise OptionError(f"{where}: {variant.title} needs a control image",
                              "give --control_image_path IMAGE (or --ci IMAGE in the prompt line)")
    elif job.control_image_path:
        raise OptionError(f"{where}: control images were given but the model version is {variant.name}",
                          "add --model_version edit / edit-2509 / edit-2511 for an edit model, or drop the images")
    sizes = [_image_size(p, f"{where}: control image") for p in job.control_image_path]
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


def _require_file(path: str | None, option: str, what: str) -> None:
    if not path:
        raise OptionError(f"{option} is missing", f"give the path of {what}")
    if not Path(path).exists():
        raise ModelFileError(f"{option} {path}: no such file or folder", f"check the path of {what}")


MAX_LATENT_SIDE = 1024        # latent units (8 px each): an 8192-px image side


def check_latent_file(path: str) -> None:
    """A --latent_path file (ours or musubi's) from its header: a safetensors file with a floating-point `latent`
    of shape (1, 16, 1, h, w) or (1, 16, h, w) and a plausible size; readable `parameters` metadata if present."""
    fix = "Pass a latent file written by generate_image --output_type latent (or latent_images)."
    header = read_header(path)                    # not safetensors / truncated: its own clear error
    info = header.tensors.get("latent")
    if info is None:
        raise ModelFileError(f"--latent_path {path}: has no 'latent' tensor (it holds "
                             f"{', '.join(list(header.tensors)[:3]) or 'no tensors'}).", fix)
    shape = info.shape if len(info.shape) != 4 else (1, *info.shape)      # musubi's (16, 1, h, w)
    if info.dtype not in FLOAT_DTYPES or len(shape) != 5 or shape[:3] != (1, 16, 1) \
            or not all(1 <= s <= MAX_LATENT_SIDE for s in shape[-2:]):
        raise ModelFileError(f"--latent_path {path}: 'latent' is {info.dtype} {list(info.shape)}; a Qwen-Image "
                             f"latent is floating-point (1, 16, 1, h, w) with h, w in 1..{MAX_LATENT_SIDE}.", fix)
    text = header.metadata.get("parameters")
    if text is not None:
        try:
            if not isinstance(json.loads(text), dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as e:
            raise ModelFileError(f"--latent_path {path}: its 'parameters' metadata is not a JSON object ({e}).",
                                 "Re-save the latent, or pass --no_metadata to decode it without its "
                                 "parameters.") from None


def _image_size(path: str, what: str) -> tuple[int, int]:
    """Decoded once (control images and masks are small), so a truncated file is refused now, not after the
    models have loaded."""
    if not Path(path).is_file():
        raise OptionError(f"{what} {path}: no such file", "check the path")
    try:
        return imageio.decoded_size(path)
    except imageio.ImageError as e:
        raise OptionError(f"{what} {e.message}", e.hint) from None


# ------------------------------------------------------------------ rules shared by the estimator and the stages

def check_blocks_to_swap(n: int, num_blocks: int, lowest: int = 0) -> None:
    """At least one of the DiT's blocks stays on the GPU. The estimator checks against the published 60-block
    DiT, block swap against the loaded model (which may be a tiny test model); `lowest` 1 where 0 means "off"
    and is handled by the caller."""
    if not lowest <= n <= num_blocks - 1:
        raise OptionError(f"--blocks_to_swap {n}: the DiT has {num_blocks} blocks, so it must be between {lowest} "
                          f"and {num_blocks - 1}.", "Lower --blocks_to_swap (0 disables it).")


def check_fp8_scaled(cfg) -> None:
    """Training's --fp8_scaled changes how --fp8_base stores the weights; alone it means nothing."""
    if cfg.fp8_scaled and not cfg.fp8_base:
        raise OptionError("--fp8_scaled was given without --fp8_base.",
                          "Add --fp8_base (fp8_scaled only changes how the fp8 weights are scaled).")


BNB_PRECISIONS = ("nf4-bnb", "int8-bnb")


def check_base_precision(cfg) -> None:
    """train_network's --base_model_precision (engine/models/bnb_quant.py): one quantisation of the DiT at a time,
    and not under block swap (it streams plain weight storage; a quantised weight's scales live beside it).
    Checked by the trainer before loading and by the estimator."""
    mode = getattr(cfg, "base_model_precision", "no_change")
    if mode not in BNB_PRECISIONS:
        return
    if cfg.fp8_base or cfg.fp8_scaled:
        raise OptionError(f"--base_model_precision {mode} and --fp8_base/--fp8_scaled both quantise the DiT.",
                          "Choose one: drop --fp8_base/--fp8_scaled, or use --base_model_precision no_change.")
    if cfg.blocks_to_swap:
        raise OptionError(f"--base_model_precision {mode} cannot be combined with --blocks_to_swap (block swap "
                          "streams plain weights).", "Use --blocks_to_swap 0 (nf4 needs ~11 GB for the DiT), or "
                          "--fp8_base --fp8_scaled with block swap.")
