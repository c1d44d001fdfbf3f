"""`mfr-sae reproduce synthetic`: baseline vs MFR on the paper's synthetic data (paper Section 3).

Four methods, each trained once per seed on the same data (data.seed=0; the seed sets the members'
initialisation, so methods are compared in pairs): `baseline` (penalty and reinitialisation off),
`reinit` (the reinitialisation alone, mfr.beta=0), `mfr` (reinitialisation and penalty) and
`shared_init` (no penalty; the members start from one shared initialisation: the cheap way to make
members agree). Besides ground-truth recovery, the report measures agreement INSIDE an ensemble (its
two members) and ACROSS independently seeded ensembles of a method (PW-MCC and shared-latent fraction,
member m of one seed against member m of another): agreement that is real should show across seeds.
Runs already finished in DIR/runs are reused and interrupted ones resumed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from itertools import combinations  # noqa: E402

from mfr_sae.checkpoint import load  # noqa: E402
from mfr_sae.files import write_json  # noqa: E402
from mfr_sae.compare import decoder_agreement  # noqa: E402
from mfr_sae.config import PAPER_MFR, RunConfig, load_config  # noqa: E402
from mfr_sae.data import make_source  # noqa: E402
from mfr_sae.metrics import feature_agreement, reconstruction_metrics  # noqa: E402
from mfr_sae.report import (count_axis, figure_link, fmt_mean_sd, fmt_p, markdown_table, round_sig,  # noqa: E402
                             save_figure)
from mfr_sae.reproduce import RunTracker, describe_runs, machine  # noqa: E402
from mfr_sae.stats import ALPHA, holm, paired_permutation_test, paired_test, rank_methods, verdict  # noqa: E402
from mfr_sae.train import METRICS_FILE  # noqa: E402

METHODS = {
    "baseline": ["mfr.enabled=false"],
    "reinit": ["mfr.enabled=true", "mfr.beta=0"],
    "mfr": ["mfr.enabled=true"],
    "shared_init": ["mfr.enabled=false", "sae.shared_init=true"],
}
DATA_SEED = 0
# The paper's setting is the config defaults (SPEC sections 1-3); only the logging is added.
FULL = ["eval.every=100", "train.checkpoint_every=100"]
# --quick: the same data and SAEs, 800k vectors in batches of 2,000 (the paper's batch is lost; the
# reference code used 10,000), so that 3 seeds x 4 methods finish in minutes on 2 CPU cores.
QUICK = ["train.n_samples=800000", "train.batch_size=2000", "eval.every=50", "eval.n_samples=10000",
         "train.checkpoint_every=100", "mfr.reinit_samples=10000"]
# Paper Figure 5's cluster: latents that another SAE also learned but that match no true feature.
CLUSTER_CROSS_MIN = 0.9
CLUSTER_GT_MAX = 0.5
SUMMARY_KEYS = ["gt_mmcs", "gt_mmcs_hungarian", "gt_recovered_frac", "gt_mcc", "mse", "fvu", "dead_frac",
                "silent_frac", "twin_frac",
                "pairwise_mmcs", "within_pw_mcc", "within_shared_frac", "pearson_r", "cluster_size",
                "reinit_events"]
ACROSS_KEYS = ["across_pw_mcc", "across_shared_frac"]
# The report's figures: file (beside report.md) and caption.
FIGURES = {
    "Figure 3": ("fig3_agreement.png",
                 "Figure 3: each latent's cosine to its matched latent in the other member (x) against its "
                 "cosine to its matched true feature (y), seed 0 of each method; the grey lines bound the "
                 "Figure 5 cluster."),
    "Figure 5": ("fig5_cluster_firing.png",
                 f"Figure 5: firing probability of the cluster latents (cosine >= {CLUSTER_CROSS_MIN} to their "
                 f"matched latent in the other member, < {CLUSTER_GT_MAX} to their matched true feature) and of "
                 "the rest, all seeds."),
    "Figure 7": ("fig7_reinit_metric.png",
                 "Figure 7: the reinitialisation metric of each baseline member over the first steps, coloured "
                 "by the member's final cluster size; dashed, the threshold."),
    "Figure 8": ("fig8_recovery.png",
                 "Figure 8: ground-truth recovery over training (MMCS and fraction of true features recovered), "
                 "mean ± sd over seeds."),
}


def run_config(method: str, seed: int, quick: bool, overrides: list[str] = ()) -> RunConfig:
    return load_config(None, PAPER_MFR + (QUICK if quick else FULL) + list(overrides) + METHODS[method]
                       + [f"data.seed={DATA_SEED}", f"train.seed={seed}"])


def _mean_of_measured(values: list[float | None]) -> float | None:
    """The mean of the values that were measured (dead_frac is None in runs shorter than its window)."""
    measured = [v for v in values if v is not None]
    return float(np.mean(measured)) if measured else None


def analyse_run(cfg: RunConfig, run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Ensemble-level numbers of one run, and the per-latent data behind Figures 3, 5, 7 and 8."""
    ensemble = load(run_dir)
    source = make_source(cfg.data)
    truth = source.ground_truth
    decoder = ensemble.decoder().detach()
    firing = reconstruction_metrics(ensemble, source.eval_vectors(cfg.eval.n_samples))["firing_prob"]
    cross, gt, fire, cluster_sizes, rs = [], [], [], [], []
    for a, b in [(0, 1), (1, 0)]:  # each member against the other, as in the paper's Figure 3
        x, y = feature_agreement(decoder[a], decoder[b], truth)
        cross.append(x)
        gt.append(y)
        fire.append(firing[a].numpy())
        cluster_sizes.append(int(((x >= CLUSTER_CROSS_MIN) & (y < CLUSTER_GT_MAX)).sum()))
        rs.append(stats.pearsonr(x, y).statistic if np.ptp(x) > 1e-6 else None)  # identical members: no r
    log = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    members = results["members"]
    summary = {key: _mean_of_measured([m.get(key) for m in members])
               for key in ["gt_mmcs", "gt_mmcs_hungarian", "gt_recovered_frac", "gt_mcc", "mse", "fvu",
                           "dead_frac", "silent_frac", "twin_frac"]}
    within_mcc, within_shared, _ = decoder_agreement(decoder[0], decoder[1])
    rs = [r for r in rs if r is not None]
    summary.update(pairwise_mmcs=results["pairwise_mmcs"], within_pw_mcc=within_mcc,
                   within_shared_frac=within_shared, pearson_r=float(np.mean(rs)) if rs else None,
                   cluster_size=float(np.mean(cluster_sizes)), reinit_events=len(results["reinit_events"]))
    return {
        "summary": summary,
        "decoder": decoder,
        "beta": results["beta"],
        "cluster_sizes": cluster_sizes,
        "cross": np.concatenate(cross), "gt": np.concatenate(gt), "firing": np.concatenate(fire),
        "curve": [(r["step"] * cfg.train.batch_size, [m["gt_mmcs"] for m in r["eval"]],
                   [m["gt_recovered_frac"] for m in r["eval"]]) for r in log if "eval" in r],
        "reinit_metric": [(r["step"], r["reinit_metric"]) for r in log if "reinit_metric" in r],
    }


