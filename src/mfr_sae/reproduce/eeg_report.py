"""report.md of `reproduce eeg`: the setup, the verdict and its test, the paper's Table 3 beside the
measured numbers, and links to the figures, from the summary that results.json holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mfr_sae.report import figure_link, fmt_mean_sd, fmt_num, fmt_p, markdown_table
from mfr_sae.reproduce import describe_runs, reinit_phrase, relative, relative_diff
from mfr_sae.reproduce.eeg_analysis import KS, ONE_SEED, snr_gains, values
from mfr_sae.reproduce.eeg_figures import FIGURES
from mfr_sae.stats import verdict

# Paper Table 3: reconstruction MSE of MFR and baseline by k, and its printed relative differences.
PAPER_MSE = {12: (0.42, 0.44), 24: (0.30, 0.32), 36: (0.26, 0.27), 48: (0.23, 0.23), 60: (0.21, 0.20)}
PAPER_DIFF = {12: -4.76, 24: -6.67, 36: -3.85, 48: 1.80, 60: 4.04}


def table_3(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By k, the paper's Table 3 beside the measured MSE, SNR out and SNR gain of both methods."""
    table = []
    for k in KS:
        mfr, base = values(members, True, k, "mse_clean"), values(members, False, k, "mse_clean")
        p_mfr, p_base = PAPER_MSE[k]
        # the paper's numbers as it prints them (str: not rounded like the measured ones)
        table.append(
            {
                "k": k,
                "paper MFR": str(p_mfr),
                "paper baseline": str(p_base),
                "paper diff": f"{PAPER_DIFF[k]:+.2f}%",
                "measured MFR": fmt_mean_sd(mfr),
                "measured baseline": fmt_mean_sd(base),
                "measured diff": relative(float(np.mean(mfr)), float(np.mean(base))),
                "SNR out MFR (dB)": fmt_mean_sd(values(members, True, k, "snr_out_db")),
                "SNR out baseline (dB)": fmt_mean_sd(values(members, False, k, "snr_out_db")),
                "SNR gain MFR (dB)": fmt_mean_sd(snr_gains(members, True, k)),
                "SNR gain baseline (dB)": fmt_mean_sd(snr_gains(members, False, k)),
            }
        )
    return table


def described(members: list[dict[str, Any]]) -> str:
    """The verdict's description over the (seed, k) pairs: mean relative difference, and how often MFR
    is lower."""
    mfr_all, base_all = [], []
    for k in KS:
        mfr_all += values(members, True, k, "mse_clean")
        base_all += values(members, False, k, "mse_clean")
    mean_diff = np.mean([relative_diff(m, b) for m, b in zip(mfr_all, base_all)])
    better = sum(m < b for m, b in zip(mfr_all, base_all))
    return (
        f"MFR vs baseline, MSE to the clean signal, described over the {len(mfr_all)} (seed, k) pairs: mean "
        f"relative difference {mean_diff:+.3g}% (paper: mean improvement 1.8%, i.e. about -1.8%); MFR lower in "
        f"{better} of {len(mfr_all)}."
    )


