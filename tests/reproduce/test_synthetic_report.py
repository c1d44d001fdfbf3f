"""report.md's words, from small fabricated runs (no training): the verdict, the notes on what is not a
finding, and the digits of the tables."""

import re

import numpy as np
import pytest
import torch

from mfr_sae.report import fmt_p
from mfr_sae.reproduce.synthetic_analysis import SUMMARY_KEYS, AcrossAgreement, per_method_values
from mfr_sae.reproduce.synthetic_report import (
    AGREEMENT_COLUMNS,
    GROUND_TRUTH_COLUMNS,
    mean_sd_table,
    significance_rows,
    verdict_lines,
)
from mfr_sae.reproduce.synthetic_stats import (
    IDENTICAL_ARMS,
    WINNER_KEYS,
    add_holm,
    against_baseline,
    identical_to_baseline,
    winners,
)

SEEDS = 3


def _summary(shift: float, rng: np.random.Generator, **fixed) -> list[dict]:
    """Per-seed summaries: every measure about 0.38 + shift with a little noise, `fixed` ones as given."""
    noise = rng.normal(0, 0.01, size=(SEEDS, len(SUMMARY_KEYS)))
    out = [{k: 0.38 + shift + noise[s, i] for i, k in enumerate(SUMMARY_KEYS)} for s in range(SEEDS)]
    for s, summary in enumerate(out):
        summary.update({"reinit_events": 0, **{k: v[s] for k, v in fixed.items()}})
    return out


def fabricated(reinit_fired: bool = False) -> dict:
    """A summary as reproduce_synthetic makes it, from fabricated runs of 3 seeds: `mfr` worse than the
    baseline, `shared_init` with identical members, `reinit` the baseline's runs unless `reinit_fired`."""
    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    decoders = {m: [torch.randn(2, 8, 4, generator=generator) for _ in range(SEEDS)] for m in ("baseline", "mfr")}
    decoders["shared_init"] = [torch.randn(1, 8, 4, generator=generator).expand(2, 8, 4) for _ in range(SEEDS)]
    summaries = {
        "baseline": _summary(0.0, rng, mse=[0.71, 0.72, 0.715]),
        "mfr": _summary(-0.05, rng, mse=[1.07, 1.09, 1.08], reinit_events=[2, 1, 3]),
        "shared_init": _summary(0.0, rng, within_pw_mcc=[1.0] * 3, within_shared_frac=[1.0] * 3, pearson_r=[None] * 3),
    }
    decoders["reinit"], summaries["reinit"] = decoders["baseline"], summaries["baseline"]
    if reinit_fired:
        decoders["reinit"] = [torch.randn(2, 8, 4, generator=generator) for _ in range(SEEDS)]
        summaries["reinit"] = _summary(0.01, rng, reinit_events=[1, 1, 1])
    runs = {
        m: [{"decoder": d, "summary": s, "beta": 0.0} for d, s in zip(decoders[m], summaries[m])]
        for m in ("baseline", "reinit", "mfr", "shared_init")
    }
    agreement = AcrossAgreement(runs, threshold=0.7)
    methods = per_method_values(runs, agreement)
    tests = against_baseline(methods, agreement)
    family = add_holm([t for by_key in tests.values() for t in by_key.values()])
    return {
        "methods": methods,
        "tests": tests,
        "multiple_comparisons": {"family_size": family},
        "winners": winners(methods, WINNER_KEYS, agreement),
        "threshold": 0.9,
        "reinit_threshold": 1.5,
    }


@pytest.fixture(scope="module")
def summary() -> dict:
    return fabricated()


def test_the_verdict_is_a_list_one_bullet_per_claim_with_its_effect_ci_and_adjusted_p(summary):
    lines = verdict_lines(summary)
    assert all(line.startswith("- ") for line in lines)
    claims = {line.split(":")[0][2:]: line for line in lines[:4]}
    assert list(claims) == [
        "Ground-truth MMCS",
        "Fraction of true features recovered at cosine >= 0.9",
        "Reconstruction MSE",
        "Agreement across independently seeded ensembles (PW-MCC)",
    ]
    main = summary["tests"]["mfr vs baseline"]
    for line, key in zip(claims.values(), ["gt_mmcs", "gt_recovered_frac", "mse", "across_pw_mcc"]):
        assert f"MFR - baseline {main[key].get('mean_diff', main[key].get('diff')):#.3g}" in line, line
        assert f"(p = {fmt_p(main[key]['p_holm'])})" in line, line  # the Holm-adjusted p
        if key == "across_pw_mcc":  # the permutation test has no CI: what 3 seeds can show at best instead
            assert "no CI; smallest attainable p 0.25" in line
        else:
            ci = main[key]["ci95"]
            assert f"95% CI [{ci[0]:#.3g}, {ci[1]:#.3g}]" in line
    assert "MFR worse" in claims["Reconstruction MSE"] and "MFR 1.080 ± 0.010 vs baseline 0.715 ± 0.0050" in lines[2]
    assert lines[-1] == "- Reinitialisation events: 0 in the `reinit` runs and 6 in the `mfr` runs (threshold 1.5)."


