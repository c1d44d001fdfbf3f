"""A run folder: the files the trainer writes in it, and their care (a failed start removed, the log cut back
to the checkpoint a resume restarts from)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open

from mfr_sae import checkpoint as ckpt
from mfr_sae.config import RunConfig, save_config
from mfr_sae.distributed import Shard
from mfr_sae.files import atomic_write_text
from mfr_sae.process_group import world_from_env

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
LOCK_FILE = ".lock"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite data or loss, a run folder in the way); one-line message."""


def run_paths(run_dir: Path) -> list[Path]:
    """Everything the trainer writes in a run folder: its files, their temporary siblings (atomic writes) and
    the checkpoint folder with its temporary siblings (the folder `wandb/` of wandb is not the trainer's)."""
    names = (CONFIG_FILE, METRICS_FILE, RESULTS_FILE)
    return (
        [run_dir / name for name in names]
        + [run_dir / f".{name}.tmp" for name in names]
        + [run_dir / f"{ckpt.CHECKPOINT_DIR}{suffix}" for suffix in ("", ".tmp", ".old")]
    )


def remove_paths(paths: list[Path]) -> None:
    """Delete these files and folders (a link itself, never what it points to); missing ones are skipped."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an OS lock on a run folder (fcntl.flock on run_dir/.lock, which holds this process's id) while a
    training or a resume uses it, so that a second process is refused in one line naming the first. The OS
    releases the lock when the process ends, however it ends: a kill leaves no stale lock (only the file, which
    the next holder takes over). Released, the lock file goes, and the folder too when it was made for the lock
    and nothing else was written in it. Under torchrun rank 0 holds it for the whole run; the other ranks
    take none."""
    if world_from_env()[0] != 0:
        yield
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"{run_dir} is a file, not a run folder: choose another --out")
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        user = handle.read().strip() or "?"
        handle.close()
        raise TrainingError(
            f"{run_dir} is in use by process {user} (a training or resume of it); nothing was changed: wait for "
            "it to end, or stop it"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: no other process can have taken it meanwhile
        handle.close()  # releases the lock
        if made:
            with contextlib.suppress(OSError):  # not empty: the run's files stay
                run_dir.rmdir()


def holds_run(run_dir: Path) -> bool:
    return (run_dir / CONFIG_FILE).exists() or ckpt.checkpoint_dir(run_dir) is not None


def remove_failed_start(run_dir: Path, created: list[Path]) -> None:
    """A new run that fails before its first checkpoint leaves nothing that would block a retry: the files
    it created go, and its folder when it created it (`created[0]`) and nothing else is in it."""
    if not created or ckpt.checkpoint_dir(run_dir) is not None:
        return
    folder = created[0] if created[0] == run_dir else None
    remove_paths(
        [path for path in created if path != folder]
        + [run_dir / f".{CONFIG_FILE}.tmp", run_dir / f"{ckpt.CHECKPOINT_DIR}.tmp"]
    )
    if folder is not None and not any(folder.iterdir()):
        folder.rmdir()


def start_new_run(run_dir: Path, cfg: RunConfig, shard: Shard, overwrite: bool = False) -> list[Path]:
    """Write a new run's config and empty log (rank 0); return what was created (the folder first when it was
    made), for `remove_failed_start`. A folder that holds another run is an error, or with `overwrite` is first
    cleared of that run's files (`run_paths`, nothing else)."""
    if overwrite:
        if shard.is_main and run_dir.is_dir():
            remove_paths(run_paths(run_dir))
        shard.barrier()  # cleared before any rank looks
    if holds_run(run_dir):
        raise TrainingError(
            f"{run_dir} already holds a run: continue it with --resume {run_dir}, replace it with --overwrite, "
            "or choose another --out"
        )
    shard.barrier()  # every rank has looked before rank 0 writes
    created: list[Path] = []
    if shard.is_main:
        if not run_dir.exists():
            run_dir.mkdir(parents=True)
            created.append(run_dir)
        created += [run_dir / CONFIG_FILE, run_dir / METRICS_FILE]
        save_config(cfg, run_dir / CONFIG_FILE)
        (run_dir / METRICS_FILE).write_text("")
    return created


def checkpoint_step(folder: Path) -> int | None:
    """The step of a checkpoint, from its trainer state's metadata only (None when unreadable)."""
    try:
        with safe_open(Path(folder) / ckpt.STATE_FILE, "pt") as f:
            step: int | None = json.loads((f.metadata() or {}).get("meta", "{}")).get("step")
            return step
    except Exception:
        return None


def is_finished(run_dir: Path, n_steps: int) -> bool:
    """results.json written and the checkpoint at the last step."""
    folder = ckpt.checkpoint_dir(run_dir)
    return (run_dir / RESULTS_FILE).is_file() and folder is not None and checkpoint_step(folder) == n_steps


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a resume restarts from, and a last line cut off by a kill
    (the log is flushed at every checkpoint, so only lines after it can be partial)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise TrainingError(f"{path}: line {number} is not JSON") from None
        if record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
