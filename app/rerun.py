"""Run again: a recorded job rebuilt from the typed config of its command, never replayed as a command line.

The Jobs tab has no box for a command line or free-text engine options (an endpoint that ran any engine argv let
a web request append text to any file through --events_file). "Run again" reads the recorded arguments with the
command's own parser (engine.spec.config.build_parser), refuses the plumbing options the app sets itself
(engine.spec.config.PLUMBING_OPTIONS), validates the config, and submits it the way the tabs do: the new argument
list is written by to_argv from the config, so a recorded argument can never reach the engine as it stands.
"""

from __future__ import annotations

from app.train_runs import accelerate_options
from engine.spec import config as C
from engine.spec.commands import COMMANDS

TRAIN_KINDS = ("train_network", "train")


def typed_job(argv: list[str]) -> tuple[str, object, int]:
    """(command, its config, accelerate processes) of a recorded job's argument list; ConfigError if it is not an
    engine command whose options all parse."""
    if "-m" not in argv or len(argv) < argv.index("-m") + 3:
        raise C.ConfigError("this job's record is not an engine command.", "Start it from its tab instead.")
    at = argv.index("-m")
    command, args = argv[at + 2], argv[at + 3:]
    spec = COMMANDS.get(command)
    if spec is None:
        raise C.ConfigError(f"'{command}' is not an engine command, so it cannot be run again.",
                            "Start the job from its tab.")
    parser = C.build_parser(spec.config, prog=command)

    def refuse(message: str):
        raise C.ConfigError(f"this job's options do not parse: {message}.", "Start the job from its tab.")

    parser.error = refuse
    values = vars(parser.parse_args(args))
    cfg = C.from_dict(spec.config, values, source="the job record")
    C.check_no_plumbing(cfg, "the job record")
    C.validate(cfg)
    return command, cfg, num_processes(argv[:at])


def num_processes(launcher: list[str]) -> int:
    """accelerate's --num_processes in the launcher part of the argument list (1 for a plain python -m)."""
    if "--num_processes" in launcher:
        value = launcher[launcher.index("--num_processes") + 1:][:1]
        if value and value[0].isdigit():
            return int(value[0])
    return 1


def run_again(ctx, job_id: str):
    """Submit the job `job_id` again, rebuilt from its typed config; returns the new Job."""
    view = ctx.jobs.get(job_id) if job_id else None
    if view is None:
        raise C.ConfigError("no such job.", "Pick a job in the list first.")
    command, cfg, procs = typed_job(view["argv"])
    # the same launcher (accelerate or not) the Train tab uses for the same config and process count
    accelerate = accelerate_options(cfg, procs) if command in TRAIN_KINDS else None
    return ctx.submit_config(command, cfg, title=view["title"], accelerate=accelerate)
