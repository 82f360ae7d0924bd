"""`python -m engine generate_image`: text-to-image and edit (v1, 2509, 2511) generation.

Flow (batch mode included): validate everything → VAE-encode the control images → encode every prompt with the
text encoder, then free it → load the DiT once (LoRA, fp8, block swap, attention kernel) → denoise each job →
free the DiT → decode and save. The math matches diffusers' official pipelines (see engine/infer/sampling.py).
"""

from __future__ import annotations

import gc
import json
import logging
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.infer import masks
from engine.infer.outputs import (check_finite_image, latent_metadata, load_latent, original_suffix, save_image,
                                  save_latent, to_pil)
from engine.infer.preview import Previewer
from engine.infer.sampling import Conditioning, DenoiseRequest, denoise
from engine.models import dit_setup
from engine.models.dit import check_dit_headers, weight_shapes
from engine.models.lora_formats import check_fits, read_lora
from engine.models.latents import initial_noise, pack, unpack
from engine.models.runtime import compute_dtype, resolve_device
from engine.models.text_encoder import load_text_encoder
from engine.models.textenc import encode_prompts
from engine.models.tokenizer import VisionProcessor, load_tokenizer
from engine.models.vae import decode_latents, encode_pixels, load_vae
from engine.spec import checks, imageio
from engine.spec.controls import prepare_control
from engine.spec.errors import EngineError
from engine.spec.events import IMAGE_OUTPUT, RcmStep
from engine.spec.jobs import Job, jobs_from_config
from engine.spec.variants import Variant, get_variant
from engine.spec.vram import estimate_config

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A job with its control images encoded and its prompts embedded."""
    job: Job
    vl_images: list = field(default_factory=list)
    control_latents: torch.Tensor | None = None       # (1, sum S_c, 64) packed
    control_shapes: tuple = ()
    positive: torch.Tensor | None = None               # (L, D)
    negative: torch.Tensor | None = None


def run(cfg, events) -> list[str]:
    variant = get_variant(cfg.resolved_version())
    jobs = [] if cfg.latent_path else jobs_from_config(cfg)
    check_run(cfg, jobs, variant)
    emit_estimate(cfg, jobs, events)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(device)
    save_dir = Path(cfg.save_path)
    save_dir.mkdir(parents=True, exist_ok=True)

    events.phase("loading", model="vae")
    vae = load_vae_model(cfg.vae, device)
    enable_tiling(vae, cfg.vae_enable_tiling)
    if cfg.latent_path:
        return decode_latent_files(cfg, vae, device, events, save_dir)

    prepared = [Prepared(job) for job in jobs]
    if variant.zero_cond_t and not cfg.resize_control_to_official_size:
        log.warning("%s was trained with the official control sizes; --resize_control_to_official_size is "
                    "recommended (musubi-tuner's docs call it mandatory for 2511)", variant.title)
    if variant.is_edit:
        events.phase("encoding", what="control images")
        for p in prepared:
            encode_controls(p, variant, cfg, vae, dtype)
    events.phase("encoding", what="prompts")
    encode_all_prompts(prepared, variant, cfg, device, dtype)

    events.phase("loading", model="dit")
    dit = load_transformer(cfg, variant, device, dtype)
    report_memory(events, device, "dit loaded")
    results = []
    # the VAE stays loaded for the final decode anyway: previews reuse it (float32, on `device`)
    previewer = Previewer(cfg.preview_every, vae, save_dir, events) if cfg.preview_every else None
    for index, p in enumerate(prepared):
        events.phase("sampling", index=index, total=len(prepared), seed=p.job.seed)
        results.append(sample_job(p, cfg, dit, device, dtype, events, save_dir, index, previewer))
    report_memory(events, device, "sampling done")
    del dit
    free_memory(device)

    outputs: list[str] = []
    events.phase("saving")
    for p, latents in zip(prepared, results):
        outputs += save_outputs(p, latents, cfg, variant, vae, events, save_dir)
    return outputs


def check_run(cfg, jobs: list[Job], variant: Variant) -> None:
    """Every refusal before a model loads: options and files, the DiT's headers (milliseconds), then each job."""
    checks.check_run_files(cfg)
    if cfg.latent_path:
        return
    check_dit_headers(cfg.dit, variant)
    checks.check_run_jobs(cfg, jobs, variant)
    shapes = weight_shapes(cfg.dit) if cfg.lora_weight else {}
    for path in cfg.lora_weight:       # small files: read and checked now, before the text encoder loads
        check_fits(read_lora(path), shapes)


def emit_estimate(cfg, jobs: list[Job], events) -> None:
    """The estimator's VRAM/RAM for the largest image of this run, so the job log holds estimate and measured peak."""
    if not jobs:
        return
    big = max(jobs, key=lambda j: j.width * j.height)
    controls = max(len(j.control_image_path) for j in jobs)
    try:
        result = estimate_config(cfg, image_size=list(big.image_size), control_image_path=["control"] * controls)
    except EngineError as e:      # a setting the estimator does not model; generation itself is fine
        log.warning("no VRAM estimate for this run: %s", e.message)
        return
    events.estimate(result["vram_gib"], result["ram_gib"], result["phases"], peak_phase=result["peak_phase"],
                    parts=result["parts"])


