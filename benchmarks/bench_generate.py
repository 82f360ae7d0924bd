"""Wall time of our generation vs diffusers' pipeline on the same tiny weights and settings; prints the ratio.

    .venv/bin/python benchmarks/bench_generate.py [--steps 8] [--size 64] [--version original|edit-2509]

Both sides start from models already in memory (the same tensors), so the number compares the generation
itself: prompt encoding, denoising with true CFG, VAE decode. One warm-up call each, then one timed run each
(--repeats N alternates N runs and keeps each side's best, for a shared machine).
Goal: ratio (ours / diffusers) <= 0.95. The full command (`python -m engine generate_image`, with loading from
files) is timed too, for information.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(tmp: Path):
    from engine.demo import make_demo

    return make_demo(tmp / "demo")


def ours_fn(manifest, version, prompt, neg, size, steps, guidance, controls):
    from engine.spec.controls import prepare_control
    from engine.infer.generate import pil_to_pixels
    from engine.infer.sampling import Conditioning, DenoiseRequest, denoise
    from engine.models.latents import initial_noise, pack, unpack
    from engine.models.dit import load_dit
    from engine.models.text_encoder import load_text_encoder
    from engine.models.tokenizer import VisionProcessor, load_tokenizer
    from engine.models.vae import decode_latents, encode_pixels, load_vae
    from engine.models.textenc import encode_prompts
    from engine.spec.variants import get_variant

    variant = get_variant(version)
    tok = load_tokenizer(manifest["tokenizer"])
    proc = VisionProcessor(tok) if variant.is_edit else None
    te = load_text_encoder(manifest["text_encoder"])
    dit = load_dit(manifest["dit"][version], model_version=version)
    vae = load_vae(manifest["vae"])

    @torch.no_grad()
    def run(seed):
        vl, lat, shapes = [], [], []
        for im in controls:
            vae_img, vl_img = prepare_control(variant, im, (size, size), official=True)
            lat.append(pack(encode_pixels(vae, pil_to_pixels(vae_img))))
            shapes.append((1, vae_img.height // 16, vae_img.width // 16))
            vl.append(vl_img)
        imgs = [vl, vl] if variant.is_edit else None
        pos, negv = encode_prompts(te, tok, proc, [prompt, neg], imgs, variant)   # one pass, as the engine
        req = DenoiseRequest(noise=initial_noise(seed, size, size), height=size, width=size, steps=steps,
                             guidance_scale=guidance, positive=Conditioning(pos[None]),
                             negative=Conditioning(negv[None]),
                             control_latents=torch.cat(lat, 1) if lat else None, control_shapes=tuple(shapes))
        latents = denoise(dit, req)
        return decode_latents(vae, unpack(latents, size, size))[0]

    return run, (te, tok, dit, vae)


def diffusers_fn(version, models, prompt, neg, size, steps, guidance, controls):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline, QwenImagePipeline

    from engine.infer.sampling import QWEN_SCHEDULER_CONFIG

    te, tok, dit, vae = models
    sched = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG)
    if version == "original":
        pipe = QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=dit)
        extra = {}
    else:
        from transformers import Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from engine.models.tokenizer import IMAGE_PROCESSOR_SETTINGS
        sys.path.insert(0, str(ROOT / "tests"))
        import conftest  # noqa: F401  (makes Qwen2VLProcessor constructible without torchvision)

        proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR_SETTINGS), tokenizer=tok)
        pipe = QwenImageEditPlusPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, processor=proc,
                                         transformer=dit)
        extra = {"image": controls}
    pipe.set_progress_bar_config(disable=True)

    def run(seed):
        return pipe(prompt=prompt, negative_prompt=neg, true_cfg_scale=guidance, height=size, width=size,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt",
                    **extra).images[0]

    return run


def timed(fn, seed):
    start = time.perf_counter()
    out = fn(seed)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--version", default="original", choices=("original", "edit-2509"))
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each (alternating); best is kept")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        manifest = build(Path(tmp))
        rng = np.random.default_rng(0)
        controls = [] if args.version == "original" else [
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(2)]
        if controls:   # official sizes shrunk to the benchmark size on both sides (as the parity tests do)
            import dataclasses

            from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

            from engine.spec import variants
            plus.VAE_IMAGE_SIZE = variants.VAE_AREA = args.size ** 2
            plus.CONDITION_IMAGE_SIZE = (args.size // 2) ** 2
            variants.VARIANTS["edit-2509"] = dataclasses.replace(variants.VARIANTS["edit-2509"],
                                                                 vl_area=(args.size // 2) ** 2)
        settings = ("a red fox in the snow", "blurry", args.size, args.steps, 2.5, controls)
        ours, models = ours_fn(manifest, args.version, *settings)
        ref = diffusers_fn(args.version, models, *settings)
        ours(0), ref(0)                                    # warm-up
        # alternate the two and keep each one's best of --repeats: the CPU is shared, single runs are noisy
        t_ref = t_ours = float("inf")
        for _ in range(args.repeats):
            t, img_ref = timed(ref, 1)
            t_ref = min(t_ref, t)
            t, img_ours = timed(ours, 1)
            t_ours = min(t_ours, t)
        diff = (img_ours.float() - img_ref.float()).abs().mean().item() * 255
        print(f"version {args.version}, {args.size}x{args.size}, {args.steps} steps, true CFG 2.5")
        print(f"diffusers pipeline: {t_ref:.3f} s")
        print(f"ours:               {t_ours:.3f} s   (mean |diff| {diff:.4f}/255)")
        print(f"ratio ours/diffusers: {t_ours / t_ref:.3f}  (goal <= 0.95)")


if __name__ == "__main__":
    main()
