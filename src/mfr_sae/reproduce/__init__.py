"""Reproductions of the paper's experiments: `mfr-sae reproduce NAME`."""

from __future__ import annotations

import itertools
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from mfr_sae.checkpoint import load
from mfr_sae.config import ConfigError, RunConfig, load_run_config
from mfr_sae.report import fmt_duration, save_figure
from mfr_sae.run_folder import CONFIG_FILE, RESULTS_FILE
from mfr_sae.train import resume, train

HOW_WORDS = {"trained": "training", "resumed": "resuming", "reused": "reused"}


def run_status(cfg: RunConfig, run_dir: Path) -> str:
    """What to do with `run_dir`: "reused" (finished by an earlier invocation), "resumed" (an interrupted run,
    continued) or "trained" (a new run), so that reproductions can restart. A run folder whose
    saved config is not `cfg` is an error naming the first field that differs (never mixed)."""
    if (run_dir / CONFIG_FILE).is_file():
        differs = config_difference(load_run_config(run_dir / CONFIG_FILE), cfg)
        if differs:
            raise ConfigError(f"{run_dir} holds a run of another setting ({differs}): choose another --out")
    if (run_dir / RESULTS_FILE).is_file():
        return "reused"
    return "resumed" if run_dir.exists() else "trained"


def _carry_out(how: str, cfg: RunConfig, run_dir: Path, progress: bool) -> dict[str, Any]:
    """The run's results, by `how` (run_status)."""
    if how == "reused":
        results: dict[str, Any] = json.loads((run_dir / RESULTS_FILE).read_text())
        return results
    if how == "resumed":
        return resume(run_dir, progress=progress)
    return train(cfg, run_dir, progress=progress)


def time_left(seconds_per_run: float | None, remaining: int) -> str:
    """`, about 4.5 min left` for `remaining` runs at `seconds_per_run` each; "" without an estimate."""
    if seconds_per_run is None or remaining <= 0:
        return ""
    return f", about {fmt_duration(seconds_per_run * remaining)} left"


