"""`python -m engine <command> [options]` — see `python -m engine --help`."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time

from engine.spec.commands import COMMANDS
from engine.spec.config import ConfigError, parse_args, validate
from engine.spec.diskio import KNOWN_ERRNOS, disk_error, os_error_in
from engine.spec.errors import EngineError
from engine.spec.events import EventLogHandler, EventWriter

# bitsandbytes looks for an optional CPU 4-bit kernel package ("kernels") when it is imported and warns when it is
# missing; nothing here uses 4-bit layers, so that warning would only clutter every job's log
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: python -m engine <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run `python -m engine <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command '{name}'.\n\n{usage()}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    try:
        cfg = parse_args(cmd.config, rest, prog=f"python -m engine {name}", description=cmd.summary)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stream = sys.stderr if cmd.prints_result(cfg) else None  # keep stdout for the command's result alone
    if launcher_rank() > 0:   # accelerate/torchrun worker: one voice per job (one start, one done, one events file);
        events = EventWriter(stream=sys.stderr, json_stdout=False)    # the others' lines and errors go to stderr
    else:
        try:
            events = EventWriter(stream=stream, events_file=getattr(cfg, "events_file", None))
        except OSError as e:            # the events file cannot be opened: say so once, as a refusal
            error = disk_error(e, cfg.events_file, "write the --events_file")
            print(f"error: {error}", file=sys.stderr)
            return 2
    return run_command(cmd, cfg, events, rest)


def launcher_rank() -> int:
    """This process's rank under a multi-process launcher (torchrun, accelerate launch, mpirun); 0 otherwise."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def restore_sigint() -> None:
    """Stop must work whoever started us: a process launched from a script or service with SIGINT ignored passes
    SIG_IGN on to its children, and then the Jobs tab's Stop (SIGINT) would do nothing and the run would only end
    by the kill after the timeout, without its save. The default handler raises KeyboardInterrupt, which every
    command handles (training saves first)."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:      # not the main thread (an embedding host): its handlers are its own
        pass


def run_command(cmd, cfg, events: EventWriter, argv: list[str]) -> int:
    restore_sigint()
    handler = EventLogHandler(events)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    started = time.time()
    events.start(cmd.name, argv, getattr(cfg, "config_file", None))
    try:
        validate(cfg)                   # every option's choices and declared range, as one error event
        module_name, func_name = cmd.target.split(":")
        outputs = getattr(importlib.import_module(module_name), func_name)(cfg, events)
    except EngineError as e:           # ConfigError included: an option the user can fix
        events.error(e.kind, e.message, e.hint)
        return 2
    except KeyboardInterrupt:
        events.error("interrupted", "stopped by the user")
        return 130
    except Exception as e:  # unexpected: keep the traceback in the log, one error event for the GUI
        os_error = os_error_in(e)
        if os_error is not None and os_error.errno in KNOWN_ERRNOS:   # disk full, no permission ...: the path
            error = disk_error(os_error)
            events.error(error.kind, error.message, error.hint)
            return 2
        logging.getLogger("engine").exception("unexpected failure")
        events.error("internal", f"{type(e).__name__}: {e}", "This is a bug; the log has the traceback.")
        return 1
    finally:
        root.removeHandler(handler)
    events.done(outputs or [], time.time() - started)
    events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
