"""What `reproduce eeg` measures from its members: each member's numbers by method and k, the test of
MFR against baseline over seeds, and the descriptive differences by k."""

from __future__ import annotations

from typing import Any

import numpy as np

from mfr_sae.stats import paired_test

KS = [12, 24, 36, 48, 60]
# The numbers of each member that results.json keeps (beside its seed, method and reinitialisations).
MEMBER_KEYS = ("k", "mse_clean", "snr_in_db", "snr_out_db", "fvu", "l0", "dead_frac")
ONE_SEED = "one seed: no test; the k values are not independent replicates"


def of(members: list[dict[str, Any]], mfr: bool, k: int) -> list[dict[str, Any]]:
    """The members of one method and one k, in seed order."""
    return [m for m in sorted(members, key=lambda m: m["seed"]) if m["mfr"] == mfr and m["k"] == k]


def values(members: list[dict[str, Any]], mfr: bool, k: int, key: str) -> list[float]:
    """One value per seed, in seed order."""
    return [m[key] for m in of(members, mfr, k)]


def snr_gains(members: list[dict[str, Any]], mfr: bool, k: int) -> list[float | None]:
    """SNR improvement in dB (output SNR - input SNR) per seed; None where the input is clean."""
    return [None if m["snr_in_db"] is None else m["snr_out_db"] - m["snr_in_db"] for m in of(members, mfr, k)]


def seed_means(members: list[dict[str, Any]], mfr: bool, seeds: int, key: str = "mse_clean") -> list[float | None]:
    """Per seed, the mean over the k values of one method's `key` (None where a seed has none)."""
    out = []
    for seed in range(seeds):
        vals = [m[key] for m in members if m["seed"] == seed and m["mfr"] == mfr and m[key] is not None]
        out.append(float(np.mean(vals)) if vals else None)
    return out


def mse_test(members: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
    """MFR vs baseline on the MSE to the clean signal, tested over seeds (the replicates): per seed, the
    mean over k of each method's MSE, paired by seed (so the tested difference is the per-seed mean
    over k of MFR - baseline). The k values of one seed share data, noise and seed, so they are not
    replicates; with one seed there is no test."""
    mfr, base = seed_means(members, True, seeds), seed_means(members, False, seeds)
    test = paired_test(mfr, base)
    if test["n"] == 1:
        test["note"] = ONE_SEED
    return {
        "unit": "seed",
        "statistic": "per seed: mean over k of MSE to the clean window, MFR - baseline",
        "mfr_per_seed": mfr,
        "baseline_per_seed": base,
        **test,
    }


def mse_by_k(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Descriptive, by k: the mean over seeds of each method's MSE and their difference (no test)."""
    rows = []
    for k in KS:
        mfr, base = values(members, True, k, "mse_clean"), values(members, False, k, "mse_clean")
        m, b = float(np.mean(mfr)), float(np.mean(base))
        rows.append({"k": k, "mfr": m, "baseline": b, "diff": m - b, "relative_diff": (m - b) / b})
    return rows
