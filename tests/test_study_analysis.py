import numpy as np
import pytest

from mfr_sae.stats import paired_permutation_test
from mfr_sae.study_analysis import FVU_MARGIN, IDENTICAL, analyse, choose, correct_across_datasets
from mfr_sae.study_catalogue import BASELINE, DEFAULT_SETTING, run_config, settings
from mfr_sae.study_report import dataset_table, write_report

R = 5


def _data(values: dict[str, dict[str, list[float]]]) -> dict:
    """A dataset's raw study data with every ensemble agreeing 0.5 with every other (no agreement effect)."""
    agreement = np.full((2 * R, 2 * R), 0.5)
    np.fill_diagonal(agreement, np.nan)
    return {
        "values": values,
        "agreement": {n: agreement.tolist() for n in values if n != BASELINE},
        "baseline_agreement": agreement[:R, :R].tolist(),
    }


def _measures(mcc, fvu, twin=0.0, one_to_one=0.8):
    return {
        "gt_mcc": list(mcc),
        "fvu": list(fvu),
        "twin_frac": [twin] * R,
        "gt_distinct": [100.0] * R,
        "silent_frac": [0.01] * R,
        "pairwise_mmcs_hungarian": [one_to_one] * R,
    }


def test_analyse_names_a_winner_only_with_a_corrected_mcc_gain_and_no_fvu_loss():
    base_mcc, base_fvu = [0.80, 0.82, 0.81, 0.79, 0.80], [0.30, 0.31, 0.29, 0.30, 0.32]
    noise = [0.001, -0.002, 0.0015, 0.0, -0.0005]
    data = _data(
        {
            BASELINE: _measures(base_mcc, base_fvu),
            "better": _measures([m + 0.03 + e for m, e in zip(base_mcc, noise)], base_fvu),
            "better but lossy": _measures(
                [m + 0.03 + e for m, e in zip(base_mcc, noise)], [f + 0.02 + e for f, e in zip(base_fvu, noise)]
            ),
            "worse": _measures([m - 0.05 + e for m, e in zip(base_mcc, noise)], base_fvu),
            "noise": _measures([m + 3 * e for m, e in zip(base_mcc, noise)], base_fvu),
            "best but twinned": _measures([m + 0.05 + e for m, e in zip(base_mcc, noise)], base_fvu, twin=0.1),
        }
    )
    result = analyse(data, R)
    rows = result["rows"]
    assert result["winners"] == ["best but twinned", "better"] and result["best"] == "best but twinned"
    assert result["recommended"] == "better"  # the largest gain that keeps twin_frac near the baseline's
    assert rows["better"]["fvu_not_worse"] and not rows["better but lossy"]["fvu_not_worse"]
    assert not rows["worse"]["beats_baseline"] and not rows["noise"]["beats_baseline"]
    mcc = rows["better"]["tests"]["gt_mcc"]
    assert mcc["ci95"][0] < 0.03 < mcc["ci95"][1]
    # Holm over the five settings: the smallest raw p is multiplied by 5
    raw = sorted(rows[n]["tests"]["gt_mcc"]["t_test_p"] for n in rows if n != BASELINE)
    assert min(rows[n]["tests"]["gt_mcc"]["p_holm"] for n in rows if n != BASELINE) == pytest.approx(5 * raw[0])
    assert result["fvu_margin"] == pytest.approx(FVU_MARGIN * np.mean(base_fvu))
    # agreement is the same everywhere: the arms of the permutation test are identical, its p = 1 says nothing
    across = rows["better"]["tests"]["across_pw_mcc"]
    assert across["diff"] == pytest.approx(0.0) and across["p"] is None and across["not_tested"] == IDENTICAL


def test_analyse_with_no_winner():
    base = _measures([0.8] * R, [0.3] * R)
    data = _data({BASELINE: base, "same": _measures([0.8, 0.81, 0.79, 0.8, 0.8], [0.3] * R)})
    result = analyse(data, R)
    assert result["winners"] == [] and result["best"] is None and result["recommended"] is None