def tested(test: dict[str, Any]) -> str:
    """The test over seeds (eeg_analysis.mse_test) in a sentence; with one seed, why there is none."""
    if test["n"] < 2:
        return f"{ONE_SEED.capitalize()}; the per-k differences in the table below are descriptive."
    ci = test["ci95"]
    return (
        f"Test over the {test['n']} seeds (per seed, the mean over k of MFR - baseline MSE; the k "
        f"values of a seed are not independent replicates): mean difference {test['mean_diff']:+.3g}"
        + (f", 95% CI [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "")
        + f"; paired t-test p = {fmt_p(test['t_test_p'])}"
        + (f", Wilcoxon p = {fmt_p(test['wilcoxon_p'])}" if test["wilcoxon_p"] is not None else "")
        + f" (two-sided): {verdict(test, higher_is_better=False)}"
        + (f"; {test['note']}" if test["note"] and test["t_test_p"] is not None else "")
        + "."
    )


def reinits(s: dict[str, Any]) -> str:
    """Each MFR member's reinitialisations and the step of its last one, or "none"."""
    setting = s["setting"]
    n_steps = setting["n_samples"] // setting["batch_size"]
    mfr_members = sorted((m for m in s["members"] if m["mfr"]), key=lambda m: (m["seed"], m["k"]))
    phrases = [
        reinit_phrase(m["k"], m, n_steps, m["seed"] if s["seeds"] > 1 else None) for m in mfr_members if m["reinits"]
    ]
    return ", ".join(phrases) or "none"


def setup(s: dict[str, Any]) -> list[str]:
    """The paragraphs on the data and on the task and its setting."""
    members, rec, setting = s["members"], s["recordings"], s["setting"]
    snr_in = next((m["snr_in_db"] for m in members if m["snr_in_db"] is not None), None)
    files = "; ".join(
        f"`{Path(f['file']).name}` ({fmt_num(f['minutes'])} min, {f['windows']} windows)" for f in rec["files"]
    )
    return [
        f"Data `{s['data']}`: "
        f"{len(rec['files'])} recording(s), {files}; {rec['n_channels']} EEG channels, resampled to "
        f"{rec['sfreq']:g} Hz, band-pass 0.5-45 Hz (Butterworth order 5, zero phase), 1 s windows every "
        f"{setting['hop_s']:g} s, z-scored per "
        f"window and channel, d = {rec['n_channels'] * rec['window_samples']}. Training windows "
        f"{rec['train_windows']}, held-out windows {rec['holdout_windows']} (the last "
        f"{rec['holdout_fraction']:.0%} of each recording). "
        f"Skipped files: {len(rec['skipped'])}"
        + "".join(f"; `{Path(f['file']).name}`: {f['reason']}" for f in rec["skipped"])
        + ".",
        "",
        f"Task: denoising. Input = clean window + {s['noise']} noise at {s['snr_db']:g} dB SNR (exact per window; "
        f"held-out input SNR {fmt_num(snr_in)} dB); loss and scores against the "
        f"clean window. 5 baseline + 5 MFR TopK SAEs, h={setting['d_sae']}, k={KS}, batch "
        f"{setting['batch_size']}, lr 1e-3, {setting['n_samples']:,} vectors, MFR beta=auto "
        f"(= {', '.join(fmt_num(b) for b in s['beta'])}), warmup 100 steps, matches recomputed every "
        f"{setting['match_every']} steps; firing probabilities for the reinitialisation check over "
        f"{setting['reinit_samples']:,} vectors; {s['reinit_events']} reinitialisation(s): {reinits(s)}.",
        "",
        *(
            [
                "This is the `--quick` setting: a lower rate, a smaller h and far fewer vectors than the paper's, "
                "so the SAEs are not converged.",
                "",
            ]
            if s["quick"]
            else []
        ),
    ]


def write_report(out: Path, s: dict[str, Any], figures: dict[str, Path]) -> None:
    """DIR/report.md from the summary `s` (results.json's) and the figures' paths by name."""
    table = table_3(s["members"])
    lines = [
        "# Reproduction: MFR on EEG denoising (paper Section 4.2)",
        "",
        f"Generated by `mfr-sae reproduce eeg{' --quick' if s['quick'] else ''}` on {s['machine']}, {s['seeds']} "
        f"seed(s). {describe_runs(s['runs'], s['seconds'])}",
        "",
        *setup(s),
        "## Verdict",
        "",
        described(s["members"]),
        "",
        tested(s["mse_test"]),
        "",
        "## Table 3: MSE to the clean window (held out), by k",
        "",
        markdown_table(table, list(table[0])),
        "",
        "Measured values are mean ± sd over seeds; measured differences are (MFR - baseline) / baseline; "
        "the paper's, as printed, divide by the MFR value. The paper's data (TUH) and noise differ from "
        "these, so compare directions, not values.",
        "",
        figure_link(figures["mse"], FIGURES["mse"][1]),
        "",
        "## A held-out window (seed 0)",
        "",
        figure_link(figures["example"], FIGURES["example"][1]),
        "",
        "## Decoder distances (paper Section 4.3)",
        "",
        figure_link(figures["distance"], FIGURES["distance"][1]),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
