import numpy as np
import pytest
import torch

from mfr_sae.report import markdown_table
from mfr_sae.reproduce.synthetic_analysis import AcrossAgreement
from mfr_sae.reproduce.synthetic_stats import IDENTICAL_ARMS, add_holm, compare_methods, winners


def _method(values):
    return {"per_seed": {"gt_mcc": values, "mse": values}, "per_seed_pair": {}}


def test_means_equal_at_the_printed_precision_are_a_tie_not_a_win():
    # mfr and reinit differ only past the 3 significant digits printed; on mse (lower is better)
    # baseline and shared_init are exactly equal
    methods = {
        "baseline": _method([0.01, 0.02]),
        "reinit": _method([0.12340, 0.12342]),
        "mfr": _method([0.12343, 0.12345]),
        "shared_init": _method([0.01, 0.02]),
    }
    rows = winners(methods, ["gt_mcc", "mse"], agreement=None)
    for row, tied in zip(rows, ("reinit = mfr", "baseline = shared_init")):
        assert row["best"] == tied and row["clear win"] == "no (tie)" and row["p"] == "-"
    table = markdown_table(rows, list(rows[0]))
    assert "| gt_mcc | reinit = mfr | 0.123 |" in table and "| mse | baseline = shared_init | 0.015 |" in table


def test_holm_adjusts_over_the_tests_with_a_p_value_only():
    tests = [{"p": 0.01}, {"p": None}, {"p": 0.04}]
    assert add_holm(tests) == 2
    assert tests[0]["p_holm"] == pytest.approx(0.02) and tests[1]["p_holm"] is None
    assert tests[2]["p_holm"] == pytest.approx(0.04)


def test_per_seed_measures_get_a_paired_t_test_and_across_seed_ones_a_permutation_over_seeds():
    methods = {"mfr": _method([0.5, 0.6, 0.7]), "baseline": _method([0.4, 0.45, 0.65])}
    t = compare_methods("mfr", "baseline", methods, None, "gt_mcc")
    assert t["test_name"] == "paired t over seeds" and t["n"] == 3 and t["p"] == t["t_test_p"]
    assert t["mean_diff"] == pytest.approx(np.mean([0.1, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    runs = {m: [{"decoder": torch.randn(2, 8, 4, generator=generator)} for _ in range(3)] for m in methods}
    agreement = AcrossAgreement(runs, threshold=0.7)
    across = compare_methods("mfr", "baseline", methods, agreement, "across_pw_mcc")
    assert across["test_name"] == "permutation over seeds" and across["n"] == 3
    assert across["diff"] == pytest.approx(
        np.mean(agreement.per_seed_pair("mfr")["across_pw_mcc"])
        - np.mean(agreement.per_seed_pair("baseline")["across_pw_mcc"])
    )
    with pytest.raises(ValueError, match="AcrossAgreement"):
        compare_methods("mfr", "baseline", methods, None, "across_pw_mcc")


def test_identical_arms_and_values_fixed_by_construction_are_not_tested_and_stay_out_of_holm():
    methods = {
        "baseline": {"per_seed": {"mse": [0.7, 0.72, 0.71], "within_pw_mcc": [0.30, 0.34, 0.33]}},
        "reinit": {"per_seed": {"mse": [0.7, 0.72, 0.71], "within_pw_mcc": [0.30, 0.34, 0.33]}},
        "mfr": {"per_seed": {"mse": [0.9, 0.95, 0.91], "within_pw_mcc": [0.80, 0.83, 0.86]}},
        "shared_init": {"per_seed": {"mse": [0.71, 0.7, 0.73], "within_pw_mcc": [1.0, 1.0, 1.0]}},
    }
    same = compare_methods("reinit", "baseline", methods, None, "mse")
    fixed = compare_methods("shared_init", "baseline", methods, None, "within_pw_mcc")
    tested = compare_methods("mfr", "baseline", methods, None, "mse")
    assert same["not_tested"] == IDENTICAL_ARMS and same["p"] is None
    assert fixed["not_tested"] == "shared_init's within_pw_mcc is 1 by construction: not a finding"
    assert fixed["p"] is None and fixed["t_test_p"] is None and fixed["mean_diff"] > 0.5  # measured, not tested
    assert add_holm([same, fixed, tested]) == 1 and tested["p_holm"] == tested["p"]
    row = winners(methods, ["within_pw_mcc"], agreement=None)[0]
    assert row["best"] == "shared_init" and row["p"] == "-" and row["clear win"].startswith("no: shared_init's")
