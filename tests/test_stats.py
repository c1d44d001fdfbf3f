import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from mfr_sae.stats import (
    holm,
    interchangeable_arms,
    paired_permutation_test,
    paired_test,
    rank_methods,
    signed_rank_exact_p,
    verdict,
)

TREATED = [1.0, 2.0, 3.0, 4.0, 5.0, 6.5]
CONTROL = [0.5, 2.2, 2.1, 3.0, 4.8, 5.0]


# ---------------------------------------------------------------- paired_test


def test_paired_test_matches_scipy_on_known_numbers():
    out = paired_test(TREATED, CONTROL)
    diff = np.subtract(TREATED, CONTROL)
    ref = sps.ttest_rel(TREATED, CONTROL)
    assert out["n"] == 6
    assert out["mean_diff"] == pytest.approx(0.65)
    assert out["sd_diff"] == pytest.approx(diff.std(ddof=1))
    assert out["effect_size"] == pytest.approx(0.65 / diff.std(ddof=1))
    assert out["t_test_p"] == pytest.approx(ref.pvalue) and out["t_test_p"] == pytest.approx(0.047441, abs=1e-6)
    # |d| has a tie (0.2, 0.2: mid-rank 1.5); T- = 1.5, reached or beaten by 3 of 64 sign patterns per side
    assert out["wilcoxon_p"] == pytest.approx(6 / 64)
    assert out["note"] is None


def test_the_ci_contains_the_mean_and_is_the_t_interval():
    out = paired_test(TREATED, CONTROL)
    low, high = out["ci95"]
    assert low < out["mean_diff"] < high
    ref = sps.ttest_rel(TREATED, CONTROL).confidence_interval(0.95)
    assert (low, high) == pytest.approx((ref.low, ref.high))
    half = sps.t.ppf(0.975, 5) * out["sd_diff"] / math.sqrt(6)
    assert high - low == pytest.approx(2 * half)


def test_one_replicate_gives_no_test():
    out = paired_test([0.7], [0.5])
    assert out["n"] == 1 and out["mean_diff"] == pytest.approx(0.2)
    assert out["sd_diff"] is None and out["ci95"] is None and out["effect_size"] is None
    assert out["t_test_p"] is None and out["wilcoxon_p"] is None
    assert out["note"] == "one replicate: no test"


def test_no_pairs_gives_no_test():
    out = paired_test([None], [1.0])
    assert out["n"] == 0 and out["mean_diff"] is None and out["t_test_p"] is None and "no pairs" in out["note"]


