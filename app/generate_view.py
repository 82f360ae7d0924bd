"""What the Generate / Edit tab shows about a job: its progress bar, the newest live preview, its results, and
the RCM / mask view.

Everything is rebuilt from the job manager's view and the job's event log, so a refreshed browser (or a second
one) sees the same thing. The view pictures (mask overlays, heatmap) are written once per job into
`<data_dir>/generate/views/<job id>/` and reused on later ticks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from app import presets_ui
from app import generate_media as M
from engine.spec import config as C
from engine.spec.controls import cover_crop
from engine.spec.errors import EngineError


@dataclass
class RunView:
    outputs: list[str] = field(default_factory=list)
    strip: list[tuple[str, str]] = field(default_factory=list)     # (picture, caption) per RCM step
    heatmap: str | None = None
    markdown: str = ""
    memory: str = ""                   # measured VRAM peak (vram events, CUDA) beside the estimate
    preview: tuple[str, str] | None = None     # the newest live preview (picture, label), --preview_every


def job_config(view: dict):
    """The GenerateImageConfig a job ran with, parsed back from its argument list (None if it cannot be)."""
    argv = view.get("argv") or []
    if "generate_image" not in argv:
        return None
    try:
        return C.parse_args(C.GenerateImageConfig, argv[argv.index("generate_image") + 1:], prog="generate_image")
    except (C.ConfigError, SystemExit):
        return None


def memory_text(view: dict, cfg) -> str:
    """The run's measured VRAM (the engine's `vram` events, CUDA only) beside the estimate: the job's own
    `estimate` event when it wrote one, else app/presets_ui's estimate of its config (pure Python)."""
    est = view.get("estimate")
    if est is None and cfg is not None:
        try:
            est = presets_ui.estimate_for("generate_image", cfg)
        except (C.ConfigError, EngineError):
            est = None
    parts = []
    vram = view.get("vram")
    if vram and vram.get("peak_gib") is not None:
        parts.append(f"VRAM peak {vram['peak_gib']:.1f} GiB measured")
    if est:
        parts.append(f"estimate {est['vram_gib']:.1f} GiB VRAM, {est['ram_gib']:.1f} GiB RAM")
    return " · ".join(parts)


def run_view(ctx, view: dict) -> RunView:
    run = M.read_run(ctx.jobs.log_path(view["id"]))
    folder = ctx.data_dir / "generate" / "views" / view["id"]
    out = RunView(outputs=list(run.outputs), preview=newest_preview(run, folder))
    cfg = job_config(view)
    out.memory = memory_text(view, cfg)
    if cfg is None or not cfg.control_image_path or not Path(cfg.control_image_path[0]).is_file():
        return out
    with Image.open(cfg.control_image_path[0]) as im:
        control = im.convert("RGB")
    size = _output_size(run, cfg)
    base = cover_crop(control, size)
    lines = []
    if run.rcm_steps:
        lines += ["| step | tokens still changing | mean difference | threshold |", "|---|---|---|---|"]
    for rec in run.rcm_steps:
        if not Path(rec.path).is_file():
            continue
        picture = folder / f"rcm_{rec.step:03d}.png"
        if not picture.exists():
            M.save_png(_for_display(M.overlay(base, M.load_mask_array(rec.path, size))), picture)
        share = M.changing_percent(rec.path)
        out.strip.append((str(picture), f"step {rec.step}: {share:.1f}% changing"))
        lines.append(f"| {rec.step} | {share:.1f}% | {rec.mean:.4f} | {rec.threshold:.4f} |")
    if cfg.rcm_threshold is not None and not run.rcm_steps and view["status"] == "done":
        lines.append("RCM ran without per-step masks: tick *Rcm debug save* to see them here.")
    if run.outputs and Path(run.outputs[0]).is_file():
        lines += _difference(out, run, cfg, control, folder)
    out.markdown = "\n".join(lines)
    return out


def newest_preview(run: M.RunFiles, folder: Path) -> tuple[str, str] | None:
    """The last preview the engine announced whose file is there (the user may have cleaned the folder), as a
    picture big enough to see (the demo's 64 px ones scaled up once into the view folder) and its label."""
    for ev in reversed(run.previews):
        path = Path(ev.path)
        if not path.is_file():
            continue
        picture = folder / f"preview_{path.name}"
        if not picture.exists():
            with Image.open(path) as im:
                M.save_png(_for_display(im.convert("RGB")), picture)
        label = f"Preview: the model's estimate at step {ev.step}/{ev.total}"
        return str(picture), label + (f", image {ev.index + 1}" if ev.index else "")
    return None


def _output_size(run: M.RunFiles, cfg) -> tuple[int, int]:
    if run.outputs and Path(run.outputs[0]).is_file():
        with Image.open(run.outputs[0]) as im:
            return im.size
    return cfg.image_size[1], cfg.image_size[0]


def _difference(out: RunView, run: M.RunFiles, cfg, control: Image.Image, folder: Path) -> list[str]:
    """Heatmap of |output − control 1| and how much changed where the run was told to keep the control."""
    with Image.open(run.outputs[0]) as im:
        output = im.convert("RGB")
    diff = M.difference(output, control)
    picture = folder / "heatmap.png"
    if not picture.exists():
        M.save_png(_for_display(M.heatmap(diff)), picture)
    out.heatmap = str(picture)
    keep, source = None, ""
    if cfg.mask_path and Path(cfg.mask_path).is_file():
        keep, source = M.load_mask_array(cfg.mask_path, output.size) < 0.5, "the painted mask's black region"
    elif run.rcm_steps and Path(run.rcm_steps[-1].path).is_file():
        keep, source = M.load_mask_array(run.rcm_steps[-1].path, output.size) < 0.5, "the last RCM step's kept region"
    lines = ["", f"Pixels changed (channel-mean difference > {M.CHANGED_TOLERANCE}/255), "
                 f"output `{Path(run.outputs[0]).name}` vs control 1:"]
    everywhere = M.changed_percent(diff, diff >= 0)
    lines.append(f"- whole image: **{everywhere:.1f}%**")
    if keep is not None:
        inside = M.changed_percent(diff, keep)
        outside = M.changed_percent(diff, ~keep)
        lines.append(f"- in {source} ({keep.mean() * 100:.1f}% of the image): **{_pct(inside)}**")
        lines.append(f"- in the rest: **{_pct(outside)}**")
    return lines


def _for_display(image: Image.Image, min_side: int = 256) -> Image.Image:
    """Tiny pictures (the demo's 64×64) scaled up by a whole factor with sharp pixels, so they can be read."""
    factor = -(-min_side // min(image.size))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _pct(x) -> str:
    return "n/a (empty region)" if x is None else f"{x:.1f}%"
