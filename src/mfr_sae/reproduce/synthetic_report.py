"""report.md of `reproduce synthetic`: the verdict, the setup, the tables of the measures, the
winners and the tests, and links to the figures, from the summary that results.json holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mfr_sae.report import column_decimals, figure_link, fmt_mean_sd, fmt_p, fmt_sig, markdown_table, mean_of
from mfr_sae.reproduce import describe_runs
from mfr_sae.reproduce.synthetic_analysis import CLUSTER_CROSS_MIN, CLUSTER_GT_MAX
from mfr_sae.reproduce.synthetic_figures import FIGURES
from mfr_sae.reproduce.synthetic_stats import (
    BY_CONSTRUCTION,
    IDENTICAL_ARMS,
    ci_text,
    difference,
    identical_to_baseline,
    values_of,
    verdict_words,
)

# The columns of the tables of ground truth and reconstruction, and of agreement.
GROUND_TRUTH_COLUMNS = [
    "method",
    "gt_mmcs",
    "gt_mmcs_hungarian",
    "gt_recovered_frac",
    "gt_mcc",
    "mse",
    "fvu",
    "twin_frac",
    "pairwise_mmcs",
    "pearson_r",
    "cluster_size",
    "reinit_events",
]
AGREEMENT_COLUMNS = [
    "method",
    "across_pw_mcc",
    "across_shared_frac",
    "within_pw_mcc",
    "within_shared_frac",
    "gt_mcc",
    "gt_recovered_frac",
]
# The claims of the verdict, MFR against baseline: measure and its words ({threshold}: of recovery).
CLAIMS = {
    "gt_mmcs": "Ground-truth MMCS",
    "gt_recovered_frac": "Fraction of true features recovered at cosine >= {threshold}",
    "mse": "Reconstruction MSE",
    "across_pw_mcc": "Agreement across independently seeded ensembles (PW-MCC)",
}
IDENTICAL_ROW = "identical to baseline: no reinitialisation fired"


def column_of(methods: dict[str, Any], key: str) -> dict[str, str]:
    """Each method's mean ± sd of one measure (over seed pairs for across_*, else over seeds), every mean
    to the decimals of the column (column_decimals), so that the column reads alike."""
    values = {m: values_of(st, key) for m, st in methods.items()}
    decimals = column_decimals(mean_of(v) for v in values.values())
    return {m: fmt_mean_sd(v, decimals=decimals) for m, v in values.items()}


def mean_sd_table(methods: dict[str, Any], columns: list[str]) -> str:
    """One row per method, a column per measure (column_of); a method whose every number is the
    baseline's is said to be in its row."""
    identical = identical_to_baseline(methods)
    rows = [{"method": f"{m} ({IDENTICAL_ROW})" if m in identical else m} for m in methods]
    for key in columns[1:]:
        for row, text in zip(rows, column_of(methods, key).values()):
            row[key] = text
    return markdown_table(rows, columns)


def _with_sig_digits(row: dict[str, Any]) -> dict[str, Any]:
    """A row of a table of tests with its numbers to the same significant digits (fmt_sig)."""
    return {k: fmt_sig(v) if isinstance(v, float) else v for k, v in row.items()}


