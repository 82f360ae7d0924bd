"""Disk writes that never leave a partial file, and disk errors that name the path and the fix.

- `atomic_write_text(path, text)` / `atomic_write_bytes(path, data)`: a temp file in the same folder, fsync,
  os.replace, then the folder is fsynced: readers (and a run killed with -9 mid-write) see the old file or the
  whole new one, never a partial one. The run TOMLs, settings, jobs.json and dataset configs go through it;
  safetensors files use the same steps (engine/models/safetensors_io.py `atomic_output`).
- `disk_error(e, path=None, action="write")`: an OSError (disk full, no permission, read-only filesystem, path
  too long, I/O error ...) as a `DiskError` naming the path, the cause and the fix. The command dispatcher
  (engine/__main__.py) turns every OSError of a known kind into one, so a full disk in the middle of a save is
  one clear error event, not an "internal" one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from engine.spec.errors import EngineError


class DiskError(EngineError, OSError):
    """An OSError too, so code that handles OSError (cleanup, retries) still sees it as one."""
    kind = "disk"


# errno → (what happened, how to fix it). Anything else is reported with the OS's own words.
_CAUSES = {
    errno.ENOSPC: ("the disk is full", "Free disk space on that drive (or choose a folder on another drive), then "
                   "run again; nothing already saved was changed."),
    errno.EDQUOT: ("the disk quota is exhausted", "Free space within your quota or choose another folder."),
    errno.EACCES: ("permission denied", "Choose a folder you can write to, or change the permissions of this one."),
    errno.EPERM: ("the operation is not permitted", "Choose a folder you own, or change its permissions."),
    errno.EROFS: ("the filesystem is read-only", "Choose a folder on a writable drive."),
    errno.ENAMETOOLONG: ("the path is too long", "Use a shorter folder or output name."),
    errno.EFBIG: ("the file is larger than the filesystem or the process's file-size limit allows",
                  "Choose a folder on another filesystem, or raise the limit (ulimit -f)."),
    errno.EIO: ("an input/output error (the drive may be failing)", "Check the drive; copy your files elsewhere."),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "Fix the path."),
    errno.EISDIR: ("it is a folder, not a file", "Give a file path."),
    errno.EMFILE: ("too many open files", "Close other programs or raise the open-file limit (ulimit -n)."),
    errno.ENOENT: ("no such file or folder", "Check the path."),
    errno.EEXIST: ("it already exists", "Choose another name or remove it."),
    errno.ENOTEMPTY: ("the folder is not empty", "Remove or rename the folder."),
    errno.EXDEV: ("it is on another drive than its destination", "Keep the folder on one drive."),
}
KNOWN_ERRNOS = frozenset(_CAUSES)


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, its cause, or the one safetensors' Rust writer describes in its message
    ("I/O error: No space left on device (os error 28)", older versions "IoError(Os { code: 28, ... })"), which
    is not an OSError."""
    if isinstance(e, OSError):
        return e
    if isinstance(e.__cause__, OSError):
        return e.__cause__
    m = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", str(e))
    if m is None:
        return None
    code = int(m.group(1) or m.group(2))
    return OSError(code, os.strerror(code))


def disk_error(e: OSError, path: str | os.PathLike | None = None, action: str = "write") -> DiskError:
    """`e` as one clear error naming the path (the OSError's own filename when `path` is not given)."""
    where = path if path is not None else (e.filename if e.filename is not None else "a file")
    cause, fix = _CAUSES.get(e.errno, (e.strerror or str(e), "Check the path and the drive."))
    other = f" (while moving it to {e.filename2})" if getattr(e, "filename2", None) else ""
    code = f" [{errno.errorcode.get(e.errno, e.errno)}]" if e.errno is not None else ""
    return DiskError(f"cannot {action} {where}{other}: {cause}{code}.", fix)


@contextlib.contextmanager
def reporting(path: str | os.PathLike, action: str = "write") -> Iterator[None]:
    """Turn an OSError inside the block into a DiskError naming `path`."""
    try:
        yield
    except DiskError:
        raise
    except Exception as e:
        os_error = os_error_in(e)
        if os_error is None:
            raise
        raise disk_error(os_error, path, action) from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A hidden temp path beside `path` (`.<name>.tmp-<pid>-<random>`); when the block ends normally it is
    fsynced and renamed over `path`, otherwise removed. Disk errors name `path`."""
    path = Path(path)
    with reporting(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # pid in the name: a later run tells a killed writer's leftover from a live one (remove_dead_temps)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{suffix}-{os.getpid()}-")
        os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with reporting(path):
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp, reporting(path):
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable. Some filesystems (and Windows) cannot open a folder: then the data
    itself is already synced and that is the best there is."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
