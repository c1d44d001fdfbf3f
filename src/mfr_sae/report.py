"""Plain-text and Markdown tables of results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MEMBER_COLUMNS = ["member", "k", "mse", "fvu", "l0", "dead_frac", "gt_mmcs", "gt_mmcs_hungarian",
                  "gt_recovered_frac"]


def _cell(value: Any) -> str:
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
