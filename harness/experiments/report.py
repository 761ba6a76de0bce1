"""Small helpers the notebooks and benchmark tools format results with."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: str = "") -> str:
    """A markdown table; cells are str()-ed (format numbers before). align: one character per
    column, "l" or "r" (default: the first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align={align!r} has {len(align)} columns, the header {len(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"row {row} has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def cdf(values: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, share of values <= each): an empirical CDF to plot as a step line."""
    x = np.sort(np.asarray(list(values), dtype=float))
    return x, np.arange(1, len(x) + 1) / max(len(x), 1)