def test_all_differences_zero_is_no_test_with_the_reason():
    out = paired_test([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert out["mean_diff"] == 0 and out["sd_diff"] == 0 and out["ci95"] == [0.0, 0.0]
    assert out["t_test_p"] is None and out["wilcoxon_p"] is None and out["effect_size"] is None
    assert out["note"] == "all differences zero: no test"


@pytest.mark.parametrize(
    "treated, control", [([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]), ([1.1, 2.1, 5.1], [1.0, 2.0, 5.0])]
)  # constant up to rounding
def test_constant_nonzero_differences_have_no_t_test(treated, control):
    out = paired_test(treated, control)
    mean = out["mean_diff"]
    assert mean == pytest.approx(np.mean(np.subtract(treated, control)))
    assert out["sd_diff"] == 0 and out["ci95"] == [mean, mean]
    assert out["t_test_p"] is None and out["effect_size"] is None
    assert "constant nonzero differences" in out["note"]


def test_pairs_with_a_none_are_dropped():
    out = paired_test([1.0, None, 3.0, 2.0, float("nan")], [0.0, 1.0, None, 1.5, 1.0])
    ref = sps.ttest_rel([1.0, 2.0], [0.0, 1.5])
    assert out["n"] == 2 and out["mean_diff"] == pytest.approx(0.75)
    assert out["t_test_p"] == pytest.approx(ref.pvalue)


def test_wilcoxon_only_from_six_nonzero_differences():
    five = paired_test(TREATED[:5], CONTROL[:5])
    assert five["t_test_p"] is not None and five["wilcoxon_p"] is None
    assert "0.0625" in five["note"]
    six = paired_test(TREATED, CONTROL)
    assert six["wilcoxon_p"] is not None
    # 7 pairs of which 2 are equal: 5 nonzero differences, so no Wilcoxon either
    seven = paired_test(TREATED + [9.0], CONTROL[:5] + [6.5, 9.0])
    assert seven["n"] == 7 and seven["wilcoxon_p"] is None and "5 nonzero" in seven["note"]


def _brute_force_signed_rank(diff):
    d = np.asarray([x for x in diff if x != 0])
    ranks = sps.rankdata(np.abs(d))
    centre = ranks.sum() / 2
    observed = abs(ranks[d > 0].sum() - centre)
    sums = [
        abs(sum(r for r, s in zip(ranks, signs) if s) - centre) for signs in itertools.product([0, 1], repeat=len(d))
    ]
    return np.mean([s >= observed - 1e-9 for s in sums])


@pytest.mark.parametrize(
    "diff",
    [
        [0.5, -0.2, 0.9, 1.0, 0.2, 1.5, 0.3],  # a tie in |d|
        [1.0, 1.0, -1.0, 2.0, 2.0, 3.0, 0.0, 4.0],  # ties and a zero
        [0.4, 0.4, 0.4, 0.4, 0.4, 0.4],
    ],
)  # all tied: p = 2 / 2^6
def test_the_exact_signed_rank_p_is_the_enumeration_of_sign_flips(diff):
    assert signed_rank_exact_p(diff) == pytest.approx(_brute_force_signed_rank(diff))


def test_the_exact_signed_rank_p_equals_scipy_without_ties():
    rng = np.random.default_rng(3)
    for n in (6, 9, 15):
        d = rng.normal(0.4, 1.0, n)
        assert signed_rank_exact_p(d) == pytest.approx(sps.wilcoxon(d, method="exact").pvalue)


# ---------------------------------------------------------------- holm


def test_holm_on_a_hand_computed_example():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, None, 0.04, 0.03, 0.005]) == pytest.approx([0.03, None, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_keeps_none_out_of_the_family():
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([None, 0.02, None]) == [None, 0.02, None]  # a family of one: unchanged
    assert holm([None, None]) == [None, None] and holm([]) == []


def test_holm_is_monotone_in_the_raw_p_values():
    raw = list(np.random.default_rng(0).uniform(0, 0.2, 12))
    adjusted = holm(raw)
    order = np.argsort(raw)
    assert all(adjusted[a] <= adjusted[b] for a, b in zip(order, order[1:]))
    assert all(adj >= p for adj, p in zip(adjusted, raw))


# ---------------------------------------------------------------- paired_permutation_test


def _similarity(treated: float, control: float, cross: float, R: int) -> np.ndarray:
    """Agreement `treated` among treated ensembles, `control` among controls, `cross` in between."""
    S = np.full((2 * R, 2 * R), cross)
    S[:R, :R], S[R:, R:] = treated, control
    np.fill_diagonal(S, 1.0)
    return S


def test_permutation_treated_agreeing_more_gets_the_smallest_exact_p():
    # R = 4: a swap pattern with k replicates swapped gives 0.4 (C(4-k, 2) - C(k, 2)) / 6, which
    # reaches |0.4| only for k = 0 and k = 4: p = 2 / 16
    out = paired_permutation_test(_similarity(0.9, 0.5, 0.5, 4), 4)
    assert out["n"] == 4 and out["diff"] == pytest.approx(0.4)
    assert out["treated_mean"] == pytest.approx(0.9) and out["control_mean"] == pytest.approx(0.5)
    assert out["p"] == pytest.approx(2 / 16) and out["min_p"] == pytest.approx(2 / 16)


def test_permutation_p_counts_the_label_swaps_by_hand():
    # only treated 0 and 1 agree more (0.9); S[0, 1] is inside one group exactly when replicates 0 and 1
    # are both swapped or both not (8 of 16 patterns), each time with |stat| = 0.4 / 6: p = 8 / 16
    S = np.full((8, 8), 0.5)
    S[0, 1] = S[1, 0] = 0.9
    out = paired_permutation_test(S, 4)
    assert out["diff"] == pytest.approx(0.4 / 6) and out["p"] == pytest.approx(0.5)


def test_permutation_null_where_labels_do_not_matter_gives_p_one():
    out = paired_permutation_test(_similarity(0.6, 0.6, 0.6, 5), 5)
    assert out["diff"] == pytest.approx(0.0) and out["p"] == 1.0 and out["min_p"] == pytest.approx(2 / 32)


def test_identical_arms_are_flagged_by_both_tests_so_that_a_family_can_leave_them_out():
    # every paired difference 0: nothing to test (the permutation test's p = 1 is its design, not evidence)
    assert paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["identical_arms"]
    assert not paired_test(TREATED, CONTROL)["identical_arms"] and not paired_test([0.7], [0.7])["identical_arms"]
    same = _similarity(0.6, 0.6, 0.6, 4)
    for i, j in [(0, 3), (4, 3), (0, 7), (4, 7)]:  # replicates 0 and 3 agree more, whichever their labels
        same[i, j] = same[j, i] = 0.8
    assert interchangeable_arms(same, 4)
    out = paired_permutation_test(same, 4)
    assert out["identical_arms"] and out["p"] == 1.0
    same[0, 4] = same[4, 0] = 0.1  # a replicate's own pair is never compared: still interchangeable
    assert interchangeable_arms(same, 4)
    same[1, 2] = same[2, 1] = 0.61  # treated 1 now agrees with treated 2 unlike control 1 does
    assert not interchangeable_arms(same, 4) and not paired_permutation_test(same, 4)["identical_arms"]
    assert not paired_permutation_test(_similarity(0.9, 0.5, 0.5, 4), 4)["identical_arms"]


def test_permutation_never_uses_a_replicates_own_pair():
    S = _similarity(0.9, 0.5, 0.5, 3)
    S[0, 3] = S[3, 0] = np.nan  # treated and control of replicate 0: never compared
    assert paired_permutation_test(S, 3)["p"] == pytest.approx(2 / 8)


def test_permutation_random_swaps_approximate_the_exact_p():
    S = _similarity(0.9, 0.5, 0.5, 4)
    out = paired_permutation_test(S, 4, max_exact=3, n_random=4000, seed=1)
    assert out["p"] == pytest.approx(2 / 16, abs=0.03) and out["p"] >= out["min_p"]
    assert out == paired_permutation_test(S, 4, max_exact=3, n_random=4000, seed=1)  # seeded


def test_permutation_with_one_replicate_has_no_test():
    out = paired_permutation_test(np.array([[1.0, 0.3], [0.3, 1.0]]), 1)
    assert out["n"] == 1 and out["p"] is None and out["diff"] is None and "one replicate" in out["note"]


def test_permutation_rejects_a_wrong_shape_and_an_asymmetric_matrix():
    with pytest.raises(ValueError, match="shape"):
        paired_permutation_test(np.ones((5, 5)), 2)
    S = _similarity(0.9, 0.5, 0.5, 2)
    S[0, 1] = 0.1
    with pytest.raises(ValueError, match="symmetric"):
        paired_permutation_test(S, 2)


# ---------------------------------------------------------------- verdict and ranking


def test_verdict_words():
    assert verdict(paired_test([0.7], [0.5])) == "too few replicates for a test (n=1)"
    assert verdict(paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])) == "tie: no difference"
    significant = paired_test(TREATED, CONTROL)  # mean +0.65, p = 0.0474
    assert verdict(significant) == "MFR better (p = 0.0474)"
    assert verdict(significant, higher_is_better=False, name="reinit") == "reinit worse (p = 0.0474)"
    assert verdict(significant, alpha=0.01) == "no significant difference (p = 0.0474)"
    assert verdict(paired_test(TREATED[:2], CONTROL[:2])).startswith("no significant difference (p = ")
    assert verdict(paired_test([2.0, 3.0], [1.0, 2.0])).startswith("no test (constant nonzero differences")


