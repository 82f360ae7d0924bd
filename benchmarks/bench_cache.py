"""Caching throughput: our cache commands vs calling diffusers directly on the same inputs (one run each).

    .venv/bin/python benchmarks/bench_cache.py [--images 16] [--size 64] [--device cpu|cuda] [--repeats 3]

Builds tiny real-class models (the demo's builders) and a dataset of random images in a temp folder, then times
  latents: `python -m engine cache_latents` (validation, fingerprints, resize, encode, atomic writes), in-process
           vs  resize + `AutoencoderKLQwenImage.encode(...).latent_dist.mode()` + normalisation, no writing;
  text:    `python -m engine cache_text_encoder_outputs` (original) vs `QwenImagePipeline.encode_prompt`.
Model loading is excluded on both sides (the command's "caching" phase is timed from its events). Prints images/s
and the ratio ours / diffusers (> 1 means we are slower).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.__main__ import main  # noqa: E402
from engine.spec.dataset.buckets import resize_to_bucket  # noqa: E402
from engine.demo import (SEEDS, build_text_encoder, build_tokenizer, build_vae, qwen_token_ids,  # noqa: E402
                         save_text_encoder_comfy, save_vae)
from engine.spec.variants import T2I_TEMPLATE  # noqa: E402


def make_dataset(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    img = root / "img"
    img.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(img / f"im{i:03d}.png")
        (img / f"im{i:03d}.txt").write_text(f"a photo of object number {i} on a table")
    cfg = root / "dataset.toml"
    cfg.write_text(f'[general]\nresolution = {size}\ncaption_extension = ".txt"\nbatch_size = 4\n'
                   f'[[datasets]]\nimage_directory = "{img}"\ncache_directory = "{root / "cache"}"\n')
    return cfg


def caching_seconds(argv: list[str], events: Path) -> float:
    rc = main(argv + ["--events_file", str(events)])
    assert rc == 0, events.read_text()[-2000:]
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    start = next(e["time"] for e in lines if e["type"] == "phase" and e["name"] == "caching")
    end = next(e["time"] for e in lines if e["type"] == "done")
    return end - start


@torch.no_grad()
def diffusers_latents(vae, paths: list[Path], size: int, device: str, batch: int = 4) -> float:
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, 16, 1, 1, 1)
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        arrs = [np.asarray(resize_to_bucket(Image.open(p), (size, size)), dtype=np.float32)
                for p in paths[i:i + batch]]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)[:, :, None].to(device) / 127.5 - 1
        z = (vae.encode(x).latent_dist.mode() - mean) / std
        z.cpu()
    return time.perf_counter() - start


@torch.no_grad()
def diffusers_text(te, tok, captions: list[str], device: str, batch: int = 4) -> float:
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=tok, transformer=None)
    start = time.perf_counter()
    for i in range(0, len(captions), batch):
        embeds, _ = pipe.encode_prompt(prompt=captions[i:i + batch], device=torch.device(device))
        embeds.cpu()
    return time.perf_counter() - start


def main_bench() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = make_dataset(root, args.images, args.size)
        vae = build_vae(SEEDS["vae"])
        vae_path = save_vae(vae, root / "vae.safetensors")
        tok = build_tokenizer([T2I_TEMPLATE.format(f"a photo of object number {i} on a table")
                               for i in range(args.images)])
        tok_dir = root / "tokenizer"
        tok.save_pretrained(str(tok_dir))
        te = build_text_encoder(len(tok), qwen_token_ids(tok))
        te_path = save_text_encoder_comfy(te, root / "te.safetensors")

        common = ["--dataset_config", str(cfg), "--model_version", "original", "--device", args.device]
        paths = sorted((root / "img").glob("*.png"))
        captions = [p.with_suffix(".txt").read_text() for p in paths]
        vae, te = vae.to(args.device), te.to(args.device)
        # warm-up: torch's first calls of each op are slow; pay that once, for both sides, before timing
        diffusers_latents(vae, paths[:1], args.size, args.device)
        diffusers_text(te, tok, captions[:1], args.device)
        # alternate the two sides and keep each one's best of --repeats: whichever runs first at a new batch shape
        # pays the kernels' first-call cost, and a loaded 2-core machine adds noise to single runs
        runs = {"ours_lat": [], "ref_lat": [], "ours_txt": [], "ref_txt": []}
        for i in range(args.repeats):
            runs["ours_lat"].append(caching_seconds(["cache_latents", *common, "--vae", str(vae_path)],
                                                    root / f"ev1_{i}.jsonl"))
            runs["ref_lat"].append(diffusers_latents(vae, paths, args.size, args.device))
            runs["ours_txt"].append(caching_seconds(["cache_text_encoder_outputs", *common, "--text_encoder",
                                                     str(te_path), "--tokenizer", str(tok_dir)], root / f"ev2_{i}.jsonl"))
            runs["ref_txt"].append(diffusers_text(te, tok, captions, args.device))
        ours_lat, ref_lat, ours_txt, ref_txt = (min(runs[k]) for k in ("ours_lat", "ref_lat", "ours_txt", "ref_txt"))
    n = args.images
    print(f"{n} images {args.size}x{args.size}, batch 4, device {args.device}, torch threads "
          f"{torch.get_num_threads()}, best of {args.repeats}")
    for what, ours, ref in (("latents", ours_lat, ref_lat), ("text", ours_txt, ref_txt)):
        print(f"{what:8s} ours {n / ours:8.2f} img/s  diffusers {n / ref:8.2f} img/s  ratio ours/diffusers "
              f"time {ours / ref:.2f}")


if __name__ == "__main__":
    main_bench()
