"""Files that survive a crash or a power cut: a reader sees the old file or the new one, never half of one.

Every module that writes a run's files (config, checkpoints, logs, results) writes through here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write text beside path, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    """data as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
