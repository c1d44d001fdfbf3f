"""Files that survive a crash or a power cut: a reader sees the old file or the new one, never half of one.

Every module that writes a run's files (config, checkpoints, logs, results) writes through here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mfr_sae.errors import CheckpointError

# Why a file system refuses a write that the user can fix (no space, a quota, read-only, no permission): one
# line, not a traceback. Any other OSError is a bug, whose traceback is the report.
REFUSED_WRITE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})


def refused_write(err: BaseException) -> str | None:
    """For an OSError of REFUSED_WRITE, the line that names the file and the cause; None for any other error."""
    if not isinstance(err, OSError) or err.errno not in REFUSED_WRITE:
        return None
    verb = "access" if err.errno == errno.EACCES else "write"  # a read can be refused too
    where = "" if err.filename is None else f" {err.filename}"
    return f"could not {verb}{where}: {err.strerror or err}"


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError raised inside without a file name (a write or flush of an open file) names `path`."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


def fsync_file(path: Path) -> None:
    """Flush a written file's bytes to disk (safetensors' save_file does not)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it, a new file) durable; skipped where the platform or the
    file system cannot open or fsync a folder (Windows, some network file systems)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) beside path, then rename it into place. A failed write (a full disk...) leaves the old file as it
    was, removes its temporary copy and names `path` in its error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # a partial copy must not keep the space a retry needs
            tmp.unlink(missing_ok=True)
        err.filename, err.filename2 = str(path), None  # the file meant, not its temporary sibling
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of a text."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:  # this module's open: the tests' full disk replaces it
            f.write(text)

    atomic_write(path, write)


def read_json(path: Path) -> Any:
    """A run's JSON file (a checkpoint's, results.json); a CheckpointError naming it when missing or corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupt JSON in {path}: {err}") from None


def write_json(path: Path, data: Any) -> None:
    """data as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
