"""Plain Python behind the Train tab (app/tabs/train.py): which options each kind of run shows, the config and
the exact command a form describes, run folders, and a running job's status line (its progress and memory bars are
app/views.py's, as on every tab).

No gradio and no torch here, so every rule is tested without a browser.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from app.context import accelerate_argv
from app.forms import gui_fields
from app.jobs import command_line, engine_argv
from app.views import error_markdown, shown_error
from engine.spec import launch, naming, run_outputs
from engine.spec import config as C
from engine.spec.options import FinetuneOptions, NetworkOptions

KINDS = {"train_network": C.TrainNetworkConfig, "train": C.TrainConfig}
KIND_CHOICES = [("LoRA (train_network)", "train_network"), ("Full finetune (train)", "train")]
NETWORK_FIELDS = [f.name for f in dataclasses.fields(NetworkOptions)]
FINETUNE_FIELDS = [f.name for f in dataclasses.fields(FinetuneOptions)]
# The order groups are shown in: what every run needs first; the rest under "More options".
ESSENTIAL_GROUPS = ("Model", "Dataset", "Network", "Finetune", "Optimizer", "Schedule", "Saving", "Samples",
                    "Memory", "Precision")


def group_names(group: str) -> list[str]:
    """The GUI fields of one option group, over both kinds (LoRA-only and finetune-only groups included)."""
    names: list[str] = []
    for cls in KINDS.values():
        names += [f.name for f in gui_fields(cls) if f.metadata["group"] == group and f.name not in names]
    return names


def all_groups() -> list[str]:
    """Every group with GUI fields: the essential ones in ESSENTIAL_GROUPS order, then the others as declared."""
    seen = list(dict.fromkeys(f.metadata["group"] for cls in KINDS.values() for f in gui_fields(cls)))
    return [g for g in ESSENTIAL_GROUPS if g in seen] + [g for g in seen if g not in ESSENTIAL_GROUPS]


def form_names() -> list[str]:
    """Every option widget of the Train tab, in the order the tab builds them and its events take them
    (after `kind` and `procs`): the groups of all_groups(), each in declaration order."""
    return [n for g in all_groups() for n in group_names(g)]


def kind_names(kind: str, names: list[str]) -> list[str]:
    """The subset of the tab's widgets that belong to this kind's config."""
    known = {f.name for f in gui_fields(KINDS[kind])}
    return [n for n in names if n in known]


# ------------------------------------------------------------------ launching

def accelerate_options(cfg, num_processes: int) -> list[str] | None:
    """`accelerate launch` options when the run needs accelerate (several GPUs or mixed precision), else None
    (plain `python -m engine` runs on one device)."""
    num_processes = 1 if num_processes in (None, "") else int(num_processes)
    if num_processes < 1:
        raise C.ConfigError(f"Processes (GPUs) = {num_processes}: must be 1 or more. Set it to the number of "
                            "GPUs to train on.")
    if num_processes == 1 and cfg.mixed_precision == "no":
        return None
    opts = ["--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", cfg.mixed_precision, "--dynamo_backend", "no"]
    return (["--multi_gpu"] if num_processes > 1 else []) + opts


def launch_argv(kind: str, cfg, num_processes: int, fsdp: bool = False) -> list[str]:
    """The exact argument list the job manager will run for this config (ctx.submit_config builds the same)."""
    C.check_no_plumbing(cfg, "this run")
    args = C.to_argv(cfg)
    opts = fsdp_options(kind, cfg, num_processes) if fsdp else accelerate_options(cfg, num_processes)
    return engine_argv(kind, args) if opts is None else accelerate_argv(kind, args, opts)


def launch_text(kind: str, cfg, num_processes: int, fsdp: bool = False) -> str:
    return command_line(launch_argv(kind, cfg, num_processes, fsdp))


# ------------------------------------------------------------------ several GPUs, sharded (FSDP)

def fsdp_config_path(cfg) -> Path:
    """The accelerate config of a sharded run, next to its outputs (docs/multi-gpu.md)."""
    return Path(cfg.output_dir) / f"{cfg.output_name}_{launch.FSDP_CONFIG_NAME}"


def fsdp_options(kind: str, cfg, num_processes) -> list[str]:
    """`accelerate launch --config_file <the run's FSDP config>`: "Several GPUs (FSDP)" (written by write_fsdp)."""
    num_processes = 1 if num_processes in (None, "") else int(num_processes)
    if kind != "train":
        raise C.ConfigError("Several GPUs (FSDP) shards a full finetune. A LoRA runs data-parallel: untick FSDP and "
                            "set Processes (GPUs).")
    if num_processes < 2:
        raise C.ConfigError(f"Several GPUs (FSDP) with Processes (GPUs) = {num_processes}: set it to the number of "
                            "GPUs (2 or more).")
    if not cfg.output_dir or not cfg.output_name:
        raise C.ConfigError("Several GPUs (FSDP): fill in output_dir and output_name first (the accelerate config "
                            "is written next to the outputs).")
    return ["--config_file", str(fsdp_config_path(cfg))]


def write_fsdp(kind: str, cfg, num_processes) -> Path:
    """Write the run's FSDP accelerate config (one machine, every process a GPU) before the job starts."""
    fsdp_options(kind, cfg, num_processes)
    fsdp_config_path(cfg).parent.mkdir(parents=True, exist_ok=True)
    return launch.write_fsdp_config(fsdp_config_path(cfg), num_processes=int(num_processes),
                                    mixed_precision=cfg.mixed_precision)


