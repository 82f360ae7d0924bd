"""Step time of our LoRA training loop vs a minimal diffusers-style loop on the same model and batches; prints
the ratio.

    .venv/bin/python benchmarks/bench_train.py [--steps 40] [--wide] [--threads 1] [--repeats 1]

Ours: the `train_network` command run in this process through `engine.__main__.main` (the code path of
`python -m engine`) on the demo DiT and a cached demo dataset; each `metric` event (one per optimizer step) is
clocked, so start-up and loading are not counted.
Reference: the math of diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py written out minimally:
the same batches held in memory, uniform index into the 1000-step flow-matching grid, x_t = (1 − σ)x0 + σε,
target ε − x0, mse, PEFT LoRA (rank 4, alpha 4) on the same 14 Linear layers per block, AdamW, grad clip 1.0.
Both sides are timed in CPU time (the number to read on a shared machine: other processes barely move it) and in
wall time, per step after a warm-up, single-threaded by default.
`--wide` swaps the 2-layer, 32-wide demo DiT for a 4-layer, 128-wide one (still random, still tiny), where compute
weighs more than per-step Python overhead.
Goal: ratio (ours / reference) <= 1.05.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WARMUP = 5      # steps not timed on either side (allocator warm-up, first backward)
LR = 1e-4


def wide_dit(manifest: dict, folder: Path) -> str:
    """A 4-layer DiT of width 128 (4 heads × 32) saved in the ComfyUI layout next to the demo."""
    from diffusers import QwenImageTransformer2DModel

    from engine.demo import dit_config, save_dit_comfy

    cfg = dict(dit_config("original"), num_layers=4, num_attention_heads=4, attention_head_dim=32,
               axes_dims_rope=(16, 8, 8))
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**cfg)
    return str(save_dit_comfy(model, folder / "qwen_image_wide_bf16.safetensors"))


# ---------------------------------------------------------------------------------------------- ours

def ours_step_time(manifest: dict, toml: Path, out: Path, steps: int) -> tuple[dict, list[float]]:
    """Runs the command in this process (`engine.__main__.main`, the same code path as `python -m engine`) and
    clocks each `metric` event (one per optimizer step) in CPU time and wall time."""
    from _train_harness import train_argv

    from engine.__main__ import main
    from engine.spec.events import EventWriter

    clock: list[tuple[float, float]] = []
    losses: list[float] = []
    original = EventWriter.metric

    def metric(self, step, loss=None, lr=None, **extra):
        clock.append((time.process_time(), time.perf_counter()))
        losses.append(loss)
        return original(self, step, loss, lr, **extra)

    argv = train_argv(manifest, toml, out, "--max_train_steps", str(steps), "--learning_rate", str(LR),
                      "--optimizer_type", "AdamW", "--max_grad_norm", "1.0", "--network_alpha", "4")
    EventWriter.metric = metric
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    finally:
        EventWriter.metric = original
    if rc != 0 or len(clock) != steps:
        sys.exit(f"train_network failed (rc {rc}, {len(clock)} metric events); see {out / 'events.jsonl'}")
    return per_step(clock), losses


def per_step(clock: list[tuple[float, float]]) -> dict:
    """Mean seconds per step after the warm-up, in CPU time (robust on a shared machine) and wall time."""
    (c0, w0), (c1, w1) = clock[WARMUP - 1], clock[-1]
    n = len(clock) - WARMUP
    return {"cpu": (c1 - c0) / n, "wall": (w1 - w0) / n}


# ---------------------------------------------------------------------------------------------- reference

def reference_loop(manifest: dict, toml: Path, steps: int, seed: int = 7):
    """diffusers' Qwen-Image LoRA example, minimal: returns a `run(n)` that trains n steps and the step losses."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig

    from engine.data.cached import CachedDataset
    from engine.models.latents import pack, unpack
    from engine.models.lora_formats import BLOCK_LINEARS
    from engine.models.dit import load_dit
    from engine.models.textenc import pad_embeddings

    dit = load_dit(manifest["dit"]["original"], device="cpu", dtype=torch.float32)
    dit.requires_grad_(False)
    dit.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                               target_modules=[f"transformer_blocks.{i}.{p}" for i in range(len(dit.transformer_blocks))
                                               for p in BLOCK_LINEARS]))
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    data = CachedDataset.open(toml, "original")
    batches, epoch = [], 0
    while len(batches) < steps:                          # held in memory, as the example with --cache_latents
        batches += [data.load_batch(b) for b in data.epoch_batches(epoch, seed)]
        epoch += 1
    sigmas_grid = scheduler.sigmas.float()
    grid = scheduler.timesteps.float()
    torch.manual_seed(seed)

    def step(batch) -> float:
        x0 = batch["latents"].float()
        b, _, _, h, w = x0.shape
        noise = torch.randn_like(x0)
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=b)
        idx = (u * 1000).long()
        timesteps = grid[idx]
        sigmas = sigmas_grid[idx].reshape(-1, 1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        text, mask = pad_embeddings([e.float() for e in batch["vl_embed"]])
        pred = dit(hidden_states=pack(noisy), encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                   timestep=timesteps / 1000, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        pred = unpack(pred, h * 8, w * 8)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - x0
        loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def run(n: int) -> tuple[dict, list[float]]:
        losses, clock = [], []
        for i in range(n):
            losses.append(step(batches[i]))
            clock.append((time.process_time(), time.perf_counter()))
        return per_step(clock), losses

    return run


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--wide", action="store_true", help="a 4-layer, 128-wide DiT instead of the demo's")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--repeats", type=int, default=1, help="alternate N runs of each and keep each side's best")
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(args.threads)
    from _train_harness import cached_dataset

    from engine.demo import make_demo

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_demo(tmp / "demo")
        if args.wide:
            manifest = dict(manifest, dit=dict(manifest["dit"], original=wide_dit(manifest, tmp)))
        with contextlib.redirect_stdout(io.StringIO()):          # the caching commands' event lines
            toml = cached_dataset(manifest, tmp / "data", batch_size=1, num_repeats=max(1, args.steps // 8 + 1))
        ref = reference_loop(manifest, toml, args.steps)
        best_ref = best_ours = {"cpu": float("inf"), "wall": float("inf")}
        for r in range(args.repeats):                 # alternate; keep each side's best (shared machine)
            t, ref_losses = ref(args.steps)
            best_ref = {k: min(best_ref[k], t[k]) for k in t}
            t, our_losses = ours_step_time(manifest, toml, tmp / f"out{r}", args.steps)
            best_ours = {k: min(best_ours[k], t[k]) for k in t}
        width = "4 layers x 128" if args.wide else "demo: 2 layers x 32"
        print(f"DiT {width}; batch 1, 64x64 (one 80x48, one 48x80); LoRA rank 4 on 14 Linears/block; AdamW; "
              f"{args.steps} steps ({WARMUP} warm-up); {args.threads} thread(s)")
        for name, t, losses in (("reference (diffusers-style loop)", best_ref, ref_losses),
                                ("ours (engine train_network)", best_ours, our_losses)):
            print(f"{name:<34} {t['cpu'] * 1000:7.2f} ms/step CPU  {t['wall'] * 1000:7.2f} ms/step wall   "
                  f"mean loss {statistics.fmean(losses):.4f}")
        print(f"ratio ours/reference: {best_ours['cpu'] / best_ref['cpu']:.3f} CPU time, "
              f"{best_ours['wall'] / best_ref['wall']:.3f} wall  (goal <= 1.05)")


if __name__ == "__main__":
    main()
