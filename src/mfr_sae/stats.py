"""Statistics of the reproductions: paired tests over independent replicates (seeds), Holm's correction,
a permutation test for agreement across seeded ensembles, and the verdict and ranking words built on them.

The unit of every test is the replicate (one seed: its own initialisation of every method). Numbers
that are not independent replicates (the k values of one ensemble, the seed PAIRS of across-ensemble
agreement) are never fed to a test as if they were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeGuard

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
# Below this many nonzero differences the exact two-sided Wilcoxon p cannot go below 2 / 2^5 = 0.0625.
WILCOXON_MIN_N = 6
# Differences whose sd is this small relative to their mean are constant up to rounding: no t-test.
_REL_TOL = 1e-12
# Permutation statistics this close to the observed one count as reaching it (rounding, not evidence).
_PERM_TOL = 1e-12
EXACT_WILCOXON_MAX = 400


def _present(value: float | None) -> TypeGuard[float]:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def t_half_width(sd: float, n: int) -> float:
    """Half the width of the t-based 95% interval of a mean of n values with sample sd `sd`."""
    return float(sps.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def paired_test(treated: Sequence[float | None], control: Sequence[float | None]) -> dict[str, Any]:
    """Paired comparison of `treated` and `control` (one value per replicate, in the same order).

    Pairs where either value is None (or NaN) are dropped. Returns `n` (pairs kept), `mean_diff`
    (treated - control; None when n = 0), `sd_diff`, `ci95` ([low, high], t-based 95% interval of the
    mean difference; [mean, mean] when the differences are constant), `effect_size` (Cohen's d_z =
    mean / sd), `t_test_p` (paired t-test, two-sided), `wilcoxon_p` (exact Wilcoxon signed-rank,
    two-sided, zeros dropped, ties handled exactly; only with >= 6 nonzero differences, since with 5 or
    fewer its smallest attainable p is 0.0625 or more), `identical_arms` (two or more pairs, every
    difference exactly 0: nothing to test) and `note`: why any of these is None (None when nothing
    needs explaining)."""
    if len(treated) != len(control):
        raise ValueError(f"paired_test: {len(treated)} treated values but {len(control)} control values")
    kept = [(float(t), float(c)) for t, c in zip(treated, control) if _present(t) and _present(c)]
    n = len(kept)
    out: dict[str, Any] = {
        "n": n,
        "mean_diff": None,
        "sd_diff": None,
        "ci95": None,
        "effect_size": None,
        "t_test_p": None,
        "wilcoxon_p": None,
        "identical_arms": False,
        "note": None,
    }
    if n == 0:
        out["note"] = "no pairs: no test"
        return out
    diff = np.array([t - c for t, c in kept])
    mean = float(diff.mean())
    out["mean_diff"] = mean
    if n == 1:
        out["note"] = "one replicate: no test"
        return out
    sd = float(diff.std(ddof=1))
    notes = []
    if not np.any(diff != 0):
        out.update(sd_diff=0.0, ci95=[0.0, 0.0], identical_arms=True)
        out["note"] = "all differences zero: no test"
        return out
    if sd <= _REL_TOL * abs(mean):  # every pair differs by the same amount: t is infinite, d_z undefined
        out.update(sd_diff=0.0, ci95=[mean, mean])
        notes.append("constant nonzero differences (sd 0): no t-test, effect size undefined")
    else:
        half = t_half_width(sd, n)
        out.update(
            sd_diff=sd,
            ci95=[mean - half, mean + half],
            effect_size=mean / sd,
            t_test_p=float(sps.ttest_rel([t for t, _ in kept], [c for _, c in kept]).pvalue),
        )
    nonzero = int(np.count_nonzero(diff))
    if nonzero >= WILCOXON_MIN_N:
        out["wilcoxon_p"] = signed_rank_exact_p(diff)
    elif nonzero == n:
        notes.append(f"n = {n} <= 5: Wilcoxon cannot go below {2 / 2**n:.3g}, not run")
    else:
        notes.append(f"{nonzero} nonzero differences <= 5: Wilcoxon cannot go below {2 / 2**nonzero:.3g}, not run")
    out["note"] = "; ".join(notes) or None
    return out


def signed_rank_exact_p(diff: Sequence[float] | np.ndarray) -> float:
    """Exact two-sided p of the Wilcoxon signed-rank test: zero differences dropped, tied absolute
    values given mid-ranks, and the null distribution of the positive-rank sum enumerated over all
    2^n sign assignments (by dynamic programming). Equals scipy's exact p without ties. Above
    EXACT_WILCOXON_MAX nonzero differences, scipy's normal approximation (tie-corrected) instead."""
    d = np.asarray(diff, dtype=float)
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return 1.0
    if n > EXACT_WILCOXON_MAX:
        return float(sps.wilcoxon(d, method="approx").pvalue)
    doubled = np.rint(2 * sps.rankdata(np.abs(d))).astype(int)  # mid-ranks are halves: doubled, integers
    total = int(doubled.sum())
    dist = np.zeros(total + 1)
    dist[0] = 1.0
    for r in doubled:  # each rank is positive or negative with probability 1/2
        shifted = np.zeros_like(dist)
        shifted[r:] = dist[:-r] if r else dist
        dist = 0.5 * dist + 0.5 * shifted
    observed = int(doubled[d > 0].sum())
    extreme = np.abs(2 * np.arange(total + 1) - total) >= abs(2 * observed - total)  # integers: exact
    return float(min(1.0, dist[extreme].sum()))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in the input order. None stays None and is not counted in
    the family; the adjusted values are monotone in the raw ones and capped at 1."""
    present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    out: list[float | None] = [None] * len(pvalues)
    m = len(present)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present, key=lambda x: x[0])):
        running = max(running, min(1.0, (m - rank) * float(p)))
        out[i] = running
    return out


def set_aside(test: dict[str, Any], identical: str, reason: str | None = None) -> dict[str, Any]:
    """Keep a test (of paired_test or paired_permutation_test) out of every Holm family when its outcome is
    known before any data: `reason` (e.g. a value fixed by construction), or `identical` (the words for it)
    when its arms are identical in every replicate (`identical_arms`: p = 1 says nothing). Its p-values become
    None, which `holm` leaves out, and `not_tested` says why; any other test is returned as it was."""
    why = reason or (identical if test.get("identical_arms") else None)
    if why:
        test.update({key: None for key in ("p", "t_test_p", "wilcoxon_p") if key in test}, not_tested=why)
    return test


def paired_permutation_test(
    similarity: np.ndarray, n_replicates: int, max_exact: int = 16, n_random: int = 20000, seed: int = 0
) -> dict[str, Any]:
    """Does treatment raise the agreement ACROSS independently seeded ensembles? A paired design of R
    replicates: `similarity` is a symmetric [2R, 2R] matrix of agreement between ensembles, index r the
    treated ensemble of replicate r and R + r its control (same data and seed). Statistic: mean over
    r < r' of S[r, r'] minus the same mean over the control ensembles. Null: inside each replicate the
    two labels are exchangeable; the label swaps of whole replicates are enumerated (all 2^R when
    R <= max_exact, else `n_random` seeded random ones, the observed labelling counted), p two-sided =
    share with |stat| >= |observed|. S[r, R + r] is never used. Returns `n` (R), `diff`,
    `treated_mean`, `control_mean`, `p` (None when R < 2), `min_p` (smallest attainable p),
    `identical_arms` (interchangeable_arms: every swap gives 0, so p = 1 says nothing), `note`."""
    S = np.asarray(similarity, dtype=float)
    R = int(n_replicates)
    if S.shape != (2 * R, 2 * R):
        raise ValueError(f"similarity has shape {S.shape}; {R} replicates need ({2 * R}, {2 * R})")
    out: dict[str, Any] = {
        "n": R,
        "diff": None,
        "treated_mean": None,
        "control_mean": None,
        "p": None,
        "min_p": None,
        "identical_arms": False,
        "note": None,
    }
    if R < 2:
        out["note"] = f"{'one replicate' if R == 1 else 'no replicates'}: no pairs of replicates, no test"
        return out
    used = np.ones_like(S, dtype=bool)
    np.fill_diagonal(used, False)
    used[np.arange(R), np.arange(R) + R] = used[np.arange(R) + R, np.arange(R)] = False
    if not np.all(np.isfinite(S[used])):
        raise ValueError("similarity has non-finite entries between ensembles of different replicates")
    if not np.allclose(S[used], S.T[used]):
        raise ValueError("similarity is not symmetric")
    iu, ju = np.triu_indices(R, 1)
    base = np.arange(R)

    def statistic(swaps: np.ndarray) -> np.ndarray:  # swaps: [M, R] of 0/1 -> [M]
        t = base + R * swaps
        c = base + R * (1 - swaps)
        diff: np.ndarray = S[t[:, iu], t[:, ju]].mean(1) - S[c[:, iu], c[:, ju]].mean(1)
        return diff

    observed = float(statistic(np.zeros((1, R), dtype=int))[0])
    out.update(
        diff=observed,
        treated_mean=float(S[iu, ju].mean()),
        control_mean=float(S[iu + R, ju + R].mean()),
        identical_arms=interchangeable_arms(S, R),
    )
    if max_exact >= R:
        swaps = (np.arange(2**R)[:, None] >> base[None, :]) & 1
        extreme = np.abs(statistic(swaps)) >= abs(observed) - _PERM_TOL
        out["p"] = float(extreme.mean())
        out["min_p"] = 2 / 2**R
        out["note"] = f"exact: all {2**R} label swaps of the {R} replicates"
    else:
        rng = np.random.default_rng(seed)
        count = 0
        for start in range(0, n_random, 4096):
            swaps = rng.integers(0, 2, size=(min(4096, n_random - start), R))
            count += int((np.abs(statistic(swaps)) >= abs(observed) - _PERM_TOL).sum())
        out["p"] = (1 + count) / (1 + n_random)
        out["min_p"] = max(2 / 2**R, 1 / (1 + n_random))
        out["note"] = f"{n_random} random label swaps of the {R} replicates (seed {seed}) and the observed one"
    return out


def interchangeable_arms(similarity: np.ndarray, n_replicates: int) -> bool:
    """Whether, in every replicate r, the treated ensemble (row r of the [2R, 2R] `similarity` of
    paired_permutation_test) agrees with every other ensemble exactly as its control (row R + r) does,
    up to the test's tolerance: then swapping their labels changes nothing, every swap's statistic is 0
    and the test's p = 1 is a fact about its design, not evidence (the arms are identical)."""
    R = int(n_replicates)
    S = np.asarray(similarity, dtype=float)
    compared = np.ones((R, 2 * R), dtype=bool)  # a replicate's own two ensembles are never compared
    compared[np.arange(R), np.arange(R)] = compared[np.arange(R), np.arange(R) + R] = False
    return bool(np.all(np.abs(S[:R][compared] - S[R:][compared]) <= _PERM_TOL))


