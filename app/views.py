"""What every tab shows about a job, drawn one way: its progress (a bar with "step/total unit · ETA"), its error
(kind, message and fix), times and durations, the loss chart's points, and the measured-against-estimated memory
bars. Each takes the job manager's view of a job (app/jobs.py: Job.view / JobManager.list).

Plain Python (no gradio), so every rule is tested without a browser.
"""

from __future__ import annotations

import html
import time

import pandas as pd

BAR_COLOR, OVER_COLOR, OK_COLOR = "#3b82f6", "#ef4444", "#10b981"


# ------------------------------------------------------------------ progress

def progress_label(view: dict) -> str:
    """"12/2000 step · ETA 1m02s" (the ETA while running), or the phase when the job has no step count yet."""
    p = view.get("progress") or {}
    if not p.get("total"):
        return view.get("phase") or ""
    text = f"{p.get('step')}/{p['total']} {p.get('unit') or ''}".strip()
    if p.get("eta_s") is not None and view.get("status") == "running":
        text += f" · ETA {fmt_duration(p['eta_s'])}"
    return text


def progress_html(view: dict | None, note: str = "", heading: bool = True) -> str:
    """The one progress view of a job: (with `heading`) its status, and its phase while running; a bar with
    progress_label; the run time once done; `note` (e.g. the measured memory) underneath. The outer element
    carries data-job and data-status, so a page (or a browser test) can wait for a state."""
    if view is None:
        return ""
    status, phase = view["status"], view.get("phase") or ""
    parts = [f"<b>{html.escape(status)}</b>"] if heading else []
    if heading and phase and status == "running":
        parts.append(html.escape(phase))
    p = view.get("progress") or {}
    bar = ""
    if p.get("total"):
        parts.append(html.escape(progress_label(view)))
        bar = bar_html(max(0.0, min(1.0, (p.get("step") or 0) / p["total"])), BAR_COLOR)
    done = view.get("done") or {}
    if done.get("seconds") is not None and status == "done":
        parts.append(f"{done['seconds']:.1f} s")
    if not parts and not bar:
        return ""
    text = " · ".join(parts) + (f"<br><small>{html.escape(note)}</small>" if note else "")
    return (f'<div data-job="{html.escape(str(view["id"]))}" data-status="{html.escape(status)}">'
            f"{bar}<div>{text}</div></div>")


def bar_html(frac: float, color: str, elem_id: str | None = None, label: str = "") -> str:
    """A thin horizontal bar filled to `frac` (0-1), with an optional label above it."""
    ident = f" id='{elem_id}'" if elem_id else ""
    head = f"<div style='font-size:0.9em'>{label}</div>" if label else ""
    return (f"<div{ident} style='margin:4px 0'>{head}<div style='background:#e5e7eb;border-radius:4px;height:10px'>"
            f"<div style='width:{frac * 100:.1f}%;background:{color};height:10px;border-radius:4px'></div></div></div>")


def gauge_html(view: dict | None, elem_prefix: str) -> str:
    """Measured VRAM/RAM (vram events) next to the engine's start-up estimate (estimate event)."""
    if view is None:
        return ""
    vram, est = view.get("vram") or {}, view.get("estimate") or {}
    if not vram and not est:
        return f"<div id='{elem_prefix}-gauge-empty'>VRAM/RAM: waiting for the first measurement.</div>"
    rows = [_gauge_row(elem_prefix, "VRAM", vram.get("allocated_gib"), vram.get("peak_gib"), est.get("vram_gib")),
            _gauge_row(elem_prefix, "RAM", vram.get("ram_gib"), vram.get("ram_gib"), est.get("ram_gib"))]
    if vram.get("device") == "cpu":      # the engine reports 0 VRAM when it computes on the CPU
        rows[0] = f"<div id='{elem_prefix}-gauge-vram'>VRAM: training on the CPU · estimate for a GPU " \
                  f"{est.get('vram_gib', 0):.1f} GiB</div>"
    return "".join(rows)


def _gauge_row(elem_prefix: str, label: str, now: float | None, peak: float | None, estimate: float | None) -> str:
    def gib(v):
        return "–" if v is None else f"{v:.2f} GiB"

    scale = max(v for v in (now, peak, estimate, 1e-9) if v is not None)
    frac = (peak if peak is not None else 0.0) / scale
    over = estimate is not None and peak is not None and peak > estimate
    text = f"{label}: now {gib(now)} · peak {gib(peak)} · estimate {gib(estimate)}" + (" ⚠️ above estimate" if over else "")
    return bar_html(frac, OVER_COLOR if over else OK_COLOR, f"{elem_prefix}-gauge-{label.lower()}", html.escape(text))


def status_line(view: dict) -> str:
    """One Markdown line: status, title, pid while running, phase, progress, exit code, memory while running."""
    parts = [f"**{view['status']}**", view["title"]]
    if view["pid"] and view["status"] == "running":
        parts.append(f"pid {view['pid']}")
    if view["phase"]:
        parts.append(f"phase: {view['phase']}")
    progress = progress_label(view)
    if progress:
        parts.append(progress)
    if view["exit_code"] is not None:
        parts.append(f"exit code {view['exit_code']}")
    if view.get("vram") and view["status"] == "running":
        parts.append("VRAM {allocated_gib:.1f} / peak {peak_gib:.1f} GiB, RAM {ram_gib:.1f} GiB".format(**view["vram"]))
    return " · ".join(parts)


# ------------------------------------------------------------------ errors

def shown_error(view: dict | None):
    """The error to show for a job: none while it runs or when it ended well, and none for a stop the person
    asked for (the engine reports it as an "interrupted" error event, but it is not a failure)."""
    if view is None or view["status"] not in ("failed", "stopped"):
        return None
    err = view.get("error")
    if view["status"] == "stopped" and (not err or err.get("kind") == "interrupted"):
        return None
    return err


def error_markdown(err) -> str:
    """An engine error — an `error` event's dict, or an EngineError raised in the app — as Markdown with its kind,
    message and fix: one look on every tab."""
    if isinstance(err, dict):
        kind, message, hint = err.get("kind") or "error", err.get("message") or "", err.get("hint") or ""
    else:
        kind = getattr(err, "kind", type(err).__name__)
        message, hint = getattr(err, "message", str(err)), getattr(err, "hint", "")
    return f"**Error [{kind}]:** {message}" + (f"\n\n**Fix:** {hint}" if hint else "")


# ------------------------------------------------------------------ times and charts

def fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def fmt_duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


VALIDATION_SERIES = {"val_loss": "validation", "val_loss_ema": "validation (EMA weights)"}


def loss_frame(metrics: list[dict], max_points: int = 2000, ema_beta: float = 0.9):
    """Raw loss and its EMA per step, thinned to at most `max_points` steps (the EMA is taken before thinning),
    and the validation loss (metric events with `val_loss` / `val_loss_ema`) as its own series."""
    points = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    rows, ema = [], None
    stride = max(1, len(points) // max_points)
    for i, (step, loss) in enumerate(points):
        ema = loss if ema is None else ema_beta * ema + (1 - ema_beta) * loss
        if i % stride == 0 or i == len(points) - 1:
            rows += [(step, loss, "loss"), (step, ema, f"EMA {ema_beta:g}")]
    for key, series in VALIDATION_SERIES.items():      # --validation_dataset_config: few points, all kept
        rows += [(m["step"], m[key], series) for m in metrics if m.get(key) is not None]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])
