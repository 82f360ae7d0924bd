"""Sample images during training (musubi-tuner's --sample_prompts), through the inference code (engine/infer).

`--sample_prompts FILE`: one prompt per line with musubi-tuner's per-line options (`--w --h --d --s --l --fs --n
--ci`, parsed by engine.spec.jobs.parse_prompt_line in musubi's sample grammar: `--l` is the CFG scale, `--g`
(embedded guidance) and `--f` (frames) are accepted and ignored); `#` lines are comments.
Control images of edit models are fed at the official sizes (engine/spec/controls.py: ~1 MP for the VAE; the
vision encoder sees the same image for Edit and a 384²-area one for Edit-2509/2511), the sizes the text-encoder
cache gave the vision encoder in training, so a sample shows the model conditioned as it was trained (a control
at its native size could also overflow the vision encoder's token budget). The prompts (and control images of
edit models) are encoded once before the DiT loads, then the text encoder is freed, as musubi does. Each sample
runs the same denoising loop as `generate_image` on the model being trained (LoRA applied), so a sample shows
what Generate would give for that checkpoint.

--fp8_vl: the prompts are encoded on the CPU (once, before training) instead of with an fp8 text encoder on the GPU.
Deliberate difference from musubi: a line without `--fs` uses the dynamic (resolution-dependent) shift of the
official scheduler, as generate_image does, not musubi's trainer-wide fixed shift 14.5. Lines without `--d` use
--seed (or 42), so successive samples of one prompt are comparable.

Files: `<output_dir>/sample/<output_name>_<e{epoch:06d} | {step:06d}>_<index:02d>_<YYYYmmddHHMMSS>_<seed>.png`.

API:
- `SamplePrompts.prepare(cfg, variant, device, dtype) -> SamplePrompts | None`   (None without --sample_prompts)
- `prompts.generate(dit, step, epoch, events, modules) -> [paths]`              emits one `sample` event per image
- `is_due(cfg, step=..., epoch=...)`
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from PIL import PngImagePlugin

from engine.infer import generate as G
from engine.infer.generate import batch_cfg_ok, check_run
from engine.infer.outputs import to_pil
from engine.infer.sampling import Conditioning, DenoiseRequest, denoise
from engine.models.latents import initial_noise, unpack
from engine.models.vae import decode_latents
from engine.spec import naming
from engine.spec.jobs import SAMPLE, jobs_from_config
from engine.spec.options import EDIT_VERSIONS, GenerateImageConfig

log = logging.getLogger(__name__)

DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_CFG, DEFAULT_SEED = 256, 20, 4.0, 42


def generation_config(cfg, variant_name: str):
    """The generate_image config the sample lines are read against (their defaults)."""
    return GenerateImageConfig(
        device=cfg.device, model_version=variant_name, dit=cfg.dit, vae=cfg.vae, text_encoder=cfg.text_encoder,
        tokenizer=cfg.tokenizer, from_file=cfg.sample_prompts, image_size=[DEFAULT_SIZE, DEFAULT_SIZE],
        infer_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_CFG, seed=cfg.seed if cfg.seed is not None else DEFAULT_SEED,
        save_path=str(Path(cfg.output_dir) / "sample"),
        # --fp8_vl asks to keep the text encoder's VRAM low: sample prompts are then encoded on the CPU (once)
        text_encoder_cpu=getattr(cfg, "fp8_vl", False),
        # controls as training conditioned the model (module doc); meaningless without an edit model
        resize_control_to_official_size=variant_name in EDIT_VERSIONS)


def check_prompts(cfg, variant) -> list:
    """Parse and validate the prompt file (control images exist, sizes ...) before any model loads."""
    gcfg = generation_config(cfg, variant.name)
    jobs = jobs_from_config(gcfg, grammar=SAMPLE)
    check_run(gcfg, jobs, variant)
    return jobs


class SamplePrompts:
    def __init__(self, gcfg, prepared: list, vae, device: torch.device, dtype: torch.dtype, save_dir: Path,
                 name: str):
        self.gcfg, self.prepared, self.vae = gcfg, prepared, vae
        self.device, self.dtype, self.save_dir, self.name = device, dtype, save_dir, name

    @classmethod
    def prepare(cls, cfg, variant, device: torch.device, dtype: torch.dtype, name: str) -> "SamplePrompts | None":
        if not cfg.sample_prompts:
            return None

        gcfg = generation_config(cfg, variant.name)
        if gcfg.text_encoder_cpu:
            log.info("--fp8_vl: the sample prompts are encoded on the CPU, once")
        prepared = [G.Prepared(job) for job in check_prompts(cfg, variant)]
        vae = G.load_vae_model(cfg.vae, device)
        for p in prepared:
            if variant.is_edit and p.job.control_image_path:
                G.encode_controls(p, variant, gcfg, vae, dtype)
        G.encode_all_prompts(prepared, variant, gcfg, device, dtype)
        vae.to("cpu")                 # between samples the VAE waits in host RAM (musubi)
        G.free_memory(device)
        log.info("sample prompts: %d encoded from %s", len(prepared), cfg.sample_prompts)
        return cls(gcfg, prepared, vae, device, dtype, Path(cfg.output_dir) / "sample", name)

    @torch.no_grad()
    def generate(self, dit, step: int, epoch: int | None, events, modules=(), is_main: bool = True) -> list[str]:
        """Every prompt once. The DiT and `modules` (the LoRA network: its dropouts) are put in eval mode and
        back; the RNG state is left as it was."""
        if not is_main:
            return []
        cpu_rng = torch.get_rng_state()
        modes = [(m, m.training) for m in (dit, *modules)]
        for m, _ in modes:
            m.eval()
        self.vae.to(self.device)
        paths = []
        try:
            for index, p in enumerate(self.prepared):
                job = p.job
                noise = initial_noise(job.seed, job.height, job.width).to(self.device, self.dtype)
                request = DenoiseRequest(
                    noise=noise, height=job.height, width=job.width, steps=job.infer_steps,
                    guidance_scale=job.guidance_scale, positive=Conditioning(p.positive[None]),
                    negative=Conditioning(p.negative[None]) if p.negative is not None else None,
                    control_latents=None if p.control_latents is None else p.control_latents.to(self.device),
                    control_shapes=p.control_shapes, flow_shift=job.flow_shift, batch_cfg=batch_cfg_ok(dit, p))
                latents = denoise(dit, request)
                pixels = decode_latents(self.vae, unpack(latents.float(), job.height, job.width))
                path = self._save(pixels[0], step, epoch, index, job)
                paths.append(str(path))
                events.sample(str(path), step=step, epoch=epoch, index=index, prompt=job.prompt)
        finally:
            self.vae.to("cpu")
            for m, mode in modes:
                m.train(mode)
            torch.set_rng_state(cpu_rng)
        return paths

    def _save(self, pixels: torch.Tensor, step: int, epoch: int | None, index: int, job) -> Path:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        tag = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        stamp = time.strftime("%Y%m%d%H%M%S")
        path = self.save_dir / f"{self.name}_{tag}_{index:02d}_{stamp}_{job.seed}.png"
        info = PngImagePlugin.PngInfo()
        info.add_text(naming.PNG_PARAMETERS_KEY, json.dumps(dict(job.parameters(), step=step), ensure_ascii=False))
        tmp = path.with_name(f".{path.name}.tmp")
        to_pil(pixels).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
        return path


def is_due(cfg, step: int | None = None, epoch: int | None = None) -> bool:
    if step is not None:
        return bool(cfg.sample_every_n_steps) and step % cfg.sample_every_n_steps == 0
    return bool(cfg.sample_every_n_epochs) and epoch % cfg.sample_every_n_epochs == 0
