"""The SHA-256 of a checkpoint's files, recorded beside them in digests.json when it is written (written last,
with the digest of its own listing) and checked by every reader (`check_digest`) and by `mfr-sae verify`
(`verify_checkpoint`). A checkpoint without one, written before digests were recorded, loads unchecked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mfr_sae.errors import CheckpointError
from mfr_sae.files import read_json, sha256, write_json

DIGESTS_FILE = "digests.json"  # beside the member folders: SAELens reads only what is inside one


def _listing_digest(files: dict[str, str]) -> str:
    """The SHA-256 of digests.json's own listing, so that damage to it is not blamed on a file it lists."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def record_digests(folder: Path) -> None:
    """Write folder/digests.json: the SHA-256 of every file in the folder as it was written (read back)."""
    files = {
        path.relative_to(folder).as_posix(): sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != DIGESTS_FILE
    }
    write_json(folder / DIGESTS_FILE, {"sha256": files, "listing_sha256": _listing_digest(files)})


def recorded_digests(folder: Path) -> dict[str, str]:
    """The SHA-256 recorded for each file of a checkpoint folder, by path inside it; {} for a checkpoint
    written before digests were recorded."""
    path = Path(folder) / DIGESTS_FILE
    if not path.is_file():
        return {}
    record = read_json(path)
    files = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(files, dict) or record.get("listing_sha256") != _listing_digest(files):
        raise CheckpointError(f"{path} is corrupt: the checkpoint's files cannot be checked against it")
    return files


def _digest_problem(folder: Path, name: str, digests: dict[str, str]) -> str | None:
    """What is wrong with file `name` of a checkpoint folder by its recorded SHA-256, in one line; None when
    it matches or none was recorded."""
    expected, path = digests.get(name), Path(folder) / name
    if expected is None:
        return None
    try:
        if sha256(path) == expected:
            return None
    except FileNotFoundError:
        return f"missing file: {path}"
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}"
    return f"{path} is corrupt: its SHA-256 is not the one recorded when the checkpoint was written"


def check_digest(folder: Path, name: str, digests: dict[str, str]) -> None:
    """CheckpointError naming file `name` of a checkpoint folder when it differs from its recorded SHA-256."""
    problem = _digest_problem(folder, name, digests)
    if problem is not None:
        raise CheckpointError(problem)


def verify_checkpoint(folder: Path) -> tuple[list[str], int]:
    """Every file of a checkpoint folder that has a recorded SHA-256 checked: the problems, one line each, and
    how many files have one (0: a checkpoint written before digests were recorded)."""
    try:
        digests = recorded_digests(folder)
    except CheckpointError as err:
        return [str(err)], 0
    problems = [problem for name in sorted(digests) if (problem := _digest_problem(folder, name, digests))]
    return problems, len(digests)
