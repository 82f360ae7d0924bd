"""GPU acceptance run at real size, with no download: every VRAM preset measured beside its estimate.

    python benchmarks/gpu_check.py                       # on a CUDA machine: writes docs/gpu-<card>-<date>.md/.json
    python benchmarks/gpu_check.py --only lora-12gb,generate-12gb --budget_s 300
    python benchmarks/gpu_check.py --dry --out /tmp/x    # on the CPU at reduced size: every row runs, no GPU figures
    python benchmarks/gpu_check.py --list                # the rows, in the order they run

The DiT (60 blocks, 3072 wide), the Qwen2.5-VL 7B text encoder and the VAE are built at their published sizes
with random weights directly on the device (benchmarks/gpu_models.py: meta-device construction, then a cheap
random fill through the engine's own fp8 load hooks). A training preset's row sets the preset's options exactly
(presets/*.toml through engine/spec/presets.py) and runs the engine's own setup (engine/train/trainee.py: LoRA
network, block swap, gradient checkpointing, attention kernel) and step (engine/train/step.py, optimizer.py) for
two optimizer steps at the preset's resolution. A generation preset's row runs engine/infer/sampling.py's denoise
loop at 1024² with CFG for a few steps. Caching rows encode a prompt with the text encoder (bf16 and --fp8_vl) and
an image with the VAE.

Per row: the estimate (engine/spec/vram) of the phase measured, `max_memory_allocated` / `max_memory_reserved`,
the CUDA context (measured once: the device's used memory minus what torch reserved), their sum as "measured"
(what nvidia-smi would show), the error of the estimate against it, the process's RAM peak (psutil, sampled every
20 ms), seconds per step and the utilisation: model FLOPs of a step (2·weights·tokens per matmul pass, plus
attention's 4·tokens²·width per block; LoRA's backward computes input gradients only) / step time / the card's
dense bf16 peak (PEAK_BF16_TFLOPS, by device name; unknown cards get none).

Rows run in ORDER (most asked-for first); `--budget_s` (default 480: the run must fit 8 minutes) stops before a
row that the slowest row so far says would not fit. Both files are rewritten after every row, so a run cut short
keeps what it measured. An out-of-memory error is a result (recorded with the memory reached), not a crash.

`--dry` runs every row on the CPU at reduced width and depth (gpu_models.REDUCED_*, 64² images, blocks_to_swap
scaled to the depth): it proves the script starts, every row runs and the table prints. A dry table has no
memory, time or utilisation figures: only the estimates of the real size and "dry" in the status column.
docs/gpu-check.md says how to run it and where the table goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_models as G  # noqa: E402
from engine.infer import sampling  # noqa: E402
from engine.models import dit_setup  # noqa: E402
from engine.models import textenc  # noqa: E402
from engine.models.vae import decode_latents, encode_pixels  # noqa: E402
from engine.infer.generate import batch_cfg_ok, load_transformer  # noqa: E402
from engine.spec import presets as presets_mod  # noqa: E402
from engine.spec.config import GenerateImageConfig, TrainNetworkConfig  # noqa: E402
from engine.spec.variants import get_variant  # noqa: E402
from engine.spec.vram import estimate_config  # noqa: E402
from engine.spec.vram.constants import value as K  # noqa: E402
from engine.train import trainee  # noqa: E402
from engine.train.optim import create_optimizer, enable_fused_backward  # noqa: E402
from engine.train.step import flow_loss, predict, prepare_inputs  # noqa: E402
from engine.train.timesteps import TimestepSampler  # noqa: E402

GIB = 1024 ** 3
DEFAULT_BUDGET_S = 480
FIRST_ROW_GUESS_S = 45          # what a row is assumed to take before one has been timed
TRAIN_STEPS = 2
GENERATE_STEPS = 3
GUIDANCE = 4.0
DRY_SIZE = 64
PROMPT_TOKENS = int(K("prompt_tokens"))
NEGATIVE_TOKENS = 8

# Dense bf16 tensor-core peak (TFLOPS, no sparsity) by a substring of torch.cuda.get_device_name, first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("RTX 6000 Ada", 364.0), ("A6000", 155.0),
    ("RTX 5090", 209.0), ("RTX 4090", 165.0), ("RTX 4080", 97.0), ("RTX 3090", 71.0), ("A10", 125.0),
    ("L4", 121.0), ("T4", 65.0),
)

# Rows by value: the small cards people start on first, then the rest; caching and FSDP rows last.
ORDER = ("lora-12gb", "lora-16gb", "lora-24gb", "generate-12gb", "finetune-24gb", "generate-8gb",
         "cache-text-fp8_vl", "lora-32gb", "finetune-12gb", "finetune-16gb", "finetune-32gb", "generate-16gb",
         "generate-24gb", "lora-48gb", "finetune-48gb", "lora-80gb", "finetune-80gb", "generate-48gb",
         "cache-text-bf16", "cache-latents", "vae-decode")


@dataclasses.dataclass
class Ctx:
    device: torch.device
    dry: bool
    context_gib: float | None          # CUDA context, outside torch's allocator
    card: str
    peak_tflops: float | None


# ---------------------------------------------------------------------------------------------- measuring

class RamPeak:
    """The process's resident memory, sampled every 20 ms in a thread, maximum kept."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def sync(ctx: Ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def cuda_context_gib(device: torch.device) -> float:
    torch.zeros(1, device=device)
    free_b, total_b = torch.cuda.mem_get_info(device)
    return (total_b - free_b - torch.cuda.memory_reserved(device)) / GIB