def test_a_setting_identical_to_the_baseline_is_said_so_and_not_counted_in_any_holm_family(tmp_path, monkeypatch):
    base_mcc, base_fvu = [0.80, 0.82, 0.81, 0.79, 0.80], [0.30, 0.31, 0.29, 0.30, 0.32]
    noise = [0.001, -0.002, 0.0015, 0.0, -0.0005]
    data = _data(
        {
            BASELINE: _measures(base_mcc, base_fvu),
            "better": _measures([m + 0.03 + e for m, e in zip(base_mcc, noise)], base_fvu),
            "same": _measures(base_mcc, base_fvu),  # a pull that never acted: the baseline's runs
        }
    )
    base = np.full((R, R), 0.5) + 0.01 * np.arange(R)[:, None] * np.arange(R)[None, :]  # symmetric
    np.fill_diagonal(base, np.nan)
    # "same": its ensembles are the baseline's, so they agree with everything as the baseline's do
    data["agreement"]["same"] = np.block([[base, base], [base, base]]).tolist()
    # "better": its ensembles agree more with one another than the baseline's do
    data["agreement"]["better"] = np.block([[base + 0.1, base], [base, base]]).tolist()
    data["baseline_agreement"] = base.tolist()
    result = analyse(data, R)
    rows = result["rows"]
    for key, test in rows["same"]["tests"].items():
        assert test["not_tested"] == IDENTICAL and test["p_holm"] is None, key
        assert test.get("p") is None and test.get("t_test_p") is None, key
    # the family of each measure is "better" alone: its Holm p is its raw p
    mcc, across = rows["better"]["tests"]["gt_mcc"], rows["better"]["tests"]["across_pw_mcc"]
    assert mcc["p_holm"] == pytest.approx(mcc["t_test_p"])
    assert across["p"] == paired_permutation_test(np.asarray(data["agreement"]["better"]), R)["p"] == 2 / 2**R
    assert across["p_holm"] == pytest.approx(across["p"])
    correct_across_datasets({"a": {**data, **result}})
    assert mcc["p_holm_all"] == pytest.approx(mcc["t_test_p"]) and rows["same"]["tests"]["gt_mcc"]["p_holm_all"] is None
    assert result["winners"] == ["better"] and not rows["same"]["beats_baseline"]
    table = dataset_table(result)
    same = next(line for line in table.splitlines() if line.startswith("| same |"))
    assert same.count(IDENTICAL) == 3  # ΔMCC, ΔFVU and Δacross; no p anywhere in its row
    # the report says the tuning family is one candidate, the other identical to the baseline
    monkeypatch.setattr("mfr_sae.study_report.figure", lambda summary, path: None)
    write_report(tmp_path, _summary({**data, **result}))
    assert (
        f"Holm p here: over the 1 of the 2 candidates with a p (1 {IDENTICAL}: no p);"
        in (tmp_path / "report.md").read_text()
    )


def _summary(analysed: dict) -> dict:
    """The summary `study` hands write_report, around one dataset analysed on both splits."""
    config = run_config("learnable", settings()[0], 0, quick=True).to_dict()
    data = {**analysed, "config": config, "replicates": R, "dataset": "learnable", "architecture": "topk"}
    return {
        "quick": True,
        "replicates": R,
        "large_replicates": R,
        "tune_replicates": R,
        "tune_on": ["learnable"],
        "candidates": [],
        "chosen": None,
        "default_setting": DEFAULT_SETTING,
        "machine": "test",
        "seconds": 1.0,
        "settings": [{"name": n, "overrides": []} for n in analysed["rows"]],
        "fvu_margin": FVU_MARGIN,
        "twin_tolerance": 0.02,
        "tuning": {"learnable": data},
        "datasets": {"learnable": data},
    }


def test_a_collapsed_setting_is_never_recommended_and_the_pick_falls_back_to_the_largest_safe_gain():
    base_mcc, base_fvu = [0.80, 0.82, 0.81, 0.79, 0.80], [0.30, 0.31, 0.29, 0.30, 0.32]
    noise = [0.001, -0.002, 0.0015, 0.0, -0.0005]
    data = _data(
        {
            BASELINE: _measures(base_mcc, base_fvu),
            "copies": _measures([m + 0.05 + e for m, e in zip(base_mcc, noise)], base_fvu, one_to_one=0.999),
            "better": _measures([m + 0.03 + e for m, e in zip(base_mcc, noise)], base_fvu),
        }
    )
    result = analyse(data, R)
    assert result["rows"]["copies"]["collapsed"] and result["best"] == "copies"
    assert result["recommended"] == "better" == choose(result)
    # tuning replicates too few to prove a gain: the largest mean gain that keeps FVU and twin_frac
    noisy = _data(
        {
            BASELINE: _measures(base_mcc, base_fvu),
            "small": _measures([m + 0.004 + 5 * e for m, e in zip(base_mcc, noise)], base_fvu),
            "smaller": _measures([m + 0.002 + 5 * e for m, e in zip(base_mcc, noise)], base_fvu),
            "worse": _measures([m - 0.01 for m in base_mcc], base_fvu),
        }
    )
    result = analyse(noisy, R)
    assert result["recommended"] is None and choose(result) == "small"
    assert choose(analyse(_data({BASELINE: noisy["values"][BASELINE], "worse": noisy["values"]["worse"]}), R)) is None


def test_with_several_tuning_datasets_the_pick_gains_on_every_one():
    base_mcc, base_fvu = [0.80, 0.82, 0.81, 0.79, 0.80], [0.30, 0.31, 0.29, 0.30, 0.32]
    noise = [0.001, -0.002, 0.0015, 0.0, -0.0005]

    def shifted(gain: float) -> dict:
        return _measures([m + gain + e for m, e in zip(base_mcc, noise)], base_fvu)

    small = analyse(_data({BASELINE: _measures(base_mcc, base_fvu), "strong": shifted(0.05), "mild": shifted(0.02)}), R)
    large = analyse(
        _data({BASELINE: _measures(base_mcc, base_fvu), "strong": shifted(-0.04), "mild": shifted(0.01)}), R
    )
    assert choose(small) == "strong"  # alone, the small size picks the largest gain
    assert choose(small, large) == "mild"  # the strong pull loses at the large size: not picked
    assert choose(large, small) == "mild"
    worse = analyse(
        _data({BASELINE: _measures(base_mcc, base_fvu), "strong": shifted(-0.04), "mild": shifted(-0.01)}), R
    )
    assert choose(small, worse) is None
