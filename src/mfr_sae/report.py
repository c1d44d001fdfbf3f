"""Plain-text and Markdown tables of results."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MEMBER_COLUMNS = ["member", "k", "mse", "fvu", "l0", "dead_frac", "silent_frac", "twin_frac", "gt_mmcs",
                  "gt_mmcs_hungarian", "gt_recovered_frac", "gt_mcc", "gt_distinct"]


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of the given columns (those present in the first row, by default)."""
    if not rows:
        return ""
    columns = [c for c in (columns or MEMBER_COLUMNS) if c in rows[0]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def fmt_mean_sd(values: Sequence[float | None], digits: int = 4) -> str:
    """`mean ± sd` of the values given (None, for undefined, is left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}g} ± {sd:.{digits}g}" if len(values) > 1 else f"{mean:.{digits}g}"


def fmt_p(p: float | None) -> str:
    """A p-value to 3 significant digits; `-` where there is none."""
    return "-" if p is None else f"{p:.3g}"


def save_figure(fig, path) -> None:
    """Every report figure the same way: tight layout, a PNG at 110 dpi, the figure released."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def embed_png(path) -> str:
    """A Markdown image with the PNG inlined as a data URI, so the page stands alone."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{Path(path).stem}](data:image/png;base64,{data})"
