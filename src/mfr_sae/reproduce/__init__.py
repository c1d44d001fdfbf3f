"""Reproductions of the paper's experiments: `mfr-sae reproduce NAME`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mfr_sae.config import RunConfig
from mfr_sae.train import RESULTS_FILE, resume, train


def train_or_reuse(cfg: RunConfig, run_dir: Path, progress: bool) -> dict[str, Any]:
    """A finished run's results, an interrupted run resumed, or a new run: reproductions can restart."""
    if (run_dir / RESULTS_FILE).is_file():
        return json.loads((run_dir / RESULTS_FILE).read_text())
    if run_dir.exists():
        return resume(run_dir, progress=progress)
    return train(cfg, run_dir, progress=progress)