def run_toml_path(cfg) -> Path | None:
    """Where a run keeps its resolved config, next to its outputs (the engine writes it when the run starts)."""
    if not cfg.output_dir or not cfg.output_name:
        return None
    return naming.run_toml(cfg.output_dir, cfg.output_name)


def preflight(cfg) -> list[str]:
    """What must be fixed before a run can start, one line per problem (field, cause, fix). The engine checks
    the files in depth; this catches empty boxes and missing files before a job is queued."""
    problems = []
    for name in ("dit", "dataset_config", "output_dir", "output_name"):
        if not getattr(cfg, name):
            problems.append(f"`{name}` is empty: fill it in (the Models and Dataset tabs can provide it).")
    for name in ("dit", "vae", "text_encoder", "dataset_config", "sample_prompts", "network_weights", "resume"):
        value = getattr(cfg, name, None)
        if value and not Path(value).exists():
            problems.append(f"`{name}`: {value} does not exist. Fix the path or clear the box.")
    return problems


def name_conflict(cfg, views: list[dict]) -> tuple[str, str, bool] | None:
    """(message, a free name, whether overwriting is a way on) when this run would replace the outputs of another run with the same output name:
    files of an earlier run in its output folder (the engine refuses those too, engine/spec/run_outputs.py), or
    a training job with the same folder and name that is queued or running (its files do not exist yet). None
    when the name is free, or the run resumes or overwrites on purpose (a queued twin is refused even then: two
    runs would write the same files at once)."""
    if not cfg.output_dir or not cfg.output_name:
        return None
    target = (str(Path(cfg.output_dir).expanduser().resolve()), cfg.output_name)
    twins = [v for v in views if is_train_job(v) and v["status"] in ("queued", "running")
             and _output_of(v) == target]
    taken = {cfg.output_name} if twins else set()
    free = run_outputs.free_name(cfg.output_dir, cfg.output_name, taken | _queued_names(views, target[0]))
    if twins:
        return (f"A training run with the output name `{cfg.output_name}` in `{cfg.output_dir}` is already "
                f"{twins[0]['status']} (`{twins[0]['id']}`); a second one would write the same files.", free, False)
    if cfg.resume or cfg.overwrite:
        return None
    found = run_outputs.existing_outputs(cfg.output_dir, cfg.output_name)
    if not found:
        return None
    listed = ", ".join(f"`{p.name}`" for p in found[:4]) + (" …" if len(found) > 4 else "")
    return (f"`{cfg.output_dir}` already holds the outputs of a run named `{cfg.output_name}` ({listed}). "
            "Starting would replace them.", free, True)


