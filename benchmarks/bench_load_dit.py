"""Peak RAM and wall time of our DiT loader vs a raw `safetensors.torch.load_file` of the same file.

Synthesises a single-file DiT with the real architecture's widths (full-size blocks, top-level layers, bf16,
ComfyUI `model.diffusion_model.` prefix, `config` metadata with num_layers = --blocks), then measures, each in
a fresh subprocess after the same imports:
  ours — `engine.models.dit.load_dit(file, device="cpu", dtype=torch.bfloat16)` (checks + meta build + load)
  raw  — `safetensors.torch.load_file(file)` (just the tensors, mmap-based), then one byte of every page
         touched so the weights are really resident (load_file alone maps the file lazily)
plus three references: raw_copy (load_file, then the weights copied into process memory), read (our reader
alone: every tensor read, no model) and build (constructing the diffusers module on meta, RoPE tables
included). It prints peak RSS relative to the file size and time ratios. Goals: the loader's own peak RSS
(above what the process held after imports) ≤ 1.15 × file size; time ≤ 1.3 × raw. The page cache is warmed first and
the runs alternate, best of --repeats. The synthetic file is deleted afterwards.

Run: `python benchmarks/bench_load_dit.py [--blocks 2] [--repeats 2] [--dir /tmp]`.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PREFIX = "model.diffusion_model."

# Runs in the child: imports first, baseline RSS, then the timed step; prints one JSON line.
CHILD = r"""
import json, resource, sys, time
import torch
import safetensors.torch
from diffusers import QwenImageTransformer2DModel  # every run pays the same imports before the clock starts
from engine.models.dit import load_dit, PUBLISHED_DIT_CONFIG
from engine.models import common, safetensors_io

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

which, path = sys.argv[1], sys.argv[2]
base = rss_kib()
t = time.perf_counter()
if which == "ours":
    out = load_dit(path, "original", "cpu", dtype=torch.bfloat16)
    n = sum(p.numel() for p in out.parameters())
elif which == "build":   # only building the diffusers module on meta (RoPE tables included), no weights
    out = common.build_empty(QwenImageTransformer2DModel, common.config_from_metadata(path))
    n = 0
elif which == "read":    # I/O floor of any copying loader: every tensor read, nothing else
    out = dict(safetensors_io.iter_tensors([path]))
    n = sum(v.numel() for v in out.values())
else:
    out = safetensors.torch.load_file(path)
    # load_file maps the file lazily; touch one byte per page so the weights are really resident, as they
    # are after our loader (otherwise "raw" measures only the header parse).
    for v in out.values():
        if v.numel():
            v.reshape(-1).view(torch.uint8)[::4096].sum()
    if which == "raw_copy":  # the weights copied into process memory, as a loader that owns them must
        out = {k: v.clone() for k, v in out.items()}
    n = sum(v.numel() for v in out.values())
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
print(json.dumps({"which": which, "seconds": seconds, "base_kib": base, "peak_kib": peak, "params": n}))
"""


def synthesise(path: Path, blocks: int) -> int:
    """Write the file tensor by tensor (header first), so making it needs one tensor of RAM at a time."""
    import torch

    from engine.models.common import build_empty
    from engine.models.dit import PUBLISHED_DIT_CONFIG, dit_class

    config = {**PUBLISHED_DIT_CONFIG, "num_layers": blocks}
    shapes = {PREFIX + k: tuple(v.shape) for k, v in build_empty(dit_class(), config).state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"config": json.dumps(config)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)                          # keep the data section 8-byte aligned
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return path.stat().st_size


KINDS = ("raw", "raw_copy", "read", "build", "ours")


def measure(which: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2, help="full-size transformer blocks (~0.68 GB each in bf16)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write the synthetic file (default: system temp)")
    args = ap.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench_load_dit_", dir=args.dir))
    path = folder / "qwen_image_bench_bf16.safetensors"
    try:
        size = synthesise(path, args.blocks)
        print(f"synthetic DiT: {args.blocks} full-size blocks, {size / 2**30:.3f} GiB, {path}")
        warm_page_cache(path)
        runs: dict[str, list[dict]] = {w: [] for w in KINDS}
        for _ in range(args.repeats):
            for which in KINDS:
                runs[which].append(measure(which, path))
        report(runs, size)
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def report(runs: dict[str, list[dict]], size: int) -> None:
    best = {w: min(r, key=lambda x: x["seconds"]) for w, r in runs.items()}
    rows = {}
    for which in KINDS:
        peak = max(r["peak_kib"] for r in runs[which]) * 1024
        own = max((r["peak_kib"] - r["base_kib"]) for r in runs[which]) * 1024
        rows[which] = (best[which]["seconds"], own)
        times = ", ".join(f"{r['seconds']:.3f}" for r in runs[which])
        print(f"{which:>4}: best {best[which]['seconds']:.3f} s of {len(runs[which])} "
              f"(all: {times}); process peak RSS "
              f"{peak / 2**30:.3f} GiB = {peak / size:.3f} x file; loader's own peak (above post-import RSS) "
              f"{own / 2**30:.3f} GiB = {own / size:.3f} x file; params {best[which]['params']:,}")
    (t_ours, m_ours), (t_raw, m_raw) = rows["ours"], rows["raw"]
    print(f"ours own peak RSS / file size: {m_ours / size:.3f} (goal <= 1.15); raw load_file: {m_raw / size:.3f}")
    print(f"ours/raw time ratio: {t_ours / t_raw:.2f} (goal <= 1.3; raw maps page-cache pages without copying)")
    print(f"ours/raw_copy time ratio: {t_ours / rows['raw_copy'][0]:.2f} (weights copied into process memory)")
    print(f"ours/read time ratio: {t_ours / rows['read'][0]:.2f}; ours minus module construction "
          f"({rows['build'][0]:.3f} s) vs read: {(t_ours - rows['build'][0]) / rows['read'][0]:.2f}")


if __name__ == "__main__":
    main()