def significance_rows(tests: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per test of each method against baseline, with its verdict (on the Holm-adjusted p), or
    why it was not tested."""
    rows = []
    for name, test in tests.items():
        for key, t in test.items():
            diff = difference(t)
            rows.append(
                {
                    "comparison": name,
                    "metric": key,
                    "test": t["test_name"],
                    "n": t["n"],
                    "mean difference": "-" if diff is None else diff,
                    "95% CI": ci_text(t),
                    "p": fmt_p(t["p"]),
                    "p (Holm)": fmt_p(t["p_holm"]),
                    "Wilcoxon p": fmt_p(t.get("wilcoxon_p")),
                    "verdict": verdict_words(t, key, name.split(" vs ")[0]),
                }
            )
    return [_with_sig_digits(row) for row in rows]


def _effect(test: dict[str, Any]) -> str:
    """The difference a test measured, with its 95% CI; a permutation test has none, so its smallest
    attainable p instead (what the seeds could show at best)."""
    diff = difference(test)
    if diff is None:
        return "no difference measured"
    if test.get("ci95") is not None:
        spread = f"95% CI {ci_text(test)}"
    else:
        spread = "no CI" + (f"; smallest attainable p {fmt_p(test['min_p'])}" if test.get("min_p") else "")
    return f"MFR - baseline {fmt_sig(diff)} ({spread})"


def _fixed(values: dict[str, float]) -> str:
    """Values fixed by construction, in words: `within_pw_mcc = 1, within_shared_frac = 1`."""
    return ", ".join(f"{k} = {v:g}" for k, v in values.items())


def _fixed_by_construction() -> str:
    """Every value of BY_CONSTRUCTION, in words, with its method."""
    return "; ".join(f"`{m}`'s {_fixed(values)}" for m, (_, values) in BY_CONSTRUCTION.items())


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """The verdict as a list: a bullet per claim of MFR against baseline (means, effect, CI, the
    Holm-adjusted verdict), then what the numbers must not be read as: identical runs, values fixed by
    construction, and the reinitialisations that fired."""
    methods, main = summary["methods"], summary["tests"]["mfr vs baseline"]
    lines = []
    for key, words in CLAIMS.items():
        shown = column_of(methods, key)
        lines.append(
            f"- {words.format(threshold=summary['threshold'])}: MFR {shown['mfr']} vs baseline "
            f"{shown['baseline']}; {_effect(main[key])}: {verdict_words(main[key], key, 'MFR')}."
        )
    for m in identical_to_baseline(methods):
        lines.append(
            f"- `{m}` is {IDENTICAL_ROW} in any seed, so every number of it is the baseline's: not a result "
            f"of its own; its comparisons with baseline are {IDENTICAL_ARMS}."
        )
    for m, (why, values) in BY_CONSTRUCTION.items():
        if m in methods:
            lines.append(f"- `{m}`: {_fixed(values)} by construction ({why}): not a finding, left out of every test.")
    events = {m: int(sum(methods[m]["per_seed"]["reinit_events"])) for m in ("reinit", "mfr")}
    lines.append(
        f"- Reinitialisation events: {events['reinit']} in the `reinit` runs and {events['mfr']} in the `mfr` "
        f"runs (threshold {summary['reinit_threshold']})."
    )
    return lines


def write_report(out: Path, summary: dict[str, Any], figures: dict[str, Path]) -> None:
    """out/report.md from the summary (results.json) and the figures' paths (draw_figures)."""
    s = summary
    methods = s["methods"]
    n_seeds = len(s["seeds"])
    test_rows = significance_rows(s["tests"])
    family = s["multiple_comparisons"]["family_size"]
    untested = sum(bool(t.get("not_tested")) for by_key in s["tests"].values() for t in by_key.values())
    min_perm = 2 / 2**n_seeds
    if n_seeds == 1:
        testing = (
            "One seed: one replicate per method, so no test is made and no p-value is given; the "
            "numbers below describe that one replicate."
        )
    else:
        testing = (
            f"Tests are over the {n_seeds} seeds (the replicates), two-sided; p-values in the verdicts "
            f"are Holm-adjusted over the family of the {family} tests of the Significance section (the "
            f"{untested} comparisons whose outcome is fixed before any data are not tested, not counted)."
        )
    lines = [
        "# Reproduction: MFR on the paper's synthetic data",
        "",
        f"Generated by `mfr-sae reproduce synthetic{' --quick' if s['quick'] else ''} --seeds {len(s['seeds'])}` "
        f"on {s['machine']}. {describe_runs(s['runs'], s['seconds'])}",
        "",
        "## Verdict",
        "",
        testing,
        "",
        f"Across {n_seeds} seed{'s' if n_seeds != 1 else ''}, MFR vs baseline (mean ± sd over seeds, over seed "
        "pairs for agreement across ensembles):",
        "",
        *verdict_lines(s),
        "",
        *(
            [
                "This is the `--quick` setting: "
                f"{s['config']['train']['n_samples']:,} training vectors, far below the paper's scale, so the SAEs "
                "are not converged and these numbers describe early training. The paper-scale run is the same "
                "command without `--quick`.",
                "",
            ]
            if s["quick"]
            else []
        ),
        "## Setup",
        "",
        "Data (the paper's Section 3.1): "
        + ", ".join(
            f"{k}={v}"
            for k, v in s["config"]["data"].items()
            if k in ("d", "n_features", "n_groups", "n_active", "decay", "normalize_features", "seed")
        ),
        "",
        "SAEs: "
        + ", ".join(f"{k}={v}" for k, v in s["config"]["sae"].items() if k != "shared_init")
        + "; training: "
        + ", ".join(
            f"{k}={v}"
            for k, v in s["config"]["train"].items()
            if k in ("n_samples", "batch_size", "lr", "weight_decay")
        ),
        "",
        "MFR: " + ", ".join(f"{k}={v}" for k, v in s["config"]["mfr"].items() if k != "enabled"),
        "",
        "Methods: `baseline` (no penalty, no reinitialisation), `reinit` (reinitialisation alone, beta=0), "
        "`mfr` (reinitialisation and penalty), `shared_init` (no penalty; both members start from one "
        "initialisation). All runs share the true features (data.seed=0); a seed sets the sample stream "
        "(data.stream_seed) and the initialisation, so seeds are independent replicates; seeds "
        f"{s['seeds']}. Evaluation on {s['config']['eval']['n_samples']} held-out vectors.",
        "",
        "## Ground truth and reconstruction (mean ± sd over seeds; a seed's value is the mean over its members)",
        "",
        mean_sd_table(methods, GROUND_TRUTH_COLUMNS),
        "",
        "Every mean of a column to the same decimals (3 significant digits of its smallest nonzero mean, at "
        "most 4 of its largest), sds to 2 significant digits. "
        "`pearson_r`: Pearson correlation of Figure 3 (paper: 0.625 baseline, 0.668 with reinitialisation; "
        "undefined when the members are identical); "
        f"`cluster_size`: latents per SAE with cross-SAE cosine >= {CLUSTER_CROSS_MIN} and true-feature "
        f"cosine < {CLUSTER_GT_MAX} (paper: about 15 or about 5).",
        "",
        "## Agreement inside an ensemble and across ensembles (the honest test)",
        "",
        "`within_*`: the two members of one ensemble (mean ± sd over seeds). `across_*`: member m of the "
        "ensemble of one seed against member m of another seed's ensemble of the same method (mean ± sd over "
        f"seed pairs). PW-MCC: mean cosine of one-to-one matched latents; shared fraction: matched cosine > "
        f"{s['shared_threshold']}.",
        "",
        mean_sd_table(methods, AGREEMENT_COLUMNS),
        "",
        "Which method wins on which measure: the best mean (methods whose means are equal to the 3 "
        "significant digits printed are a tie, never a winner); its test against the runner-up (the same "
        "tests as in the Significance section); p "
        f"Holm-adjusted over the {sum(w['p'] != '-' for w in s['winners'])} tests with a p-value in this table "
        "(a family of its own); `clear win`: adjusted p below 0.05, never for a value fixed by construction.",
        "",
        markdown_table([_with_sig_digits(w) for w in s["winners"]], list(s["winners"][0])),
        "",
        "## Significance",
        "",
        "Each method against baseline, two-sided, the unit a seed (one replicate: its own samples and "
        "initialisation, the same for every method, so methods are paired by seed). Per-seed measures: paired "
        "t-test; `mean difference` is method - baseline, with its t-based 95% CI. The across_* measures have "
        "one value per seed PAIR, and the pairs share seeds, so they are not independent: their test is a "
        "permutation test over seeds (the method and baseline labels of a seed's two ensembles are swapped "
        f"together; difference = mean across-seed agreement of the method - of baseline); with {n_seeds} "
        f"seed{'s' if n_seeds != 1 else ''} its smallest attainable p is "
        f"{'undefined (no seed pairs)' if n_seeds < 2 else f'{min_perm:.3g}'}, so it cannot reject at 0.05 "
        "below 6 seeds. `p (Holm)`: Holm-adjusted over the family of all "
        f"{family} tests in this table that have a p-value; the verdicts use it. Wilcoxon signed-rank p "
        "(exact, unadjusted, a check on the t-test) only where at least 6 seed differences are nonzero: with "
        "5 or fewer it cannot go below 0.0625. Not tested, and left out of the family, the "
        f"{untested} comparisons whose outcome is fixed before any data: `{IDENTICAL_ARMS}` where every "
        "paired difference is exactly 0 (a method whose runs are the baseline's, a measure 0 in both), and "
        "values fixed by "
        f"construction ({_fixed_by_construction()}).",
        "",
        markdown_table(test_rows, list(test_rows[0])),
        "",
        "## Figures",
        "",
    ]
    for name, path in figures.items():
        lines += [f"### {name}", "", figure_link(path, FIGURES[name][1]), ""]
    (out / "report.md").write_text("\n".join(lines))
