"""What the demo shows at the end: a table per suite, and the figure (via [`metrics_suite.plots`][metrics_suite.plots])."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metrics_suite.plots import load_results, plot_results
from metrics_suite.registry import SUITES

__all__ = ["format_tables", "save_figure"]


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def format_tables(results: Mapping[str, Any] | str | Path, stage: str = "val") -> str:
    """One plain-text table per suite: a row per output key, a column per epoch of ``stage``.

    ``nonfinite_count`` rows are shown only when a count is not zero.

    Examples:
        >>> history = [{"stage": "val", "epoch": e, "values": {"noise/noise/input_norm": 1.0 + e}} for e in range(2)]
        >>> print(format_tables({"history": history}))
        noise (val)
        key               epoch 0  epoch 1
        noise/input_norm        1        2
    """
    records = [r for r in load_results(results)["history"] if r["stage"] == stage]
    blocks = []
    for suite in SUITES:
        keys = [
            k for k in dict.fromkeys(k for r in records for k in r["values"]) if k.startswith(f"{suite}/")
        ]
        keys = [
            k
            for k in keys
            if not k.endswith("/nonfinite_count") or any(r["values"].get(k, 0) for r in records)
        ]
        if not keys:
            continue
        header = ["key", *(f"epoch {r['epoch']}" for r in records)]
        rows = [
            [k.split("/", 1)[1], *(_fmt(float(r["values"].get(k, math.nan))) for r in records)] for k in keys
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [f"{suite} ({stage})"]
        for row in [header, *rows]:
            lines.append(
                "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))])
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def save_figure(results: Mapping[str, Any] | str | Path, path: str | Path) -> Path:
    """Render the results (per-epoch curves per suite, per-layer credit bars) to ``path`` (PNG)."""
    plot_results(results, path)
    return Path(path)