def card_peak(name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------- rows

def scaled_swap(blocks: int, depth: int) -> int:
    """A preset's blocks_to_swap at the reduced depth of --dry: the same share of the blocks, one stays."""
    return min(depth - 1, round(blocks * depth / 60)) if blocks else 0


def preset_config(preset, ctx: Ctx):
    cfg = presets_mod.apply_preset(preset)
    extra = dict(dit="(random weights: benchmarks/gpu_models.py)", device=ctx.device.type)
    if ctx.dry:
        extra["blocks_to_swap"] = scaled_swap(cfg.blocks_to_swap, G.REDUCED_DIT["num_layers"])
    return dataclasses.replace(cfg, **extra)


def size_of(preset, ctx: Ctx) -> tuple[int, int]:
    return (DRY_SIZE, DRY_SIZE) if ctx.dry else tuple(preset.resolution)


def step_flops(dit, tokens: int, passes: float) -> float:
    """Model FLOPs of `passes` matmul passes over the blocks (forward = 1, an input-gradient backward = 1, a
    weight-gradient backward = 1); checkpointing's recompute is not counted (it is overhead, not model work)."""
    width = dit.config.num_attention_heads * dit.config.attention_head_dim
    dense = 2 * G.block_linear_weights(dit) * tokens
    attention = 4 * tokens * tokens * width * dit.config.num_layers
    return passes * (dense + attention)


def train_row(preset, ctx: Ctx) -> dict:
    full = preset.kind == "train"
    cfg = preset_config(preset, ctx)
    w, h = size_of(preset, ctx)
    variant = get_variant(cfg.resolved_version())
    torch.manual_seed(0)
    t = (trainee.full_trainee if full else trainee.lora_trainee)(cfg, variant, ctx.device)
    optimizer, _ = create_optimizer(t.param_groups, cfg.optimizer_type, cfg.learning_rate, cfg.optimizer_args)
    fused = full and cfg.fused_backward_pass
    if fused:
        enable_fused_backward(optimizer, cfg.max_grad_norm)
    params = [p for g in t.param_groups for p in g["params"]]
    text_dim = t.dit.config.joint_attention_dim
    batch = {"latents": torch.randn(1, 16, 1, h // 8, w // 8), "vl_embed": [torch.randn(PROMPT_TOKENS, text_dim)]}
    sampler = TimestepSampler.from_config(cfg)
    times = []
    for step in range(TRAIN_STEPS):
        sync(ctx)
        start = time.perf_counter()
        inputs = prepare_inputs(batch, sampler, torch.Generator().manual_seed(step), ctx.device, t.dtype)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            pred = predict(t.dit, inputs)
        flow_loss(pred, inputs).backward()
        if not fused:
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(ctx)
        times.append(time.perf_counter() - start)
    tokens = (h // 16) * (w // 16) + PROMPT_TOKENS
    flops = step_flops(t.dit, tokens, passes=3 if full else 2)
    applied = applied_options(t.dit, t.block_swap, len(params))
    if t.block_swap is not None:
        t.block_swap.remove()
    del t, optimizer, params, inputs, pred
    return {"step_s": times[-1], "first_step_s": times[0], "flops": flops, "applied": applied}


def applied_options(dit, swap, trained_tensors: int) -> dict:
    """What the setup actually did to the model (the CI test checks it against the preset)."""
    fp8 = {m.weight.dtype for m in dit.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)}
    return {"blocks_to_swap": swap.n if swap is not None else 0, "fp8": torch.float8_e4m3fn in fp8,
            "gradient_checkpointing": bool(getattr(dit, "gradient_checkpointing", False)),
            "weight_dtype": str(next(dit.img_in.parameters()).dtype).removeprefix("torch."),
            "trained_tensors": trained_tensors}


def generate_row(preset, ctx: Ctx) -> dict:
    cfg = preset_config(preset, ctx)
    w, h = size_of(preset, ctx)
    variant = get_variant(cfg.resolved_version())
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    dit = load_transformer(cfg, variant, ctx.device, dtype)
    text_dim = dit.config.joint_attention_dim
    gen = torch.Generator().manual_seed(0)
    cond = sampling.Conditioning(torch.randn(1, PROMPT_TOKENS, text_dim, generator=gen).to(ctx.device, dtype))
    # a short negative prompt (the default " "), so CFG runs as generate_image decides for unequal lengths
    uncond = sampling.Conditioning(torch.randn(1, NEGATIVE_TOKENS, text_dim, generator=gen).to(ctx.device, dtype))
    noise = torch.randn(1, (h // 16) * (w // 16), 64, generator=gen).to(ctx.device, dtype)
    batch = batch_cfg_ok(dit, SimpleNamespace(positive=cond.embeds[0], negative=uncond.embeds[0]))
    req = sampling.DenoiseRequest(noise=noise, height=h, width=w, steps=GENERATE_STEPS, guidance_scale=GUIDANCE,
                                  positive=cond, negative=uncond, batch_cfg=batch)
    stamps = []

    def on_step(done: int, total: int) -> None:
        sync(ctx)
        stamps.append(time.perf_counter())

    sync(ctx)
    stamps.append(time.perf_counter())
    sampling.denoise(dit, req, on_step=on_step)
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    tokens = (h // 16) * (w // 16) + PROMPT_TOKENS
    flops = step_flops(dit, tokens, passes=1) * 2              # CFG: conditional + unconditional
    del dit, req
    return {"step_s": sum(per_step[1:]) / max(1, len(per_step) - 1), "first_step_s": per_step[0], "flops": flops}


def text_row(ctx: Ctx, fp8_vl: bool) -> dict:
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    model = G.random_text_encoder(ctx.dry, ctx.device, dtype, fp8_vl)
    vocab = model.config.text_config.vocab_size
    length = PROMPT_TOKENS + get_variant("original").drop_idx
    ids = torch.randint(0, min(vocab, 150000), (1, length), generator=torch.Generator().manual_seed(0))
    sync(ctx)
    start = time.perf_counter()
    with torch.no_grad():
        textenc._forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    sync(ctx)
    del model
    return {"step_s": time.perf_counter() - start}


def vae_row(ctx: Ctx, decode: bool) -> dict:
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    vae = G.random_vae(ctx.dry, ctx.device, dtype)
    size = DRY_SIZE if ctx.dry else 1024
    sync(ctx)
    start = time.perf_counter()
    with torch.no_grad():
        if decode:
            decode_latents(vae, torch.randn(1, 16, 1, size // 8, size // 8, device=ctx.device, dtype=dtype))
        else:
            encode_pixels(vae, torch.rand(1, 3, 1, size, size, device=ctx.device, dtype=dtype) * 2 - 1)
    sync(ctx)
    del vae
    return {"step_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------- estimates

SEED_TRAIN = dict(resolution=[1024, 1024], batch_size=1, caches_ready=False, mixed_precision="bf16")


def estimate_of(name: str, preset) -> tuple[float, str, dict]:
    """(GiB, phase, parts) of the estimate for what the row measures."""
    if preset is not None:
        est = presets_mod.estimate_preset(preset)
        phase = "training_step" if preset.kind != "generate_image" else "denoising"
        p = est["phases"][phase]
        return p["vram_gib"], phase, p["parts"]
    if name.startswith("cache-"):
        est = estimate_config(TrainNetworkConfig(fp8_vl=name.endswith("fp8_vl")), "train_network",
                              **SEED_TRAIN)
        command = "cache_latents" if name == "cache-latents" else "cache_text_encoder_outputs"
        row = est["commands"][command]
        return row["vram_gib"], command, row["parts"]
    est = estimate_config(GenerateImageConfig(), "generate_image", image_size=[1024, 1024])
    p = est["phases"]["vae_decode"]
    return p["vram_gib"], "vae_decode", p["parts"]


def settings_of(preset) -> str:
    if preset is None:
        return ""
    return " ".join(f"{k}={v}" for k, v in preset.fields.items() if k not in ("optimizer_args",))


# ---------------------------------------------------------------------------------------------- running

def plan(only: list[str] | None) -> list[tuple[str, object]]:
    presets = {p.path.stem: p for p in presets_mod.list_presets()}
    names = list(ORDER) + sorted(set(presets) - set(ORDER))         # a new preset file is never left out
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise SystemExit(f"--only: unknown row(s) {', '.join(unknown)}; rows: {', '.join(names)}")
        names = [n for n in names if n in only]
    return [(n, presets.get(n)) for n in names]


def run_one(name: str, preset, ctx: Ctx) -> dict:
    if preset is not None:
        return (generate_row if preset.kind == "generate_image" else train_row)(preset, ctx)
    if name.startswith("cache-text"):
        return text_row(ctx, fp8_vl=name.endswith("fp8_vl"))
    return vae_row(ctx, decode=name == "vae-decode")


def measure(name: str, preset, ctx: Ctx) -> dict:
    est_gib, phase, parts = estimate_of(name, preset)
    row = {"row": name, "kind": preset.kind if preset else "caching", "phase": phase, "settings": settings_of(preset),
           "estimate_gib": est_gib, "estimate_parts": parts}
    free(ctx)
    started = time.perf_counter()
    try:
        with RamPeak() as ram:
            row.update(run_one(name, preset, ctx))
        row["status"] = "dry" if ctx.dry else "ok"
    except torch.OutOfMemoryError as e:                   # a result: the card cannot hold this preset
        row["status"], row["error"] = "OOM", str(e).splitlines()[0]
    row["seconds"] = round(time.perf_counter() - started, 1)
    row["ram_peak_gib"] = None if ctx.dry else round(ram.peak / GIB, 2)
    if ctx.device.type == "cuda":
        alloc = torch.cuda.max_memory_allocated(ctx.device) / GIB
        reserved = torch.cuda.max_memory_reserved(ctx.device) / GIB
        measured = reserved + ctx.context_gib
        row.update(allocated_gib=round(alloc, 2), reserved_gib=round(reserved, 2), measured_gib=round(measured, 2),
                   error_gib=round(est_gib - measured, 2), error_pct=round(100 * (est_gib - measured) / measured, 1))
        if row["status"] == "ok" and ctx.peak_tflops and row.get("flops"):
            row["utilisation"] = round(row["flops"] / row["step_s"] / (ctx.peak_tflops * 1e12), 3)
    if ctx.dry:                                        # a CPU run claims no GPU numbers
        for key in ("step_s", "first_step_s"):
            row.pop(key, None)
    free(ctx)
    return row


def fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# GPU check: {meta['card']}, {meta['date']}", "",
             f"`python benchmarks/gpu_check.py{meta['argv']}` — torch {meta['torch']}, CUDA {meta['cuda']}, "
             f"CUDA context {fmt(meta['context_gib'])} GiB, card peak {fmt(meta['peak_tflops'], 'g')} bf16 TFLOPS. "
             "Measured = max_memory_reserved + CUDA context (what nvidia-smi shows); error = estimate − measured.",
             ""]
    if meta["dry"]:
        lines += ["**Dry run on the CPU at reduced size: no GPU figures. Estimates are of the real models.**", ""]
    lines += ["| row | phase | estimate GiB | measured GiB | error | allocated GiB | reserved − allocated | RAM peak GiB "
              "| s/step | utilisation | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "—" if r.get("error_gib") is None else f"{r['error_gib']:+.2f} ({r['error_pct']:+.1f} %)"
        gap = None if r.get("reserved_gib") is None else r["reserved_gib"] - r["allocated_gib"]
        lines.append(f"| {r['row']} | {r['phase']} | {fmt(r['estimate_gib'])} | {fmt(r.get('measured_gib'))} | {err} "
                     f"| {fmt(r.get('allocated_gib'))} | {fmt(gap)} | {fmt(r.get('ram_peak_gib'))} "
                     f"| {fmt(r.get('step_s'), '.2f')} | {fmt(r.get('utilisation'), '.1%')} | {r['status']} |")
    lines += ["", "Settings of each preset row: presets/<row>.toml. JSON beside this file has every figure."]
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    """Both files, atomically, after every row."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out.with_suffix(".md"), markdown(meta, rows)),
                       (out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def default_out(card: str, dry: bool) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    day = datetime.date.today().isoformat()
    return (ROOT / "docs" / f"gpu-{slug}-{day}") if not dry else Path(f"gpu-check-dry-{day}")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, reduced width and depth: proves every row runs")
    ap.add_argument("--only", default=None, help="comma-separated rows (see --list)")
    ap.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S, help="stop before a row would pass this")
    ap.add_argument("--out", default=None, help="output path without suffix (.md and .json are written)")
    ap.add_argument("--list", action="store_true", help="print the rows in run order and exit")
    return ap.parse_args(argv)


def make_ctx(dry: bool) -> Ctx:
    if dry:
        torch.set_num_threads(1)       # tiny tensors: more threads only contend (CI machines are shared)
        return Ctx(torch.device("cpu"), True, None, f"CPU ({platform.processor() or platform.machine()})", None)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --dry for the CPU check")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    return Ctx(device, False, cuda_context_gib(device), name, card_peak(name))


def main(argv=None) -> int:
    args = parse(argv)
    rows = plan([n.strip() for n in args.only.split(",")] if args.only else None)
    if args.list:
        print("\n".join(name for name, _ in rows))
        return 0
    ctx = make_ctx(args.dry)
    # the engine's own trainee and generate setup, with random real-size weights in place of reading a file
    dit_setup.load = G.random_dit_loader(reduced=ctx.dry, calc_device=ctx.device)
    out = Path(args.out) if args.out else default_out(ctx.card, ctx.dry)
    meta = {"card": ctx.card, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "dry": ctx.dry, "torch": torch.__version__, "cuda": torch.version.cuda, "context_gib": ctx.context_gib,
            "peak_tflops": ctx.peak_tflops, "budget_s": args.budget_s,
            "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))}
    results, start, slowest = [], time.perf_counter(), FIRST_ROW_GUESS_S
    for name, preset in rows:
        elapsed = time.perf_counter() - start
        if elapsed + slowest > args.budget_s:
            results.append({"row": name, "phase": "", "estimate_gib": estimate_of(name, preset)[0],
                            "status": f"skipped: budget ({elapsed:.0f} of {args.budget_s:.0f} s used)"})
            continue
        print(f"[{elapsed:6.1f} s] {name} ...", file=sys.stderr, flush=True)
        row = measure(name, preset, ctx)
        slowest = max(slowest if results else 0, row["seconds"])
        results.append(row)
        write(out, meta, results)
    write(out, meta, results)
    print(markdown(meta, results))
    print(f"written: {out.with_suffix('.md')} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
