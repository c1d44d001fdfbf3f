"""What a run reports as it goes: metrics.jsonl, an optional Weights & Biases run, the progress bar's numbers
and the expected duration of a long run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mfr_sae.config import ConfigError
from mfr_sae.distributed import Shard
from mfr_sae.files import naming

ESTIMATE_AFTER_STEPS, ESTIMATE_AFTER_S = 5, 10.0  # when the duration of a run is estimated
ANNOUNCE_OVER_S = 120.0  # the estimate is printed when the rest of the run takes longer than this
_now = time.perf_counter  # the clock of the duration estimate (a test sets its own)


def require_wandb(project: str) -> None:
    """Fail before anything is written when a wandb project is asked for and wandb is missing."""
    if not project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("train.wandb_project is set but wandb is not installed (pip install wandb)") from None


class RunLog:
    """Appends records to metrics.jsonl (on rank 0; the other ranks write nowhere) and, with a wandb project,
    logs their numbers there too. The lines of the reinitialisation window (every step, Figure 7) wait here
    until the next record or checkpoint, so that their metrics are gathered from the ranks in one go."""

    def __init__(self, path: Path, shard: Shard, wandb_project: str = "", config: dict[str, Any] | None = None):
        self.shard, self.path = shard, path
        self.file = open(path if shard.is_main else os.devnull, "a")  # noqa: SIM115 (open for the run: close())
        self.window_lines: list[dict[str, Any]] = []
        self.wandb_run = None
        if wandb_project and shard.is_main:
            import wandb

            self.wandb_run = wandb.init(project=wandb_project, config=config, dir=str(path.parent))

    def add_window_line(self, step: int, logs: dict[str, Any]) -> None:
        """Keep this step's reinitialisation metric of this rank's members (and events), if it has one."""
        if "reinit_metric" in logs or "reinit" in logs:
            self.window_lines.append({"step": step, **{k: logs[k] for k in ("reinit_metric", "reinit") if k in logs}})

    def write(self, record: dict[str, Any] | None) -> None:
        """Write the pending window lines (one gather of all their metrics), then `record`; a window line of
        the record's step goes into the record. A collective: every rank calls it."""
        lines, self.window_lines = self.window_lines, []
        if lines:
            local = torch.stack([line["reinit_metric"] for line in lines], dim=1)  # [n, lines]
            for line, metric in zip(lines, self.shard.gather(local).T.tolist()):
                line["reinit_metric"] = metric
            if record is not None and lines[-1]["step"] == record["step"]:
                record.update(lines.pop())
        for line in lines + ([record] if record is not None else []):
            with naming(self.path):  # a full disk's error names no file
                self.file.write(json.dumps(line) + "\n")
            if self.wandb_run is not None:
                numbers = {k: v for k, v in line.items() if isinstance(v, (int, float))}
                self.wandb_run.log(numbers, step=line["step"])

    def flush(self) -> None:
        with naming(self.path):
            self.file.flush()

    def close(self) -> None:
        try:
            with naming(self.path):  # writes what is still buffered
                self.file.close()
        finally:
            if self.wandb_run is not None:
                self.wandb_run.finish()
                self.wandb_run = None


class DurationEstimate:
    """After the first steps (ESTIMATE_AFTER_STEPS past the first, or ESTIMATE_AFTER_S), the expected time of
    the rest of the run, as one line when it exceeds ANNOUNCE_OVER_S. The rate leaves out the first step
    (warm-up) when later ones were timed."""

    def __init__(self, step: int, n_steps: int):
        self.first, self.n_steps = step, n_steps
        self.start = self.after_first = _now()

    def after_step(self, step: int) -> str | None:
        """Called after each step: None until the estimate is made, then the line to print ("" for a short
        run); not called again after that."""
        now, done = _now(), step - self.first
        if done == 1:
            self.after_first = now
        timed = done - 1  # steps since the first one
        if timed < ESTIMATE_AFTER_STEPS and now - self.start < ESTIMATE_AFTER_S and step < self.n_steps:
            return None
        if timed and now > self.after_first:
            rate = timed / (now - self.after_first)
        else:
            rate = done / max(now - self.start, 1e-9)
        left = (self.n_steps - step) / rate
        if left <= ANNOUNCE_OVER_S:
            return ""  # short: nothing to say (and no more asking)
        return f"{self.n_steps - step:,} steps at {rate:.3g} steps/s: about {round(left / 60):,} minutes"


class TrainingProgress:
    """The progress bar of the training steps (shown or not), with the run's size in its first line and the
    expected duration of a long run after its first steps."""

    def __init__(self, step: int, n_steps: int, batch_size: int, show: bool):
        if show and step < n_steps:
            tqdm.write(
                f"{n_steps - step:,} steps of {batch_size:,} vectors"
                + (f" (from step {step:,} of {n_steps:,})" if step else "")
            )
        self.estimate = DurationEstimate(step, n_steps) if show else None
        self.bar = tqdm(total=n_steps, initial=step, desc="train", disable=not show, dynamic_ncols=True)

    def step_done(self, step: int) -> None:
        self.bar.update(1)
        if self.estimate is not None and (line := self.estimate.after_step(step)) is not None:
            if line:
                tqdm.write(line)
            self.estimate = None

    def show_record(self, record: dict[str, Any]) -> None:
        """Loss, mean L0, and the mean dead fraction of the members where measured."""
        postfix = {"loss": f"{record['loss']:.4g}", "l0": f"{sum(record['l0']) / len(record['l0']):.1f}"}
        dead = [d for d in record["dead_frac"] if d is not None]
        if dead:
            postfix["dead"] = f"{100 * sum(dead) / len(dead):.1f}%"
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()