def test_verdict_reads_the_p_key_asked_for():
    test = {**paired_test(TREATED, CONTROL), "p_holm": 0.2}
    assert verdict(test, p_key="p_holm") == "no significant difference (p = 0.2)"
    perm = paired_permutation_test(_similarity(0.9, 0.5, 0.5, 6), 6)
    assert verdict(perm, p_key="p") == f"MFR better (p = {2 / 64:.3g})"
    assert verdict(paired_permutation_test(_similarity(0.6, 0.6, 0.6, 3), 3), p_key="p") == "tie: no difference"


def test_ranking_reports_ties_as_ties():
    ranking = rank_methods({"a": 0.5, "b": 0.9, "c": 0.9, "d": 0.1}, higher_is_better=True)
    assert ranking["best"] == ["b", "c"] and ranking["tie"] and ranking["runner_up"] == ["a"]
    assert ranking["groups"] == [["b", "c"], ["a"], ["d"]]
    lower = rank_methods({"a": 0.5, "b": 0.9, "c": 0.9, "d": 0.1}, higher_is_better=False)
    assert lower["best"] == ["d"] and not lower["tie"] and lower["runner_up"] == ["a"]
    second_tie = rank_methods({"a": 1.0, "b": 0.5, "c": 0.5}, higher_is_better=True)
    assert second_tie["best"] == ["a"] and not second_tie["tie"] and second_tie["runner_up"] == ["b", "c"]


def test_ranking_with_one_or_no_finite_method():
    one = rank_methods({"a": 0.3, "b": float("nan"), "c": None}, higher_is_better=True)
    assert one["best"] == ["a"] and one["runner_up"] == [] and not one["tie"] and one["excluded"] == ["b", "c"]
    none = rank_methods({"a": None}, higher_is_better=False)
    assert none["best"] == [] and none["runner_up"] == [] and not none["tie"] and none["groups"] == []
    assert rank_methods({}, higher_is_better=True)["best"] == []