# ---- models ----------------------------------------------------------------------------------------------------

def load_transformer(cfg, variant: Variant, device: torch.device, dtype: torch.dtype):
    """The DiT once, in engine/models/dit_setup.py's order: LoRA merged and fp8 applied while reading, then
    block swap and the attention kernel."""
    merger = dit_setup.lora_merger(cfg.lora_weight, cfg.lora_multiplier)
    dit = dit_setup.load(cfg.dit, variant, device, dtype, fp8=cfg.fp8 or cfg.fp8_scaled, fp8_scaled=cfg.fp8_scaled,
                         swap=cfg.blocks_to_swap > 0, merger=merger)
    dit.eval().requires_grad_(False)
    dit_setup.finish(dit, device, blocks_to_swap=cfg.blocks_to_swap, attention=cfg.attn_mode)
    return dit


def load_vae_model(path, device):
    # float32 on every device: this VAE's bf16 decode can give NaN (black) images
    return load_vae(path, device=device, dtype=torch.float32)


def enable_tiling(vae, on: bool) -> None:
    if on:
        vae.enable_tiling()


def report_memory(events, device: torch.device, phase: str) -> None:
    """A `vram` event (CUDA only): what the GUI's memory readout shows."""
    if device.type != "cuda":
        return
    gib = 1024 ** 3
    ram = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib      # peak RSS (Linux reports KiB)
    events.vram(round(torch.cuda.memory_allocated(device) / gib, 2), round(torch.cuda.memory_reserved(device) / gib, 2),
                round(torch.cuda.max_memory_allocated(device) / gib, 2), round(ram, 2), phase=phase)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- controls and prompts ----------------------------------------------------------------------------------------