class RunTracker:
    """The runs of a reproduction or study, in order. Each is trained, resumed or reused (run_status),
    announced as `[name] training: DIR (run 3 of 12, about 4.5 min left)` or `[name] reused: DIR (...)`,
    and recorded with its own train_seconds for the report. The time left is estimated from the runs
    trained or resumed so far (reused ones take no time, so they would make it far too short)."""

    def __init__(self, total: int, root: Path, progress: bool = True, bars: bool | None = None):
        self.total, self.root, self.progress = total, Path(root), progress
        self.bars = progress if bars is None else bars
        self.records: list[dict[str, Any]] = []
        self.work_seconds: list[float] = []  # wall time of each run trained or resumed here

    def run(self, name: str, cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
        """Train, resume or reuse one run (run_status); its results."""
        how = run_status(cfg, run_dir)
        if self.progress:
            rate = float(np.mean(self.work_seconds)) if self.work_seconds else None
            done = len(self.records)
            print(
                f"[{name}] {HOW_WORDS[how]}: {run_dir} (run {done + 1} of {self.total}"
                f"{time_left(rate, self.total - done)})",
                flush=True,
            )
        started = time.perf_counter()
        results = _carry_out(how, cfg, run_dir, self.bars)
        if how != "reused":
            self.work_seconds.append(time.perf_counter() - started)
        self.records.append(
            {"run": name, "folder": self._folder(run_dir), "how": how, "train_seconds": results["train_seconds"]}
        )
        return results

    def _folder(self, run_dir: Path) -> str:
        try:
            return Path(run_dir).relative_to(self.root).as_posix()
        except ValueError:
            return str(run_dir)

    def summary(self) -> dict[str, Any]:
        """For results.json: the runs' total train_seconds (each run's own) and each run's record."""
        return {"train_seconds": round(sum(r["train_seconds"] for r in self.records), 1), "runs": self.records}


def describe_runs(runs: dict[str, Any], seconds: float) -> str:
    """A report's sentences on its runs (a RunTracker summary): their training time, how many were trained
    now, and which were resumed or reused from an earlier invocation; `seconds`: this invocation's time."""
    records = runs["runs"]
    by_how = {how: [r for r in records if r["how"] == how] for how in HOW_WORDS}
    trained = by_how["trained"]
    lines = [
        f"Runs: {len(records)}, {fmt_duration(runs['train_seconds'])} of training in all (the sum of each "
        f"run's own `train_seconds`, from its results.json). Trained now: {len(trained)}"
        + (f" ({fmt_duration(sum(r['train_seconds'] for r in trained))})." if trained else ".")
    ]
    for how, words in (
        (
            "resumed",
            "Resumed now from an earlier invocation's checkpoint (the time of each counts from that checkpoint on)",
        ),
        ("reused", "Reused from an earlier invocation, not trained now"),
    ):
        if by_how[how]:
            lines.append(f"{words}: {len(by_how[how])} (" + ", ".join(f"`{r['folder']}`" for r in by_how[how]) + ").")
    lines.append(f"This invocation took {fmt_duration(seconds)}.")
    return " ".join(lines)


def reinit_history(events: list[dict[str, Any]], member: int) -> dict[str, int | None]:
    """How often a member was re-initialised, and at which step last (None: never)."""
    steps = [e["step"] for e in events if e["member"] == member]
    return {"reinits": len(steps), "last_reinit_step": max(steps, default=None)}


# A member re-initialised in the last this share of its run ends barely trained: its numbers say little.
LATE_REINIT_SHARE = 0.2


def reinit_phrase(k: int, history: dict[str, Any], n_steps: int, seed: int | None = None) -> str:
    """`k=12 (seed 1) 10x, last at step 99 of 400` from a member's reinit_history (the seed only when given)."""
    label = f"k={k}" + (f" (seed {seed})" if seed is not None else "")
    return f"{label} {history['reinits']}x, last at step {history['last_reinit_step']} of {n_steps}"


def reinit_summary(events: list[dict[str, Any]], n_members: int, n_steps: int, ks: list[int]) -> str:
    """One sentence on a run's reinitialisations: per member how many and the last step, and a warning when
    a member's last one came in the last LATE_REINIT_SHARE of the run."""
    history = [reinit_history(events, i) for i in range(n_members)]
    if not events:
        return "No reinitialisation fired."
    parts = [reinit_phrase(k, h, n_steps) for k, h in zip(ks, history) if h["reinits"]]
    late = [
        k
        for k, h in zip(ks, history)
        if h["last_reinit_step"] is not None and n_steps - h["last_reinit_step"] < LATE_REINIT_SHARE * n_steps
    ]
    text = f"{len(events)} reinitialisation(s): {', '.join(parts)}."
    if late:
        text += (
            f" **The members with k={late} were re-initialised in the last {LATE_REINIT_SHARE:.0%} of "
            "training: their numbers measure barely trained SAEs, not the effect of the penalty.**"
        )
    return text


def config_difference(saved: RunConfig, wanted: RunConfig) -> str | None:
    """`section.field: saved != wanted` for the first field that differs, None when none does (data.d of a
    source that reads it from its data is the data's, so it is not compared)."""
    a, b = saved.to_dict(), wanted.to_dict()
    for section, fields in b.items():
        for name, value in fields.items():
            if section == "data" and name == "d" and wanted.data.kind != "synthetic":
                continue
            if a[section][name] != value:
                return f"{section}.{name}: {a[section][name]!r} there, {value!r} here"
    return None


def commit() -> str:
    """The repository's commit, when the package runs from a git checkout."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=10,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    return (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )


def relative_diff(a: float, b: float) -> float:
    """(a - b) / b in percent."""
    return 100 * (a - b) / b


def relative(a: float, b: float) -> str:
    """relative_diff as reports print it (3 significant digits)."""
    return f"{relative_diff(a, b):+.3g}%"


def decoder_distances(run_dir: Path) -> list[float]:
    """Paper Section 4.3: for each member, the mean L2 (Frobenius) distance of its decoder matrix to
    the other members' decoders (raw, without aligning latents, as in the paper)."""
    decoder = load(run_dir).decoder().detach()
    n = len(decoder)
    dist = torch.zeros(n, n)
    for a, b in itertools.combinations(range(n), 2):
        dist[a, b] = dist[b, a] = (decoder[a] - decoder[b]).norm()
    return (dist.sum(1) / (n - 1)).tolist()


def figure_distances(dist: dict[str, list[float]], ks: list[int], path: Path) -> None:
    """Bars of decoder_distances per member (one k each), baseline beside MFR."""
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(ks))
    for offset, (name, values) in zip((-0.2, 0.2), dist.items()):
        ax.bar(x + offset, values, width=0.4, label=name)
    ax.set_xticks(x, [f"k={k}" for k in ks])
    ax.set_ylabel("mean L2 distance to the other members")
    ax.set_title("Decoder distances between members (paper Section 4.3)", fontsize=10)
    ax.legend()
    save_figure(fig, path)