def _output_of(view: dict) -> tuple[str, str] | None:
    out, name = arg_value(view["argv"], "output_dir"), arg_value(view["argv"], "output_name")
    return (str(Path(out).expanduser().resolve()), name) if out and name else None


def _queued_names(views: list[dict], folder: str) -> set[str]:
    return {o[1] for v in views if is_train_job(v) and v["status"] in ("queued", "running")
            and (o := _output_of(v)) is not None and o[0] == folder}


def load_run_toml(path: str, kind: str):
    """A run TOML as (kind, config). A file with options of the other kind (full_bf16 in a LoRA form, or
    network_dim in a finetune form) switches the kind instead of failing."""
    try:
        return kind, C.load_toml(KINDS[kind], path)
    except C.ConfigError as first:
        other = next(k for k in KINDS if k != kind)
        try:
            return other, C.load_toml(KINDS[other], path)
        except C.ConfigError:
            raise first from None


# ------------------------------------------------------------------ runs, checkpoints, states

def is_train_job(view: dict) -> bool:
    return view["command"] in KINDS


def default_run(views: list[dict]) -> str | None:
    """After a refresh: the newest running training job, else the newest training job."""
    runs = [v for v in views if is_train_job(v)]
    running = [v for v in runs if v["status"] in ("running", "queued")]
    return (running or runs or [{"id": None}])[0]["id"]


def arg_value(argv: list[str], name: str) -> str | None:
    flag = f"--{name}"
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


def checkpoints(view: dict) -> list[str]:
    """Saved weights of a run: checkpoint events, then the final outputs (newest last, no repeats). State
    folders are checkpoint events too; they are listed by states()."""
    paths = [c["path"] for c in view.get("checkpoints") or [] if c.get("path")]
    paths += (view.get("done") or {}).get("outputs") or []
    return list(dict.fromkeys(p for p in paths if str(p).endswith(".safetensors")))


def states(view: dict) -> list[str]:
    """State folders (`--save_state`) in the run's output folder, for --resume."""
    out = arg_value(view["argv"], "output_dir")
    if not out or not Path(out).is_dir():
        return []
    return sorted(str(p) for p in Path(out).iterdir() if naming.is_state_folder(p))


def handoff_key(command: str) -> str:
    """What a checkpoint is for the Generate tab: a LoRA file or a whole DiT."""
    return "generate.lora_weight" if command == "train_network" else "generate.dit"


# ------------------------------------------------------------------ status

def status_markdown(view: dict | None) -> str:
    if view is None:
        return "No training run yet. Start one above; it keeps running if you close or refresh the page."
    parts = [f"**{view['status']}**", f"`{view['id']}`"]
    if view.get("phase") and view["status"] == "running":
        parts.append(f"phase: {view['phase']}")
    metrics = view.get("metrics") or []
    metric = next((m for m in reversed(metrics) if m.get("loss") is not None), {})    # validation events carry none
    val = next((m for m in reversed(metrics) if m.get("val_loss") is not None), None)
    if metric.get("lr") is not None:
        parts.append(f"lr {metric['lr']:.3g}")
    if metric.get("loss") is not None:
        parts.append(f"loss {metric['loss']:.4g}")
    if metric.get("it_s") is not None:
        parts.append(f"{metric['it_s']:.2f} it/s")
    if val is not None:
        parts.append(f"validation {val['val_loss']:.4g} (step {val['step']})")
    text = " · ".join(parts)
    err = shown_error(view)
    if err:
        text += "\n\n" + error_markdown(err)
    elif view["status"] == "stopped":
        text += "\n\nStopped as asked."
    return text