def encode_controls(p: Prepared, variant: Variant, cfg, vae, dtype) -> None:
    """VAE latents (packed, in order) and vision-encoder images of the job's control images."""
    packed, shapes, vl_images = [], [], []
    for path in p.job.control_image_path:
        vae_img, vl_img = prepare_control(variant, imageio.read_rgb(path), (p.job.width, p.job.height),
                                          cfg.resize_control_to_official_size, cfg.resize_control_to_image_size)
        latents = encode_pixels(vae, pil_to_pixels(vae_img))           # (1, 16, 1, h, w) normalised
        packed.append(pack(latents).to(dtype))
        shapes.append((1, vae_img.height // 16, vae_img.width // 16))
        vl_images.append(vl_img)
    p.control_latents = torch.cat(packed, dim=1)
    p.control_shapes = tuple(shapes)
    p.vl_images = vl_images


def pil_to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL → (1, 3, 1, H, W) in [-1, 1], as diffusers' VaeImageProcessor.preprocess."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return (arr.permute(2, 0, 1)[None, :, None] * 2.0 - 1.0).contiguous()


def negative_text(job: Job) -> str | None:
    """The negative prompt when CFG is on; musubi and the official docs use " " when none is given."""
    if job.guidance_scale == 1.0:
        return None
    return job.negative_prompt if job.negative_prompt is not None else " "


def encode_all_prompts(prepared: list[Prepared], variant: Variant, cfg, device, dtype) -> None:
    """All prompts (and negatives) first, then the text encoder is freed before the DiT loads."""
    te_device = torch.device("cpu") if cfg.text_encoder_cpu else device
    te_dtype = compute_dtype(te_device) if te_device.type != "cpu" or device.type == "cpu" else torch.bfloat16
    tokenizer = load_tokenizer(cfg.tokenizer)
    processor = VisionProcessor(tokenizer) if variant.is_edit else None
    text_encoder = load_text_encoder(cfg.text_encoder, device=te_device, dtype=te_dtype)
    cache: dict = {}

    def embed(prompts: list[str], p: Prepared) -> list[torch.Tensor]:
        """The job's prompt and negative in one text-encoder pass (cached by prompt, controls and size)."""
        keys = [(text, tuple(p.job.control_image_path), p.job.width, p.job.height) for text in prompts]
        todo = [text for text, key in zip(prompts, keys) if key not in cache]
        if todo:
            images = [p.vl_images] * len(todo) if variant.is_edit else None
            for text, emb in zip(todo, encode_prompts(text_encoder, tokenizer, processor, todo, images, variant)):
                cache[(text, *keys[0][1:])] = emb
        return [cache[key].to(device, dtype) for key in keys]

    if any(p.job.negative_prompt is None and p.job.guidance_scale != 1.0 for p in prepared):
        log.info("true CFG without --negative_prompt: using \" \" as the negative prompt (as the official examples)")
    for p in prepared:
        neg = negative_text(p.job)
        texts = [p.job.prompt] + ([neg] if neg is not None and neg != p.job.prompt else [])
        embeds = embed(texts, p)
        p.positive = embeds[0]
        p.negative = None if neg is None else embeds[-1]
    del text_encoder
    free_memory(te_device)


# ---- sampling ----------------------------------------------------------------------------------------------------

def sample_job(p: Prepared, cfg, dit, device, dtype, events, save_dir: Path, index: int,
               previewer: Previewer | None = None) -> torch.Tensor:
    job = p.job
    noise = initial_noise(job.seed, job.height, job.width).to(device, dtype)
    request = DenoiseRequest(
        noise=noise, height=job.height, width=job.width, steps=job.infer_steps, guidance_scale=job.guidance_scale,
        positive=Conditioning(p.positive[None]),
        negative=Conditioning(p.negative[None]) if p.negative is not None else None,
        control_latents=None if p.control_latents is None else p.control_latents.to(device),
        control_shapes=p.control_shapes, flow_shift=job.flow_shift,
        batch_cfg=batch_cfg_ok(dit, p))
    started = time.time()

    def on_step(step: int, total: int) -> None:
        eta = (time.time() - started) / step * (total - step)
        events.progress(step, total, unit="step", eta_s=round(eta, 1), index=index)

    def on_estimate(step: int, total: int, x0: torch.Tensor) -> None:
        previewer.save(x0, step, total, job.height, job.width, index)

    return denoise(dit, request, blend=make_blend(p, cfg, noise, events, save_dir, index), on_step=on_step,
                   on_estimate=on_estimate if previewer else None,
                   estimate_every=previewer.every if previewer else None)


def batch_cfg_ok(dit, p: Prepared) -> bool:
    """One batch-2 pass for cond + uncond. When their text lengths differ it needs a text mask: SDPA only, and on
    CUDA a mask rules out SDPA's flash kernel (likely slower than two passes at real sizes, unmeasured here), so
    there it is used only for equal lengths."""
    if p.negative is None:
        return False
    if p.negative.shape[0] == p.positive.shape[0]:
        return True
    device = next(dit.parameters()).device
    return getattr(dit, "qis_attention_backend", "native") == "native" and device.type == "cpu"


def make_blend(p: Prepared, cfg, noise: torch.Tensor, events, save_dir: Path, index: int):
    job = p.job
    if job.mask_path is None and job.rcm_threshold is None:
        return None
    ref0 = p.control_latents[:, :noise.shape[1]].to(noise.device, noise.dtype)
    if job.mask_path is not None:
        return masks.inpaint_blend(masks.load_mask_tokens(job.mask_path, job.width, job.height), ref0, noise)

    def on_step(record: RcmStep) -> None:
        events.write(replace(record, index=index))

    return masks.rcm_blend(job, ref0, noise, save_dir if cfg.rcm_debug_save else None, on_step)


# ---- outputs -----------------------------------------------------------------------------------------------------

def parameters_of(job: Job, cfg, variant: Variant) -> dict:
    """Everything needed to reproduce the image, under the config's field names."""
    return dict(job.parameters(), model_version=variant.name, dit=cfg.dit, vae=cfg.vae,
                text_encoder=cfg.text_encoder, lora_weight=list(cfg.lora_weight),
                lora_multiplier=list(cfg.lora_multiplier),
                resize_control_to_image_size=cfg.resize_control_to_image_size,
                resize_control_to_official_size=cfg.resize_control_to_official_size)


def save_outputs(p: Prepared, latents: torch.Tensor, cfg, variant: Variant, vae, events, save_dir: Path) -> list[str]:
    job = p.job
    suffix = original_suffix(job.control_image_path, cfg.append_original_name)
    params = None if cfg.no_metadata else parameters_of(job, cfg, variant)
    unpacked = unpack(latents, job.height, job.width)
    outputs = []
    if cfg.output_type in ("latent", "latent_images"):
        meta = None if cfg.no_metadata else latent_metadata(job, cfg.embedded_cfg_scale, params)
        path = save_latent(unpacked, save_dir, job.seed, suffix, meta)
        outputs.append(str(path))
        log.info("latent saved to %s", path)
    if cfg.output_type in ("images", "latent_images"):
        path = decode_and_save(vae, unpacked, save_dir, job.seed, suffix, params)
        outputs.append(str(path))
        events.image(str(path), kind=IMAGE_OUTPUT, seed=job.seed)
    return outputs


def decode_and_save(vae, unpacked: torch.Tensor, save_dir: Path, seed: int, suffix: str, params) -> Path:
    pixels = decode_latents(vae, unpacked)       # (1, 3, H, W) in [0, 1]
    check_finite_image(pixels, f"image of seed {seed}")
    return save_image(to_pil(pixels[0]), save_dir, seed, suffix, params)


def decode_latent_files(cfg, vae, device, events, save_dir: Path) -> list[str]:
    """--latent_path: decode saved latents only (no text encoder, no DiT)."""
    outputs = []
    events.phase("decoding", total=len(cfg.latent_path))
    for path in cfg.latent_path:
        latent, meta = load_latent(path)
        seed = meta.get("seeds", "0")
        params = None
        if not cfg.no_metadata and meta.get("parameters"):
            params = json.loads(meta["parameters"])
        out = decode_and_save(vae, latent.to(device, torch.float32), save_dir, seed, "", params)
        outputs.append(str(out))
        events.image(str(out), kind=IMAGE_OUTPUT, seed=seed)
    return outputs