def _fmt(p: float) -> str:
    return f"{p:.3g}"


def verdict(
    test: dict[str, Any],
    higher_is_better: bool = True,
    name: str = "MFR",
    alpha: float = ALPHA,
    p_key: str = "t_test_p",
) -> str:
    """Words for one test of `name` against its control, from a paired_test (or
    paired_permutation_test, p_key="p") result: "better"/"worse" only when test[p_key] < alpha."""
    n = test.get("n", 0)
    diff = test.get("mean_diff", test.get("diff"))
    if n == 0:
        return "no pairs: no test"
    if n == 1:
        return "too few replicates for a test (n=1)"
    if diff == 0 and test.get("sd_diff", 0) == 0:
        return "tie: no difference"
    p = test.get(p_key)
    if p is None:
        return f"no test ({test['note']})" if test.get("note") else "no test"
    if p < alpha:
        assert diff is not None  # a test ran (p is set), so the difference it tested is set
        better = (diff > 0) == higher_is_better
        return f"{name} {'better' if better else 'worse'} (p = {_fmt(p)})"
    return f"no significant difference (p = {_fmt(p)})"


def rank_methods(means: dict[str, float | None], higher_is_better: bool) -> dict[str, Any]:
    """Methods ranked by their mean, best first, with exact ties kept together. Returns `groups` (lists
    of methods with equal means, best group first; None/NaN/inf means left out, listed in `excluded`),
    `best` and `runner_up` (the first two groups, [] where there is none) and `tie` (more than one
    method shares the best mean: no winner)."""
    finite = {m: float(v) for m, v in means.items() if v is not None and np.isfinite(v)}
    order = sorted(finite.values(), reverse=higher_is_better)
    levels = list(dict.fromkeys(order))  # distinct means, best first
    groups = [[m for m in finite if finite[m] == level] for level in levels]
    return {
        "groups": groups,
        "best": groups[0] if groups else [],
        "runner_up": groups[1] if len(groups) > 1 else [],
        "tie": bool(groups) and len(groups[0]) > 1,
        "excluded": [m for m in means if m not in finite],
    }


__all__ = [
    "paired_test",
    "signed_rank_exact_p",
    "holm",
    "set_aside",
    "paired_permutation_test",
    "interchangeable_arms",
    "verdict",
    "rank_methods",
    "ALPHA",
    "WILCOXON_MIN_N",
]
