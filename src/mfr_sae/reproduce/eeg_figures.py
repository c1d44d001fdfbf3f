"""The figures of `reproduce eeg` (the paper's Figure 10, a held-out window and the decoder distances
of Section 4.3), each a PNG beside report.md, with their captions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from mfr_sae.checkpoint import load
from mfr_sae.data.eeg import EEGData
from mfr_sae.report import save_figure
from mfr_sae.reproduce import figure_distances
from mfr_sae.reproduce.eeg_analysis import KS, values

# The report's figures: file (beside report.md) and caption.
FIGURES = {
    "mse": (
        "fig_mse_by_k.png",
        "MSE to the clean window on held-out data by k, baseline and MFR (mean ± sd over seeds; paper Figure 10).",
    ),
    "example": (
        "fig_denoising_example.png",
        "One held-out window of one channel (seed 0): the clean signal, the noisy input and the k=60 members' outputs.",
    ),
    "distance": (
        "fig_decoder_distance.png",
        "Mean L2 distance of each member's decoder to the other members' "
        "decoders, by k, baseline beside MFR (paper Section 4.3).",
    ),
}


def draw_figures(
    members: list[dict[str, Any]],
    dist: dict[str, list[float]],
    source: EEGData,
    run_dirs: dict[str, Path],
    out: Path,
) -> dict[str, Path]:
    """Every figure of FIGURES, saved in `out`; their paths by name. `dist`: each method's decoder
    distances by k; `source` and `run_dirs` (seed 0's run of each method): the held-out window's."""
    figures = {name: out / file for name, (file, _) in FIGURES.items()}
    figure_mse(members, figures["mse"])
    figure_distances(dist, KS, figures["distance"])
    figure_example(source, run_dirs, figures["example"])
    return figures


def figure_mse(members: list[dict[str, Any]], path: Path) -> None:
    """Paper Figure 10: MSE to the clean signal by k, baseline and MFR (mean and sd over seeds)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for mfr, label in ((False, "baseline"), (True, "MFR")):
        per_k = [values(members, mfr, k, "mse_clean") for k in KS]
        stats = np.array([[np.mean(v), np.std(v)] for v in per_k])
        ax.errorbar(KS, stats[:, 0], yerr=stats[:, 1], marker="o", capsize=3, label=label)
    ax.set_xlabel("k")
    ax.set_ylabel("MSE to the clean window (held out)")
    ax.set_title("EEG denoising: reconstruction error by k (paper Figure 10)", fontsize=10)
    ax.legend()
    save_figure(fig, path)


@torch.no_grad()
def figure_example(source: EEGData, run_dirs: dict[str, Path], path: Path) -> None:
    """One held-out window of one channel: clean, noisy input, and the k=60 members' outputs."""
    noisy, clean = source.eval_vectors(1)
    shape = source.window_shape
    channel = source.eeg.channels.index("Oz") if "Oz" in source.eeg.channels else 0
    t = np.arange(shape[1]) / source.eeg.sfreq
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, noisy[0].view(shape)[channel], color="0.75", lw=0.8, label="noisy input")
    ax.plot(t, clean[0].view(shape)[channel], color="black", lw=1.2, label="clean")
    for name, run_dir in run_dirs.items():
        ensemble = load(run_dir)
        x_hat = ensemble(noisy.to(ensemble.W_enc.device)).x_hat[KS.index(60), 0].cpu().view(shape)
        ax.plot(t, x_hat[channel], lw=1.0, label=f"{name}, k=60")
    ax.set_xlabel("seconds")
    ax.set_ylabel(f"{source.eeg.channels[channel]} (z-scored)")
    ax.legend(fontsize=8, ncol=4)
    save_figure(fig, path)