# ---------------------------------------------------------------- figures

def figure_agreement(runs: dict[str, list[dict]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4), sharey=True)
    for ax, (method, seeds) in zip(axes, runs.items()):
        first = seeds[0]
        r = stats.pearsonr(first["cross"], first["gt"]).statistic
        ax.scatter(first["cross"], first["gt"], s=4, alpha=0.5)
        ax.set_title(f"{method} (seed 0): r = {r:.3f}")
        ax.set_xlabel("cosine to matched latent of the other SAE")
        ax.axvline(CLUSTER_CROSS_MIN, color="grey", lw=0.5)
        ax.axhline(CLUSTER_GT_MAX, color="grey", lw=0.5)
    axes[0].set_ylabel("cosine to matched true feature")
    fig.suptitle("Figure 3: agreement across SAEs vs agreement with the true features (Hungarian pairs)")
    save_figure(fig, path)


def figure_cluster_firing(runs: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    data, labels = [], []
    for method, seeds in runs.items():
        cross = np.concatenate([s["cross"] for s in seeds])
        gt = np.concatenate([s["gt"] for s in seeds])
        firing = np.concatenate([s["firing"] for s in seeds])
        cluster = (cross >= CLUSTER_CROSS_MIN) & (gt < CLUSTER_GT_MAX)
        data += [firing[cluster] if cluster.any() else np.array([np.nan]), firing[~cluster]]
        labels += [f"{method}\ncluster (n={cluster.sum()})", f"{method}\nrest (n={(~cluster).sum()})"]
    ax.boxplot([d[~np.isnan(d)] if np.isfinite(d).any() else [0] for d in data], tick_labels=labels)
    ax.set_ylabel("firing probability after TopK (held-out data)")
    ax.set_title(f"Figure 5: latents with cross-SAE cosine >= {CLUSTER_CROSS_MIN} "
                 f"and true-feature cosine < {CLUSTER_GT_MAX}", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    save_figure(fig, path)


def figure_reinit_metric(seeds: list[dict], threshold: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = [size for s in seeds for size in s["cluster_sizes"]]
    cmap, top = plt.get_cmap("coolwarm"), max(max(sizes), 1)
    for s in seeds:
        if not s["reinit_metric"]:
            continue
        steps = [step for step, _ in s["reinit_metric"]]
        for member, size in enumerate(s["cluster_sizes"]):
            ax.plot(steps, [m[member] for _, m in s["reinit_metric"]], color=cmap(size / top), lw=1)
    ax.axhline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_xlabel("training step")
    ax.set_ylabel("M = mean_j (|p_j - k/h| / (k/h))^3")
    ax.set_yscale("log")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
    fig.colorbar(sm, ax=ax, label="final cluster size of the member (latents)")
    ax.legend()
    ax.set_title("Figure 7: reinitialisation metric over the first steps (baseline members)", fontsize=9)
    save_figure(fig, path)


def figure_recovery(runs: dict[str, list[dict]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, seeds in runs.items():
        samples = [c[0] for c in seeds[0]["curve"]]
        for ax, index, name in [(axes[0], 1, "MMCS to true features"), (axes[1], 2, "fraction recovered")]:
            values = np.array([[np.mean(c[index]) for c in s["curve"]] for s in seeds])
            mean, sd = values.mean(0), values.std(0)
            ax.plot(samples, mean, label=method)
            ax.fill_between(samples, mean - sd, mean + sd, alpha=0.2)
            ax.set_xlabel("training vectors")
            ax.set_ylabel(name)
            count_axis(ax.xaxis)
    axes[0].legend()
    fig.suptitle("Figure 8: ground-truth recovery over training (mean ± sd over seeds)")
    save_figure(fig, path)


# ---------------------------------------------------------------- report

LOWER_IS_BETTER = {"mse", "fvu", "cluster_size", "dead_frac", "silent_frac", "twin_frac"}


def values_of(method_stats: dict[str, Any], key: str) -> list:
    return (method_stats["per_seed_pair"] if key in ACROSS_KEYS else method_stats["per_seed"])[key]


def compare_methods(treated: str, control: str, per_method: dict[str, Any], agreement: AcrossAgreement,
                    key: str) -> dict[str, Any]:
    """One test of `treated` against `control` on one measure, over seeds (the replicates): a paired
    t-test of the per-seed values, or, for the across_* measures (whose values are seed PAIRS, not
    independent), the permutation test that swaps the two methods' labels inside each seed."""
    if key in ACROSS_KEYS:
        test = agreement.permutation_test(treated, control, key)
        test["test_name"] = "permutation over seeds"
    else:
        test = paired_test(values_of(per_method[treated], key), values_of(per_method[control], key))
        test.update(test_name="paired t over seeds", p=test["t_test_p"])
    return test


def add_holm(tests: list[dict[str, Any]]) -> int:
    """Holm-adjusted p (`p_holm`) over the family `tests` (each test's `p`); the family's size."""
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = adjusted
    return sum(t["p"] is not None for t in tests)


def _diff(test: dict[str, Any]) -> float | None:
    return test.get("mean_diff", test.get("diff"))


def _ci(test: dict[str, Any]) -> str:
    ci = test.get("ci95")
    return "-" if ci is None else f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def winners(methods: dict[str, Any], keys: list[str], agreement: AcrossAgreement) -> list[dict[str, Any]]:
    """For each measure: the method with the best mean (a tie when several share it at the precision
    printed, round_sig) and its test against the runner-up (against each runner-up when several share
    second place, the largest p kept), Holm-adjusted over the tests of this table."""
    rows, tests, ties = [], [], []
    for key in keys:
        means = {m: float(np.mean(vs)) if (vs := [v for v in values_of(st, key) if v is not None]) else None
                 for m, st in methods.items()}
        # ranked as printed: means that read the same are a tie, never a win
        ranking = rank_methods({m: None if v is None else round_sig(v) for m, v in means.items()},
                               key not in LOWER_IS_BETTER)
        best, second = ranking["best"], ranking["runner_up"]
        test = None
        if best and not ranking["tie"] and second:
            candidates = [compare_methods(best[0], other, methods, agreement, key) for other in second]
            test = max(candidates, key=lambda t: 2.0 if t["p"] is None else t["p"])
        tests.append(test)
        ties.append(ranking["tie"])
        rows.append({"measure": key, "best": " = ".join(best) or "-",
                     "mean": means[best[0]] if best else "-",
                     "runner-up": " = ".join(second) or "-", "runner-up mean": means[second[0]] if second else "-",
                     "difference": _diff(test) if test else "-", "95% CI": _ci(test) if test else "-",
                     "p": fmt_p(test["p"]) if test else "-", "test": test["test_name"] if test else "-"})
    family = [t for t in tests if t is not None]
    add_holm(family)
    for row, test, tie in zip(rows, tests, ties):
        row["p (Holm)"] = fmt_p(test["p_holm"]) if test else "-"
        row["clear win"] = ("no (tie)" if tie else
                            "no test" if test is None or test["p_holm"] is None else
                            "yes" if test["p_holm"] < ALPHA else "no")
    return rows


def write_report(out: Path, summary: dict[str, Any], figures: dict[str, Path]) -> None:
    s = summary
    methods = s["methods"]
    mfr, base = methods["mfr"]["per_seed"], methods["baseline"]["per_seed"]
    rows = [{"method": m, **{k: fmt_mean_sd(v) for k, v in st["per_seed"].items()}} for m, st in methods.items()]
    cols = ["method", "gt_mmcs", "gt_mmcs_hungarian", "gt_recovered_frac", "gt_mcc", "mse", "fvu",
            "twin_frac", "pairwise_mmcs", "pearson_r", "cluster_size", "reinit_events"]
    agreement_rows = [{"method": m, **{k: fmt_mean_sd(v) for k, v in st["per_seed_pair"].items()},
                       **{k: fmt_mean_sd(st["per_seed"][k]) for k in ("within_pw_mcc", "within_shared_frac",
                                                                      "gt_mcc", "gt_recovered_frac")}}
                      for m, st in methods.items()]
    n_seeds = len(s["seeds"])
    test_rows = []
    for name, test in s["tests"].items():
        for key, t in test.items():
            diff = _diff(t)
            test_rows.append({"comparison": name, "metric": key, "test": t["test_name"], "n": t["n"],
                              "mean difference": "-" if diff is None else diff, "95% CI": _ci(t),
                              "p": fmt_p(t["p"]), "p (Holm)": fmt_p(t["p_holm"]),
                              "Wilcoxon p": fmt_p(t.get("wilcoxon_p")),
                              "verdict": verdict(t, key not in LOWER_IS_BETTER, name.split(" vs ")[0],
                                                 p_key="p_holm")})
    main = s["tests"]["mfr vs baseline"]

    def v(key: str) -> str:
        return verdict(main[key], key not in LOWER_IS_BETTER, p_key="p_holm")

    family = s["multiple_comparisons"]["family_size"]
    min_perm = 2 / 2 ** n_seeds
    if n_seeds == 1:
        testing = ("One seed: one replicate per method, so no test is made and no p-value is given; the "
                   "numbers below describe that one replicate.")
    else:
        testing = (f"Tests are over the {n_seeds} seeds (the replicates), two-sided; p-values in the verdicts "
                   f"are Holm-adjusted over the family of the {family} tests of the Significance section.")
    n_reinit = {m: int(sum(methods[m]["per_seed"]["reinit_events"])) for m in ("reinit", "mfr")}
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
        f"Across {n_seeds} seed{'s' if n_seeds != 1 else ''}, MFR vs baseline: ground-truth MMCS "
        f"{fmt_mean_sd(mfr['gt_mmcs'])} vs "
        f"{fmt_mean_sd(base['gt_mmcs'])} ({v('gt_mmcs')}); fraction of true features recovered "
        f"at cosine >= {s['threshold']} {fmt_mean_sd(mfr['gt_recovered_frac'])} vs "
        f"{fmt_mean_sd(base['gt_recovered_frac'])} ({v('gt_recovered_frac')}); reconstruction MSE "
        f"{fmt_mean_sd(mfr['mse'])} vs {fmt_mean_sd(base['mse'])} ({v('mse')}); agreement "
        f"across independently seeded ensembles (PW-MCC) "
        f"{fmt_mean_sd(methods['mfr']['per_seed_pair']['across_pw_mcc'])} vs "
        f"{fmt_mean_sd(methods['baseline']['per_seed_pair']['across_pw_mcc'])} "
        f"({v('across_pw_mcc')}).",
        "",
        f"Reinitialisation events: {n_reinit['reinit']} in the `reinit` runs and {n_reinit['mfr']} in the "
        f"`mfr` runs (threshold {s['reinit_threshold']}).",
        "",
        *(["This is the `--quick` setting: "
           f"{s['config']['train']['n_samples']:,} training vectors, far below the paper's scale, so the SAEs "
           "are not converged and these numbers describe early training. The paper-scale run is the same "
           "command without `--quick`.", ""] if s["quick"] else []),
        "## Setup",
        "",
        "Data (SPEC section 1): " + ", ".join(f"{k}={v}" for k, v in s["config"]["data"].items()
                                               if k in ("d", "n_features", "n_groups", "n_active", "decay",
                                                        "normalize_features", "seed")),
        "",
        "SAEs: " + ", ".join(f"{k}={v}" for k, v in s["config"]["sae"].items() if k != "shared_init")
        + "; training: " + ", ".join(f"{k}={v}" for k, v in s["config"]["train"].items()
                                     if k in ("n_samples", "batch_size", "lr", "weight_decay")),
        "",
        "MFR: " + ", ".join(f"{k}={v}" for k, v in s["config"]["mfr"].items() if k != "enabled"),
        "",
        "Methods: `baseline` (no penalty, no reinitialisation), `reinit` (reinitialisation alone, beta=0), "
        "`mfr` (reinitialisation and penalty), `shared_init` (no penalty; both members start from one "
        "initialisation). All runs see the same data (data.seed=0); a seed sets the initialisation; seeds "
        f"{s['seeds']}. Evaluation on {s['config']['eval']['n_samples']} held-out vectors.",
        "",
        "## Ground truth and reconstruction (mean ± sd over seeds; a seed's value is the mean over its members)",
        "",
        markdown_table(rows, cols),
        "",
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
        markdown_table(agreement_rows, ["method", "across_pw_mcc", "across_shared_frac", "within_pw_mcc",
                                        "within_shared_frac", "gt_mcc", "gt_recovered_frac"]),
        "",
        "Which method wins on which measure: the best mean (methods whose means are equal to the 3 "
        "significant digits printed are a tie, never a winner); its test against the runner-up (the same "
        "tests as in the Significance section); p "
        f"Holm-adjusted over the {sum(w['p'] != '-' for w in s['winners'])} tests with a p-value in this table "
        "(a family of its own); `clear win`: adjusted p below 0.05.",
        "",
        markdown_table(s["winners"], list(s["winners"][0])),
        "",
        "## Significance",
        "",
        "Each method against baseline, two-sided, the unit a seed (one replicate: the same data and "
        "initialisation seed for every method, so methods are paired by seed). Per-seed measures: paired "
        "t-test; `mean difference` is method - baseline, with its t-based 95% CI. The across_* measures have "
        "one value per seed PAIR, and the pairs share seeds, so they are not independent: their test is a "
        "permutation test over seeds (the method and baseline labels of a seed's two ensembles are swapped "
        f"together; difference = mean across-seed agreement of the method - of baseline); with {n_seeds} "
        f"seed{'s' if n_seeds != 1 else ''} its smallest attainable p is "
        f"{'undefined (no seed pairs)' if n_seeds < 2 else f'{min_perm:.3g}'}, so it cannot reject at 0.05 "
        "below 6 seeds. `p (Holm)`: Holm-adjusted over the family of all "
        f"{family} tests in this table that have a p-value; the verdicts use it. Wilcoxon signed-rank p "
        "(exact, unadjusted, a check on the t-test) only where at least 6 seed differences are nonzero: with "
        "5 or fewer it cannot go below 0.0625.",
        "",
        markdown_table(test_rows, list(test_rows[0])),
        "",
        "## Figures",
        "",
    ]
    for name, path in figures.items():
        lines += [f"### {name}", "", figure_link(path, FIGURES[name][1]), ""]
    (out / "report.md").write_text("\n".join(lines))


class AcrossAgreement:
    """Agreement between two ensembles (of any methods and seeds): member m of one against member m of
    the other, averaged over m; PW-MCC and shared-latent fraction. Each pair is computed once."""

    def __init__(self, runs: dict[str, list[dict]], threshold: float):
        self.runs, self.threshold, self.cache = runs, threshold, {}

    def __call__(self, a: tuple[str, int], b: tuple[str, int]) -> dict[str, float]:
        key = (min(a, b), max(a, b))
        if key not in self.cache:
            x, y = self.runs[a[0]][a[1]]["decoder"], self.runs[b[0]][b[1]]["decoder"]
            pairs = [decoder_agreement(x[m], y[m], self.threshold) for m in range(len(x))]
            self.cache[key] = {"across_pw_mcc": float(np.mean([p[0] for p in pairs])),
                               "across_shared_frac": float(np.mean([p[1] for p in pairs]))}
        return self.cache[key]

    def per_seed_pair(self, method: str) -> dict[str, list[float]]:
        """Across-seed agreement of one method's ensembles, one value per seed pair (descriptive: the
        pairs share seeds, so they are not independent)."""
        pairs = [self((method, a), (method, b)) for a, b in combinations(range(len(self.runs[method])), 2)]
        return {key: [p[key] for p in pairs] for key in ACROSS_KEYS}

    def permutation_test(self, treated: str, control: str, key: str) -> dict[str, Any]:
        """paired_permutation_test of `treated` against `control` on one across_* measure: index r is
        treated's ensemble of seed r, R + r control's of the same seed."""
        n = len(self.runs[treated])
        ensembles = [(treated, r) for r in range(n)] + [(control, r) for r in range(n)]
        similarity = np.full((2 * n, 2 * n), np.nan)
        for i, j in combinations(range(2 * n), 2):
            if j != i + n:  # the two ensembles of one seed are never compared by the test
                similarity[i, j] = similarity[j, i] = self(ensembles[i], ensembles[j])[key]
        return paired_permutation_test(similarity, n)


def reproduce_synthetic(out: str | Path, quick: bool = False, n_seeds: int | None = None,
                        progress: bool = True, overrides: list[str] = (),
                        shared_threshold: float = 0.7) -> dict[str, Any]:
    """Train every method on every seed, analyse, and write report.md, results.json and the figures.
    `overrides` (section.field=value) change the setting of every run, e.g. for a smaller test."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(n_seeds if n_seeds is not None else (3 if quick else 5)))
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    tracker = RunTracker(len(seeds) * len(METHODS), out, progress)
    for seed in seeds:
        for method in METHODS:
            cfg = run_config(method, seed, quick, overrides)
            run_dir = out / "runs" / f"{method}-seed{seed}"
            results = tracker.run(f"{method}, seed {seed}", cfg, run_dir)
            runs[method].append(analyse_run(cfg, run_dir, results))
    cfg = run_config("mfr", 0, quick, overrides)
    agreement = AcrossAgreement(runs, shared_threshold)
    per_method = {m: {"per_seed": {k: [r["summary"][k] for r in rs] for k in SUMMARY_KEYS},
                      "per_seed_pair": agreement.per_seed_pair(m),
                      "beta": [r["beta"] for r in rs]} for m, rs in runs.items()}
    compare = ["gt_mmcs", "gt_mmcs_hungarian", "gt_recovered_frac", "gt_mcc", "mse", "fvu", "pearson_r",
               "cluster_size", "within_pw_mcc"] + ACROSS_KEYS
    tests = {f"{m} vs baseline": {k: compare_methods(m, "baseline", per_method, agreement, k) for k in compare}
             for m in ("mfr", "reinit", "shared_init")}
    family_size = add_holm([t for by_key in tests.values() for t in by_key.values()])
    figures = {name: out / file for name, (file, _) in FIGURES.items()}
    paper_methods = {m: runs[m] for m in ("baseline", "reinit", "mfr")}
    figure_agreement(paper_methods, figures["Figure 3"])
    figure_cluster_firing(paper_methods, figures["Figure 5"])
    figure_reinit_metric(runs["baseline"], cfg.mfr.reinit_threshold, figures["Figure 7"])
    figure_recovery(runs, figures["Figure 8"])
    summary = {
        "experiment": "synthetic",
        "quick": quick,
        "seeds": seeds,
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": tracker.summary(),
        "threshold": cfg.eval.recovered_threshold,
        "shared_threshold": shared_threshold,
        "reinit_threshold": cfg.mfr.reinit_threshold,
        "config": cfg.to_dict(),
        "methods": per_method,
        "tests": tests,
        "multiple_comparisons": {
            "method": "holm", "alpha": ALPHA, "family_size": family_size,
            "family": "every test in `tests` (mfr, reinit and shared_init each against baseline, on every "
                      "measure compared) that has a p-value; the `winners` tests are a second family"},
        "winners": winners(per_method, ["across_pw_mcc", "across_shared_frac", "within_pw_mcc", "gt_mcc",
                                        "gt_mmcs", "gt_recovered_frac", "mse"], agreement),
        "figures": {k: v.name for k, v in figures.items()},
    }
    write_json(out / "results.json", summary)
    write_report(out, summary, figures)
    return summary
