"""The analysis of `mfr-sae study` (study.py runs it): on each dataset, every setting against the baseline of the
same replicates (paired tests, Holm within each measure's family) and which settings beat it; Holm again over
every held-out MCC test (`correct_across_datasets`); the setting the tuning splits pick (`choose`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mfr_sae.run_report import COLLAPSE_MMCS
from mfr_sae.stats import ALPHA, holm, paired_permutation_test, paired_test, set_aside, t_half_width
from mfr_sae.study_catalogue import BASELINE, BENCHMARK_MEASURES, CONSENSUS, MEASURES, RUN_MEASURES

# "without losing FVU": the 95% CI of the FVU difference stays below 1% of the baseline's FVU
FVU_MARGIN = 0.01
# a setting fit to be the default also keeps its members' twin fraction within this of the baseline's
TWIN_TOLERANCE = 0.02
# What a test against the baseline reports, with no p, when the setting's numbers are the baseline's in every
# replicate (stats.set_aside): p = 1 would say nothing, and it is not counted in any Holm family.
IDENTICAL = "identical to the baseline"


def choose(*tunings: dict[str, Any]) -> str | None:
    """The setting the tuning splits pick (one per tuning dataset, each `analyse`d): of the settings fit on
    every one (FVU not worse, twin_frac near the baseline's, no collapse) and gaining MCC on every one, those
    that beat the baseline on every one if any (too few tuning replicates may prove nothing, yet the held-out
    split judges the pick), and of those the largest smallest gain; else None."""
    names = [n for n in tunings[0]["rows"] if n != BASELINE]

    def fit(name: str, rows: dict[str, Any]) -> bool:
        row, gain = rows[name], rows[name]["tests"]["gt_mcc"]["mean_diff"]
        return row["fvu_not_worse"] and row["twin_ok"] and not row["collapsed"] and gain is not None and gain > 0

    safe = [n for n in names if all(fit(n, t["rows"]) for t in tunings)]
    proven = [n for n in safe if all(t["rows"][n]["beats_baseline"] for t in tunings)]
    smallest_gain = {n: min(t["rows"][n]["tests"]["gt_mcc"]["mean_diff"] for t in tunings) for n in safe}
    return max(proven or safe, key=lambda n: smallest_gain[n]) if safe else None


def correct_across_datasets(analysed: dict[str, dict[str, Any]]) -> None:
    """Holm over every held-out MCC test (each setting on each dataset; one without a p, such as a setting
    identical to the baseline, not counted): `p_holm_all` beside each test's p_holm, and `beats_baseline`
    judged by it."""
    tests = [(name, setting) for name, data in analysed.items() for setting in data["rows"] if setting != BASELINE]
    adjusted = holm([analysed[n]["rows"][s]["tests"]["gt_mcc"]["t_test_p"] for n, s in tests])
    for (name, setting), p in zip(tests, adjusted):
        row = analysed[name]["rows"][setting]
        row["tests"]["gt_mcc"]["p_holm_all"] = p
        row["beats_baseline"] = bool(row["beats_baseline"] and p is not None and p < ALPHA)
    for data in analysed.values():
        rows = data["rows"]
        winners = [n for n in data["winners"] if rows[n]["beats_baseline"]]
        data.update(
            winners=winners,
            best=winners[0] if winners else None,
            recommended=next((n for n in winners if rows[n]["twin_ok"] and not rows[n]["collapsed"]), None),
        )


def describe(values: list[float]) -> dict[str, Any]:
    """Mean, sd and t-based 95% interval of the mean over replicates."""
    arr = np.asarray(values, float)
    mean = float(arr.mean())
    if len(arr) < 2:
        return {"mean": mean, "sd": None, "ci95": None}
    sd = float(arr.std(ddof=1))
    half = t_half_width(sd, len(arr))
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def analyse(data: dict[str, Any], replicates: int) -> dict[str, Any]:
    """Every setting against the baseline of the same replicates: paired t-tests of the run measures, the
    permutation test of agreement across replicates, Holm's correction within each measure's family (the
    settings compared; a test whose arms are identical is said so, `not_tested`, and not counted), which
    settings beat the baseline on MCC without losing FVU (`winners`, largest gain first), and the first of
    them whose twin fraction stays within TWIN_TOLERANCE of the baseline's (`recommended`: fit to be the
    default)."""
    values, names = data["values"], [n for n in data["values"] if n != BASELINE]
    base = values[BASELINE]
    rows: dict[str, dict[str, Any]] = {n: {"measures": {k: describe(v) for k, v in values[n].items()}} for n in values}
    base_across = np.asarray(data["baseline_agreement"])
    rows[BASELINE]["measures"]["across_pw_mcc"] = (
        describe([float(np.nanmean(np.delete(base_across[r], r))) for r in range(replicates)])
        if replicates > 1
        else None
    )
    measured = [key for key in (*MEASURES, *BENCHMARK_MEASURES, *RUN_MEASURES, CONSENSUS) if key in base]
    for name in names:  # a test whose arms are identical has no p: no Holm family counts it (set_aside)
        tests = {key: set_aside(paired_test(values[name][key], base[key]), IDENTICAL) for key in measured}
        matrix = np.asarray(data["agreement"][name])
        tests["across_pw_mcc"] = set_aside(paired_permutation_test(matrix, replicates), IDENTICAL)
        own = matrix[:replicates, :replicates]
        rows[name]["measures"]["across_pw_mcc"] = (
            describe([float(np.nanmean(np.delete(own[r], r))) for r in range(replicates)]) if replicates > 1 else None
        )
        rows[name]["tests"] = tests
    for key in (*measured, "across_pw_mcc"):
        p_key = "p" if key == "across_pw_mcc" else "t_test_p"
        for name, adjusted in zip(names, holm([rows[n]["tests"][key][p_key] for n in names])):
            rows[name]["tests"][key]["p_holm"] = adjusted
    base_fvu = float(np.mean(base["fvu"]))
    for name in names:
        tests = rows[name]["tests"]
        mcc, fvu = tests["gt_mcc"], tests["fvu"]
        fvu_high = fvu["ci95"][1] if fvu["ci95"] else None
        rows[name]["fvu_not_worse"] = fvu_high is not None and fvu_high <= FVU_MARGIN * base_fvu
        twin = tests["twin_frac"]["mean_diff"]
        rows[name]["twin_ok"] = twin is not None and abs(twin) <= TWIN_TOLERANCE
        # members that became copies of one another in any replicate: never fit to be the default
        rows[name]["collapsed"] = any(v > COLLAPSE_MMCS for v in values[name].get("pairwise_mmcs_hungarian", []))
        rows[name]["beats_baseline"] = bool(
            rows[name]["fvu_not_worse"]
            and mcc["mean_diff"] is not None
            and mcc["mean_diff"] > 0
            and mcc["p_holm"] is not None
            and mcc["p_holm"] < ALPHA
        )
    winners = sorted(
        (n for n in names if rows[n]["beats_baseline"]), key=lambda n: -rows[n]["tests"]["gt_mcc"]["mean_diff"]
    )
    recommended = [n for n in winners if rows[n]["twin_ok"] and not rows[n]["collapsed"]]
    return {
        "rows": rows,
        "winners": winners,
        "best": winners[0] if winners else None,
        "recommended": recommended[0] if recommended else None,
        "fvu_margin": FVU_MARGIN * base_fvu,
    }
