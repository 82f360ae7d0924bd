"""Jobs tab: every engine job (running, queued, finished), its log tail, its exact command line, stop / force kill,
run again.

There is no box for a command line: "Run again" rebuilds the job from its command's typed config (app/rerun.py),
so no request can hand the engine arguments of its own (docs/security.md).

Everything shown comes from the job manager on each timer tick, so a browser refresh (or a second browser)
sees the same jobs: nothing lives in a generator bound to one browser session.
"""

from __future__ import annotations

import gradio as gr

from app.jobs import FINAL
from app.rerun import run_again
from app.views import error_markdown, shown_error, fmt_time, loss_frame, progress_label, status_line
from engine.spec.config import ConfigError

TABLE_HEADERS = ["id", "status", "command", "progress", "started"]
POLL_S = 1.0
IDLE_POLL_S = 5.0      # shown with nothing running: still notice jobs that a script or another window starts


def build(ctx) -> None:
    jobs = ctx.jobs
    with gr.Tab("Jobs", id="jobs") as tab:
        # fixed widths that add up to the table's width, wrapped text: the last column is never cut off
        table = gr.Dataframe(headers=TABLE_HEADERS, value=lambda: table_rows(jobs.list()), interactive=False,
                             wrap=True, column_widths=["26%", "9%", "32%", "17%", "16%"],
                             elem_id="jobs-table", label="Jobs (newest first; click a row to follow it)")
        with gr.Row(equal_height=True):
            # allow_custom_value: a job id set by "Run" may arrive a tick before the refreshed choices
            selected = gr.Dropdown(label="Job", choices=[], value=None, allow_custom_value=True,
                                   elem_id="jobs-selected", scale=3)
            stop_btn = gr.Button("Stop", elem_id="jobs-stop", scale=1)
            kill_btn = gr.Button("Force kill", variant="stop", elem_id="jobs-kill", scale=1)
            again_btn = gr.Button("Run again", elem_id="jobs-again", scale=1)
        status = gr.Markdown(elem_id="jobs-status")
        loss_plot = gr.LinePlot(x="step", y="loss", color="series", height=260, label="Loss", visible=False,
                                buttons=["fullscreen", "export"], elem_id="jobs-loss")
        cmdline = gr.Textbox(label="Command line (exactly what runs; copy it to run it in a terminal)",
                             interactive=False, buttons=["copy"], elem_id="jobs-command")
        log = gr.Textbox(label="Log (last lines; the full log is in the file named above)", lines=18, max_lines=18,
                         autoscroll=True, interactive=False, buttons=["copy"], elem_id="jobs-log")
        signature = gr.State("")      # what this browser already has: resend the menu / plot only on change
        plotted = gr.State("")
        timer = gr.Timer(POLL_S, active=False)     # on only while this tab is shown (app/main.py); slower when idle

        def refresh(job_id, seen, seen_plot):
            views = jobs.list()
            choices = job_choices(views)
            sig = repr(choices)
            if job_id not in {c[1] for c in choices}:
                job_id = default_job(views)
            view = jobs.get(job_id) if job_id else None
            plot_sig = f"{job_id}:{len(view['metrics']) if view else 0}"
            text, command, tail = detail(jobs, view)
            out = {table: table_rows(views), signature: sig, status: text, cmdline: command, log: tail,
                   plotted: plot_sig, timer: poll_rate(views)}
            if sig != seen:
                out[selected] = gr.update(choices=choices, value=job_id)
            if plot_sig != seen_plot:
                out[loss_plot] = plot_update(view)
            return out

        outputs = [table, selected, signature, status, cmdline, log, loss_plot, plotted, timer]
        timer.tick(refresh, [selected, signature, plotted], outputs, show_progress="hidden",
                   concurrency_limit=None, api_name="jobs_refresh")
        selected.input(refresh, [selected, gr.State(""), gr.State("")], outputs, show_progress="hidden",
                       api_visibility="private")
        table.select(pick_row, None, selected, api_visibility="private")
        stop_btn.click(lambda j: act(jobs.stop, j, "stop requested"), selected, status, api_name="jobs_stop")
        kill_btn.click(lambda j: act(jobs.kill, j, "killed"), selected, status, api_name="jobs_kill")
        again_btn.click(lambda j: {**again(ctx, j, selected, status), timer: gr.Timer(active=True)}, selected,
                        [selected, status, timer], api_name="jobs_run_again")
        ctx.on_open(tab, "jobs", refresh, [selected, gr.State(""), gr.State("")], outputs)
        ctx.register_timer("jobs", timer, lambda: True)    # the rate follows the jobs (poll_rate)


def poll_rate(views: list[dict]):
    """Every second while a job runs; every IDLE_POLL_S otherwise, so the table still shows a job that a script,
    another browser window or the Run again of another tab starts (a few requests a minute, no busy page)."""
    busy = any(v["status"] not in FINAL for v in views)
    return gr.Timer(value=POLL_S if busy else IDLE_POLL_S, active=True)


def table_rows(views: list[dict]) -> list[list]:
    return [[v["id"], v["status"], v["title"], progress_label(v), fmt_time(v["started"] or v["queued_at"])]
            for v in views]


def job_choices(views: list[dict]) -> list[tuple[str, str]]:
    return [(f"{v['id']} ({v['status']})", v["id"]) for v in views]


def default_job(views: list[dict]) -> str | None:
    """The job to show when none is picked: the newest running one, else the newest."""
    running = [v for v in views if v["status"] == "running"]
    return (running or views or [{"id": None}])[0]["id"]


def pick_row(evt: gr.SelectData) -> str:
    return evt.row_value[0]


def detail(jobs, view: dict | None) -> tuple[str, str, str]:
    if view is None:
        return "No job yet. Jobs started from the other tabs appear here.", "", ""
    return status_text(view, jobs.log_path(view["id"])), view["cmdline"], "\n".join(view["tail"])


def plot_update(view: dict | None):
    frame = loss_frame(view["metrics"]) if view else None
    return gr.update(value=frame, visible=frame is not None and len(frame) > 0)


def status_text(v: dict, log_path) -> str:
    text = status_line(v) + f"\n\nFull log: `{log_path}`"
    outputs = (v.get("done") or {}).get("outputs") or []
    if outputs:
        text += "\n\nOutputs:\n" + "\n".join(f"- `{o}`" for o in outputs)
    err = shown_error(v)
    if err:
        text += "\n\n" + error_markdown(err)
    return text


def act(fn, job_id: str | None, done_text: str) -> str:
    if not job_id:
        return "Pick a job first."
    view = fn(job_id)
    return f"{job_id}: {done_text}; status now **{view['status']}**."


def again(ctx, job_id: str | None, selected, status) -> dict:
    """Queue the picked job once more, rebuilt from its typed config; a record that does not parse is refused."""
    if not job_id:
        return {status: "Pick a job first."}
    try:
        job = run_again(ctx, job_id)
    except ConfigError as e:
        return {status: "Not started. " + error_markdown(e)}
    return {selected: gr.update(value=job.id), status: f"Started **{job.id}** ({job.status}), again."}
