"""The figures of `reproduce synthetic` (the paper's Figures 3, 5, 7 and 8), drawn from the analysed
runs (synthetic_analysis.analyse_run), each a PNG beside report.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from scipy import stats

from mfr_sae.report import count_axis, save_figure
from mfr_sae.reproduce.synthetic_analysis import CLUSTER_CROSS_MIN, CLUSTER_GT_MAX, RunAnalysis

# The report's figures: file (beside report.md) and caption.
FIGURES = {
    "Figure 3": (
        "fig3_agreement.png",
        "Figure 3: each latent's cosine to its matched latent in the other member (x) against its "
        "cosine to its matched true feature (y), seed 0 of each method; the grey lines bound the "
        "Figure 5 cluster.",
    ),
    "Figure 5": (
        "fig5_cluster_firing.png",
        f"Figure 5: firing probability of the cluster latents (cosine >= {CLUSTER_CROSS_MIN} to their "
        f"matched latent in the other member, < {CLUSTER_GT_MAX} to their matched true feature) and of "
        "the rest, all seeds.",
    ),
    "Figure 7": (
        "fig7_reinit_metric.png",
        "Figure 7: the reinitialisation metric of each baseline member over the first steps, coloured "
        "by the member's final cluster size; dashed, the threshold.",
    ),
    "Figure 8": (
        "fig8_recovery.png",
        "Figure 8: ground-truth recovery over training (MMCS and fraction of true features recovered), "
        "mean ± sd over seeds; each method has its own line style and markers, so that lines that "
        "coincide (a method identical to another is named so in the legend) all show.",
    ),
}


def figure_agreement(runs: dict[str, list[RunAnalysis]], path: Path) -> None:
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


def figure_cluster_firing(runs: dict[str, list[RunAnalysis]], path: Path) -> None:
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
    ax.set_title(
        f"Figure 5: latents with cross-SAE cosine >= {CLUSTER_CROSS_MIN} and true-feature cosine < {CLUSTER_GT_MAX}",
        fontsize=9,
    )
    ax.tick_params(axis="x", labelsize=7)
    save_figure(fig, path)


def figure_reinit_metric(seeds: list[RunAnalysis], threshold: float, path: Path) -> None:
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
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=Normalize(0, top))
    fig.colorbar(sm, ax=ax, label="final cluster size of the member (latents)")
    ax.legend()
    ax.set_title("Figure 7: reinitialisation metric over the first steps (baseline members)", fontsize=9)
    save_figure(fig, path)


# One look per method, in drawing order, so that coinciding curves all show (reinit's is the baseline's
# when no reinitialisation fires): the first widest and solid underneath, the later ones thinner and
# dashed on top of it, their markers on different evaluations.
LINE_STYLES = [
    {"ls": "-", "lw": 3.2, "marker": "o"},
    {"ls": "--", "lw": 2.0, "marker": "s"},
    {"ls": "-.", "lw": 1.6, "marker": "^"},
    {"ls": ":", "lw": 1.6, "marker": "D"},
]


def _curves(seeds: list[RunAnalysis], index: int) -> np.ndarray:
    """[seeds, evaluations]: one recovery measure of the logged curve (index 1 MMCS, 2 fraction
    recovered), averaged over the members."""
    return np.array([[np.mean(c[index]) for c in s["curve"]] for s in seeds])


def _label(method: str, curves: dict[str, list[np.ndarray]]) -> str:
    """The method's legend entry, naming the method drawn before it whose curves it repeats exactly."""
    earlier = list(curves)[: list(curves).index(method)]
    same = [m for m in earlier if all(np.array_equal(a, b) for a, b in zip(curves[method], curves[m]))]
    return f"{method} (identical to {same[0]})" if same else method


def _say_if_all_zero(ax: Axes, values: list[np.ndarray], words: str) -> None:
    """A panel whose every value is 0 is drawn on [0, 1] with `words` in it, rather than as a flat line
    on an axis around 0 that reads as a measured band."""
    if not any(np.any(v != 0) for v in values):
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, words, transform=ax.transAxes, ha="center", va="center", fontsize=9)


def recovery_figure(runs: dict[str, list[RunAnalysis]], threshold: float) -> Figure:
    """Figure 8: MMCS and the fraction of true features recovered (cosine >= `threshold`) over training,
    mean ± sd over seeds, every method's line visible (LINE_STYLES) and unaltered."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [
        (1, "MMCS to true features", "MMCS is 0 at every evaluation"),
        (
            2,
            f"fraction of true features recovered\n(cosine >= {threshold})",
            f"nothing recovered: no true feature reached\ncosine {threshold} (any method, seed or step)",
        ),
    ]
    curves = {m: [_curves(seeds, index) for index, _, _ in panels] for m, seeds in runs.items()}
    for n, (method, seeds) in enumerate(runs.items()):
        samples = [c[0] for c in seeds[0]["curve"]]
        style = LINE_STYLES[n % len(LINE_STYLES)]
        for ax, values in zip(axes, curves[method]):
            mean, sd = values.mean(0), values.std(0)
            (line,) = ax.plot(samples, mean, label=_label(method, curves), markevery=(n, len(runs)), **style)
            ax.fill_between(samples, mean - sd, mean + sd, alpha=0.15, color=line.get_color())
    for i, (ax, (_, name, nothing)) in enumerate(zip(axes, panels)):
        ax.set_xlabel("training vectors")
        ax.set_ylabel(name)
        count_axis(ax.xaxis)
        _say_if_all_zero(ax, [c[i] for c in curves.values()], nothing)
    axes[1].set_ylim(bottom=0)  # a fraction: never below 0
    axes[0].legend(fontsize=8)
    fig.suptitle("Figure 8: ground-truth recovery over training (mean ± sd over seeds)")
    return fig


def figure_recovery(runs: dict[str, list[RunAnalysis]], threshold: float, path: Path) -> None:
    save_figure(recovery_figure(runs, threshold), path)


def draw_figures(
    runs: dict[str, list[RunAnalysis]], reinit_threshold: float, recovered_threshold: float, out: Path
) -> dict[str, Path]:
    """Every figure of FIGURES, saved in `out`; their paths by name. Figures 3 and 5 show the paper's
    methods (baseline, reinit, mfr), Figure 7 the baseline's members, Figure 8 every method (a true
    feature recovered at cosine >= `recovered_threshold`)."""
    figures = {name: out / file for name, (file, _) in FIGURES.items()}
    paper_methods = {m: runs[m] for m in ("baseline", "reinit", "mfr")}
    figure_agreement(paper_methods, figures["Figure 3"])
    figure_cluster_firing(paper_methods, figures["Figure 5"])
    figure_reinit_metric(runs["baseline"], reinit_threshold, figures["Figure 7"])
    figure_recovery(runs, recovered_threshold, figures["Figure 8"])
    return figures
