"""The statistics of `reproduce synthetic`: each method tested against baseline over seeds (the
replicates), Holm's adjustment over a family of tests, and which method wins on which measure. A
comparison whose outcome is known before any data (identical arms, a value fixed by construction) is
named as such and kept out of every test and family."""

from __future__ import annotations

from typing import Any

from mfr_sae.report import fmt_p, fmt_sig, mean_of, round_sig
from mfr_sae.reproduce.synthetic_analysis import ACROSS_KEYS, AcrossAgreement
from mfr_sae.stats import ALPHA, holm, paired_permutation_test, paired_test, rank_methods, set_aside, verdict

LOWER_IS_BETTER = {"mse", "fvu", "cluster_size", "dead_frac", "silent_frac", "twin_frac"}
# The measures on which each method is tested against baseline (the Significance section).
COMPARED_KEYS = [
    "gt_mmcs",
    "gt_mmcs_hungarian",
    "gt_recovered_frac",
    "gt_mcc",
    "mse",
    "fvu",
    "pearson_r",
    "cluster_size",
    "within_pw_mcc",
    *ACROSS_KEYS,
]
# The measures of the table of winners.
WINNER_KEYS = ["across_pw_mcc", "across_shared_frac", "within_pw_mcc", "gt_mcc", "gt_mmcs", "gt_recovered_frac", "mse"]
# Values a method has by how it is built, not by what it learned (why, and the values): comparing them
# is not a finding, so they are never tested.
BY_CONSTRUCTION: dict[str, tuple[str, dict[str, float]]] = {
    "shared_init": (
        "its two members start from one initialisation and see the same batches, so they stay one SAE",
        {"within_pw_mcc": 1.0, "within_shared_frac": 1.0, "pairwise_mmcs": 1.0},
    )
}
# What a test of two arms whose every paired difference is exactly 0 reports instead of p = 1.
IDENTICAL_ARMS = "identical arms, not tested"
Test = dict[str, Any]


def by_construction(method: str, key: str) -> str | None:
    """Why `method`'s value of `key` is not a finding (BY_CONSTRUCTION), or None when it is measured."""
    value = BY_CONSTRUCTION.get(method, ("", {}))[1].get(key)
    return None if value is None else f"{method}'s {key} is {value:g} by construction: not a finding"


def identical_to_baseline(per_method: dict[str, Any]) -> list[str]:
    """The methods whose every per-seed number equals the baseline's, seed by seed: `reinit` when its rule
    never fired, which leaves its runs the baseline's."""
    base = per_method["baseline"]["per_seed"]
    return [m for m, st in per_method.items() if m != "baseline" and st["per_seed"] == base]


def values_of(method_stats: dict[str, Any], key: str) -> list[Any]:
    """One method's values of one measure: per seed pair for the across_* measures, else per seed."""
    values: list[Any] = (method_stats["per_seed_pair"] if key in ACROSS_KEYS else method_stats["per_seed"])[key]
    return values


