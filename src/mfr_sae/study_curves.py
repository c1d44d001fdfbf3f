"""Learning curves of `mfr-sae study`'s settings: MCC to the truth and the members' agreement against the vectors
seen, from each run's evaluations during training (eval.every; metrics.jsonl), so that a report shows from which
budget MFR starts to act and to pay. `agreed_frac` (mmcs.agreed_fraction) is measured alike with the penalty on
and off; `confirmed_frac` is what the MFR arm's own confirmation counted at its last re-matching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mfr_sae.report import fmt_num, markdown_table, save_figure
from mfr_sae.run_folder import METRICS_FILE

if TYPE_CHECKING:
    from matplotlib.axes import Axes

CURVES_FIGURE = "fig_learning_curves.png"
CURVES_CAPTION = (
    "Learning curves: MCC to the true features (top) and the share of latents another member has at cosine >= 0.8 "
    "(bottom) against vectors seen, each setting's mean over replicates."
)
CURVE_MEASURES = ("gt_mcc", "gt_f1", "agreed_frac", "confirmed_frac")  # each where the runs have it


def learning_curve(run_dir: Path, batch_size: int) -> list[dict[str, float]]:
    """One point per evaluation of a run, the last (after training) included: `samples` seen, the mean over members
    of gt_mcc (and gt_f1 where measured), agreed_frac, and the last logged confirmed_frac (MFR with confirmation)."""
    points: list[dict[str, float]] = []
    confirmed = None
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        confirmed = record.get("confirmed_frac", confirmed)
        if "eval" not in record:
            continue
        point = {"samples": float(record["step"] * batch_size)}
        for key in ("gt_mcc", "gt_f1"):
            if all(key in member for member in record["eval"]):
                point[key] = float(np.mean([member[key] for member in record["eval"]]))
        if record.get("agreed_frac") is not None:
            point["agreed_frac"] = record["agreed_frac"]
        if confirmed is not None:
            point["confirmed_frac"] = confirmed
        points.append(point)
    return points


def mean_curves(curves: dict[str, list[list[dict[str, float]]]]) -> dict[str, list[dict[str, float]]]:
    """Each setting's curve: at each evaluation its replicates share, the mean of each measure over them (a measure
    some replicate lacks at that point is left out). Settings without evaluations during training are left out."""
    means: dict[str, list[dict[str, float]]] = {}
    for setting, runs in curves.items():
        if not runs or min(len(run) for run in runs) < 2:
            continue
        length = min(len(run) for run in runs)
        means[setting] = [
            {
                "samples": runs[0][i]["samples"],
                **{
                    key: float(np.mean([run[i][key] for run in runs]))
                    for key in CURVE_MEASURES
                    if all(key in run[i] for run in runs)
                },
            }
            for i in range(length)
        ]
    return means


def curve_table(curves: dict[str, list[dict[str, float]]]) -> str:
    """The curves side by side: one row per evaluation, each setting's MCC, agreed and confirmed fractions."""
    settings = list(curves)
    rows = []
    for i, point in enumerate(curves[settings[0]]):
        row = {"vectors seen": f"{point['samples']:,.0f}"}
        for setting in settings:
            at = curves[setting][i] if i < len(curves[setting]) else {}
            for key, word in (("gt_mcc", "MCC"), ("agreed_frac", "agreed"), ("confirmed_frac", "confirmed")):
                if key in at:
                    row[f"{setting}: {word}"] = fmt_num(at[key])
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return markdown_table([{c: row.get(c, "-") for c in columns} for row in rows], columns)


def curves_section(name: str, data: dict[str, Any]) -> list[str]:
    """The report's lines on a dataset's learning curves (none when its runs were not evaluated during training)."""
    if not data.get("curves"):
        return []
    return [
        "",
        f"Learning curves ({name}; evaluations during training, means over replicates): MCC; agreed, the share of "
        "latents that another member has at cosine >= 0.8 (measured alike in both arms); confirmed, what MFR's "
        "confirmation counted at its last re-matching.",
        "",
        curve_table(data["curves"]),
    ]


def curves_figure(datasets: dict[str, dict[str, Any]], path: Path) -> bool:
    """MCC (top) and the agreed fraction (bottom) against vectors seen, a line per setting, a column per dataset
    with curves; False (nothing drawn) when none has them."""
    with_curves = {name: data["curves"] for name, data in datasets.items() if data.get("curves")}
    if not with_curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(with_curves), figsize=(6 * len(with_curves), 8), squeeze=False)
    for column, (name, curves) in enumerate(with_curves.items()):
        for row, (key, label) in enumerate((("gt_mcc", "MCC to the true features"), ("agreed_frac", "agreed"))):
            ax: Axes = axes[row][column]
            for setting, points in curves.items():
                xs = [p["samples"] for p in points if key in p]
                ax.plot(xs, [p[key] for p in points if key in p], marker="o", ms=3, label=setting)
            ax.set(xlabel="vectors seen", ylabel=label)
            ax.set_title(f"{name}: mean over replicates", fontsize=10)
            ax.legend(fontsize=7)
    save_figure(fig, path)
    return True
