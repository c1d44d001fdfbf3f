"""Plain-text and Markdown tables of results, the number formats of every report, and its figures."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

MEMBER_COLUMNS = [
    "member",
    "k",
    "mse",
    "fvu",
    "l0",
    "dead_frac",
    "silent_frac",
    "twin_frac",
    "gt_mmcs",
    "gt_mmcs_hungarian",
    "gt_recovered_frac",
    "gt_mcc",
    "gt_distinct",
]
# Reported precision: a measured number to 3 significant digits, its sd to 2 (more would be noise).
DIGITS = 3
SD_DIGITS = 2


def fmt_num(value: float | int | None, digits: int = DIGITS) -> str:
    """A number as reports print it: an integer as it is, anything else to `digits` significant digits;
    `-` for none."""
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}g}"


def fmt_sig(value: float | None, digits: int = DIGITS) -> str:
    """`value` to `digits` significant digits with its trailing zeros (0.380, not 0.38), so that every
    number of a column shows as many; `-` for none."""
    if value is None:
        return "-"
    text = f"{value:#.{digits}g}"
    return text[:-1] if text.endswith(".") else text  # `#` keeps the point of 100.


def column_decimals(values: Iterable[float | None], digits: int = DIGITS) -> int:
    """The decimals of one column of means, so that its numbers line up: enough for `digits` significant
    digits of its smallest nonzero |value|, but no more than `digits` + 1 of its largest (a value near 0
    beside much larger ones shows fewer, and reads as near 0); 0 for a column of zeros (or of nothing)."""
    nonzero = [abs(v) for v in values if v is not None and math.isfinite(v) and v != 0]
    if not nonzero:
        return 0

    def decimals(value: float, significant: int) -> int:
        return max(0, significant - 1 - math.floor(math.log10(value)))

    return min(decimals(min(nonzero), digits), decimals(max(nonzero), digits + 1))


def round_sig(value: float, digits: int = DIGITS) -> float:
    """`value` rounded as fmt_num prints it, so that comparisons see what the reader sees."""
    return float(f"{value:.{digits}g}")


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return fmt_num(value)
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


def mean_of(values: Sequence[float | None]) -> float | None:
    """The mean of the values given, None (undefined) left out; None when none is left."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def fmt_mean_sd(
    values: Sequence[float | None], digits: int = DIGITS, sd_digits: int = SD_DIGITS, decimals: int | None = None
) -> str:
    """`mean ± sd` of the values given (None, for undefined, is left out): the mean to `digits`
    significant digits, the sd to `sd_digits`; a single value as fmt_num prints it. With `decimals`
    (those of its column: column_decimals), the mean to that many decimals and the sd with its trailing
    zeros (fmt_sig), so that a column's cells read alike."""
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    mean, sd = mean_sd(present)
    if decimals is not None:
        shown, spread = f"{mean:.{decimals}f}", fmt_sig(sd, sd_digits) if sd else "0"
    else:
        shown = fmt_num(present[0], digits) if len(present) == 1 else f"{mean:.{digits}g}"
        spread = f"{sd:.{sd_digits}g}"
    return shown if len(present) == 1 else f"{shown} ± {spread}"


def fmt_p(p: float | None) -> str:
    """A p-value to 3 significant digits; `-` where there is none."""
    return "-" if p is None else f"{p:.3g}"


def interval(ci: Sequence[float] | None) -> str:
    """A 95% CI as reports print it: `[low, high]`, or `-` when there is none."""
    return "-" if ci is None else f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]"


def fmt_diff(test: dict[str, Any] | None) -> str:
    """A paired test's mean difference and its CI, `+0.0123 [a, b]`; why it was not tested, or `-` when nothing was
    measured."""
    if test and test.get("not_tested"):
        return str(test["not_tested"])
    if not test or test.get("mean_diff") is None:
        return "-"
    return f"{test['mean_diff']:+.3g} {interval(test.get('ci95'))}"


def fmt_duration(seconds: float) -> str:
    """`42 s`, `3.5 min`, `12 min` or `1.2 h`."""
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            value = seconds / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{seconds:.0f} s"


def save_figure(fig: Figure, path: str | Path) -> None:
    """Every report figure the same way: tight layout, a PNG at 110 dpi, the figure released (from pyplot,
    when pyplot made it)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    if fig.canvas.manager is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)


def figure_link(path: str | Path, caption: str) -> str:
    """Markdown for a figure saved beside report.md: a link to the PNG by its file name (the page stays
    small and its figures stay files) and, under it, its caption on one line."""
    caption = " ".join(caption.split())
    return f"![{caption}]({Path(path).name})\n\n*{caption}*"


def count_axis(axis: Axis, nbins: int = 5) -> None:
    """At most `nbins` ticks on an axis of large counts, written short (200k, 1.5M), so labels never
    run together."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=nbins))
    axis.set_major_formatter(EngFormatter(sep=""))