def compare_methods(
    treated: str, control: str, per_method: dict[str, Any], agreement: AcrossAgreement | None, key: str
) -> Test:
    """One test of `treated` against `control` on one measure, over seeds (the replicates): a paired
    t-test of the per-seed values, or, for the across_* measures (whose values are seed PAIRS, not
    independent), the permutation test that swaps the two methods' labels inside each seed. A test whose
    outcome is fixed in advance (a value by construction, identical arms) gets `not_tested` (why) and no p,
    so that no family counts it."""
    if key in ACROSS_KEYS:
        if agreement is None:
            raise ValueError(f"{key}: the across-seed test needs the ensembles' AcrossAgreement")
        similarity = agreement.paired_similarity(treated, control, key)
        test = paired_permutation_test(similarity, len(similarity) // 2)
        test["test_name"] = "permutation over seeds"
    else:
        test = paired_test(values_of(per_method[treated], key), values_of(per_method[control], key))
        test.update(test_name="paired t over seeds", p=test["t_test_p"])
    return set_aside(test, IDENTICAL_ARMS, by_construction(treated, key) or by_construction(control, key))


def add_holm(tests: list[Test]) -> int:
    """Holm-adjusted p (`p_holm`) over the family `tests` (each test's `p`); the family's size."""
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = adjusted
    return sum(t["p"] is not None for t in tests)


def against_baseline(per_method: dict[str, Any], agreement: AcrossAgreement) -> dict[str, dict[str, Test]]:
    """`{method} vs baseline` for mfr, reinit and shared_init: a test on each of COMPARED_KEYS (not yet
    Holm-adjusted: add_holm over all of them is the family)."""
    return {
        f"{m} vs baseline": {k: compare_methods(m, "baseline", per_method, agreement, k) for k in COMPARED_KEYS}
        for m in ("mfr", "reinit", "shared_init")
    }


def difference(test: Test) -> float | None:
    """The difference a test measured: mean_diff of a paired t-test, diff of a permutation test."""
    return test.get("mean_diff", test.get("diff"))


def ci_text(test: Test) -> str:
    """A test's 95% CI as printed, `-` where it has none."""
    ci = test.get("ci95")
    return "-" if ci is None else f"[{fmt_sig(ci[0])}, {fmt_sig(ci[1])}]"


def verdict_words(test: Test, key: str, name: str) -> str:
    """The verdict on one test of `name` against its control, on its Holm-adjusted p; why it was not
    tested when it was not."""
    return test.get("not_tested") or verdict(test, key not in LOWER_IS_BETTER, name, p_key="p_holm")


def _clear_win(test: Test | None, tie: bool) -> str:
    """The `clear win` cell of a winners row: never `yes` for a tie or an untested comparison."""
    if tie:
        return "no (tie)"
    if test is not None and test.get("not_tested"):
        return f"no: {test['not_tested']}"
    if test is None or test["p_holm"] is None:
        return "no test"
    return "yes" if test["p_holm"] < ALPHA else "no"


def winners(methods: dict[str, Any], keys: list[str], agreement: AcrossAgreement | None) -> list[dict[str, Any]]:
    """For each measure: the method with the best mean (a tie when several share it at the precision
    printed, round_sig) and its test against the runner-up (against each runner-up when several share
    second place, the largest p kept), Holm-adjusted over the tests of this table. A best mean fixed by
    construction is never a win: it is said so, untested."""
    rows, tests, ties = [], [], []
    for key in keys:
        means = {m: mean_of(values_of(st, key)) for m, st in methods.items()}
        # ranked as printed: means that read the same are a tie, never a win
        ranking = rank_methods(
            {m: None if v is None else round_sig(v) for m, v in means.items()}, key not in LOWER_IS_BETTER
        )
        best, second = ranking["best"], ranking["runner_up"]
        test = None
        if best and not ranking["tie"] and second:
            candidates = [compare_methods(best[0], other, methods, agreement, key) for other in second]
            test = max(candidates, key=lambda t: 2.0 if t["p"] is None else t["p"])
        tests.append(test)
        ties.append(ranking["tie"])
        rows.append(
            {
                "measure": key,
                "best": " = ".join(best) or "-",
                "mean": means[best[0]] if best else "-",
                "runner-up": " = ".join(second) or "-",
                "runner-up mean": means[second[0]] if second else "-",
                "difference": difference(test) if test else "-",
                "95% CI": ci_text(test) if test else "-",
                "p": fmt_p(test["p"]) if test else "-",
                "test": test["test_name"] if test else "-",
            }
        )
    add_holm([t for t in tests if t is not None])
    for row, test, tie in zip(rows, tests, ties):
        row["p (Holm)"] = fmt_p(test["p_holm"]) if test else "-"
        row["clear win"] = _clear_win(test, tie)
    return rows
