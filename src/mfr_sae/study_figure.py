"""The figure of `mfr-sae study`'s report: FVU against MCC on each judged (held-out or test) dataset, each
setting's means and its paired differences from the baseline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mfr_sae.report import save_figure
from mfr_sae.study_catalogue import SPLIT_WORDS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

FIGURE = "fig_fvu_mcc.png"
CAPTION = (
    "FVU against MCC: top, one point per setting, mean over replicates with 95% CIs, the star the baseline; "
    "bottom, each setting's paired difference from the baseline with its 95% CI (what the tests judge)."
)


def figure(summary: dict[str, Any], path: Path) -> None:
    """FVU (x) against MCC (y), one point per setting with its 95% intervals, the baseline starred; below,
    the paired differences from the baseline (what the tests judge), with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = summary["datasets"]
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 9), squeeze=False)
    colours = {"max": "tab:red", "hungarian": "tab:blue", "mnn": "tab:green", "mnn_hungarian": "tab:purple"}
    for column, (name, data) in enumerate(datasets.items()):
        top, bottom = axes[0][column], axes[1][column]
        for setting, row in data["rows"].items():
            is_base = "tests" not in row
            style = dict(
                fmt="*" if is_base else "o",
                ms=14 if is_base else 6,
                capsize=2,
                lw=1,
                color="black" if is_base else colours.get(setting.split(" ")[0], "grey"),
            )
            mcc, fvu = row["measures"]["gt_mcc"], row["measures"]["fvu"]
            _point(
                top,
                fvu["mean"],
                mcc["mean"],
                fvu["ci95"],
                mcc["ci95"],
                style,
                "baseline" if is_base else setting.split(" ")[1].replace("*auto", ""),
            )
            if is_base:
                _point(bottom, 0.0, 0.0, None, None, style, "baseline")
            else:
                mcc, fvu = row["tests"]["gt_mcc"], row["tests"]["fvu"]
                _point(
                    bottom,
                    fvu["mean_diff"],
                    mcc["mean_diff"],
                    fvu["ci95"],
                    mcc["ci95"],
                    style,
                    setting.split(" ")[1].replace("*auto", ""),
                )
        for form, colour in colours.items():
            top.plot([], [], "o", color=colour, label=f"MFR {form}")
        top.set(xlabel="FVU (lower is better)", ylabel="MCC to the true features (higher is better)")
        word = SPLIT_WORDS[data.get("split", "heldout")]
        top.set_title(f"{word} {name}: mean over {data['replicates']} replicates, 95% CI", fontsize=10)
        top.legend(fontsize=7)
        bottom.axhline(0, color="grey", lw=0.5)
        bottom.axvline(0, color="grey", lw=0.5)
        bottom.set(xlabel="FVU - baseline's (paired)", ylabel="MCC - baseline's (paired)")
        bottom.set_title(f"{name}: paired differences from the baseline, 95% CI", fontsize=10)
    save_figure(fig, path)


def _point(
    ax: Axes,
    x: float,
    y: float,
    x_ci: Sequence[float] | None,
    y_ci: Sequence[float] | None,
    style: dict[str, Any],
    label: str,
) -> None:
    """One setting: a marker with its intervals as error bars, labelled beside it."""
    xerr = [[x - x_ci[0]], [x_ci[1] - x]] if x_ci else None
    yerr = [[y - y_ci[0]], [y_ci[1] - y]] if y_ci else None
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, label="baseline" if label == "baseline" else None, **style)
    if label != "baseline":
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