def test_a_value_fixed_by_construction_is_never_tested_nor_called_a_win(summary):
    # shared_init's members are one SAE: within-ensemble agreement 1 is how it is built, not a finding
    test = summary["tests"]["shared_init vs baseline"]["within_pw_mcc"]
    assert test["p"] is None and test["p_holm"] is None and test["t_test_p"] is None
    assert test["not_tested"] == "shared_init's within_pw_mcc is 1 by construction: not a finding"
    row = next(w for w in summary["winners"] if w["measure"] == "within_pw_mcc")
    assert row["best"] == "shared_init" and row["p"] == "-" and row["p (Holm)"] == "-"
    assert row["clear win"] == "no: shared_init's within_pw_mcc is 1 by construction: not a finding"
    assert sum(w["p"] != "-" for w in summary["winners"]) == sum(
        w["clear win"] in ("yes", "no") for w in summary["winners"]
    )
    verdicts = {(r["comparison"], r["metric"]): r["verdict"] for r in significance_rows(summary["tests"])}
    assert "by construction: not a finding" in verdicts[("shared_init vs baseline", "within_pw_mcc")]
    assert any(
        line.startswith("- `shared_init`: within_pw_mcc = 1, within_shared_frac = 1, pairwise_mmcs = 1 by construction")
        for line in verdict_lines(summary)
    )


def test_a_method_identical_to_the_baseline_is_said_to_be_and_its_tests_leave_holms_family(summary):
    methods, tests = summary["methods"], summary["tests"]
    assert identical_to_baseline(methods) == ["reinit"]
    rows = mean_sd_table(methods, GROUND_TRUTH_COLUMNS).splitlines()
    assert [r.split(" | ")[0] for r in rows[2:]] == [
        "| baseline",
        "| reinit (identical to baseline: no reinitialisation fired)",
        "| mfr",
        "| shared_init",
    ]
    assert "| reinit (identical to baseline: no reinitialisation fired) |" in mean_sd_table(methods, AGREEMENT_COLUMNS)
    # every reinit test has identical arms, the across-seed permutation too (whose p would be 1): none tested
    for key, test in tests["reinit vs baseline"].items():
        assert test["not_tested"] == IDENTICAL_ARMS and test["p"] is None and test["p_holm"] is None, key
    assert tests["reinit vs baseline"]["across_pw_mcc"]["identical_arms"]
    assert summary["multiple_comparisons"]["family_size"] == len(
        tested := [t for by_key in tests.values() for t in by_key.values() if t["p"] is not None]
    )
    smallest = min(tested, key=lambda t: t["p"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, len(tested) * smallest["p"]))
    rows = [r for r in significance_rows(tests) if r["comparison"] == "reinit vs baseline"]
    assert rows and all(r["verdict"] == IDENTICAL_ARMS and r["p"] == "-" for r in rows)
    assert any(
        "`reinit` is identical to baseline: no reinitialisation fired" in line for line in verdict_lines(summary)
    )


def test_a_reinit_that_fired_is_a_result_of_its_own():
    summary = fabricated(reinit_fired=True)
    assert identical_to_baseline(summary["methods"]) == []
    assert "identical" not in mean_sd_table(summary["methods"], GROUND_TRUTH_COLUMNS)
    assert all(t["p"] is not None for t in summary["tests"]["reinit vs baseline"].values() if t["n"] > 1)


def _means(table: str) -> dict[str, list[str]]:
    """Each column of a Markdown table of `mean ± sd` cells: its means, as printed."""
    header, _, *rows = table.splitlines()
    columns = header.strip("| ").split(" | ")
    cells = [row.strip("| ").split(" | ") for row in rows]
    return {c: [row[i].split(" ± ")[0] for row in cells if row[i] != "n/a"] for i, c in enumerate(columns) if i}


def _decimals(number: str) -> int:
    return len(number.split(".")[1]) if "." in number else 0


def test_every_column_prints_its_means_to_one_number_of_decimals(summary):
    for columns in (GROUND_TRUTH_COLUMNS, AGREEMENT_COLUMNS):
        for column, means in _means(mean_sd_table(summary["methods"], columns)).items():
            assert len({_decimals(m) for m in means}) == 1, (column, means)
    mse = _means(mean_sd_table(summary["methods"], GROUND_TRUTH_COLUMNS))["mse"]
    assert mse == ["0.715", "0.715", "1.080", f"{np.mean(summary['methods']['shared_init']['per_seed']['mse']):.3f}"]
    # the tables of tests: every number to 3 significant digits, trailing zeros kept
    for row in significance_rows(summary["tests"]):
        if row["mean difference"] != "-" and float(row["mean difference"]) != 0:
            digits = re.sub(r"^-?[0.]*|e.*|\.", "", row["mean difference"])
            assert len(digits) == 3, row["mean difference"]
