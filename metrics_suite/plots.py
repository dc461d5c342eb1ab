"""Plots: one metric's value or history (torchmetrics' ``plot()`` convention), and a run's results file.

matplotlib is an optional extra (``pip install 'metrics_suite[plots]'``); it is imported when a plot
is made, never on ``import metrics_suite``.

* [`plot_metric`][metrics_suite.plots.plot_metric] — what ``metric.plot(val=None, ax=None)`` returns: ``(figure, axes)`` for the
  current value, a given value, or a list of values (one per step or epoch).
* [`plot_results`][metrics_suite.plots.plot_results] — a results file (``{"history": [{"stage", "epoch", "values"}, ...]}``, what
  ``metrics-suite demo`` writes and [`DiagnosticsCallback`][metrics_suite.integrations.lightning.DiagnosticsCallback]
  records) rendered as one figure: per-epoch curves per metric and per-layer bars.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from metrics_suite.config import SUITES

__all__ = ["load_results", "plot_metric", "plot_results"]

#: Suites in figure order, with their colours.
SUITE_COLORS: dict[str, str] = dict(zip(SUITES, ("#1b9e77", "#d95f02", "#7570b3", "#e7298a"), strict=True))
#: Curves per panel before a metric is split over several panels.
MAX_CURVES = 4

#: A value to plot: a ``compute()``/``forward()`` result (a tensor, or a dict of named tensors).
PlotValue = Tensor | Mapping[str, Tensor]


class PlottableMetric(Protocol):
    """What [`plot_metric`][metrics_suite.plots.plot_metric] reads of a metric (a [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric]).

    A protocol rather than an import of ``base``: ``DiagnosticMetric.plot`` calls into this module,
    which therefore must not import the base class back.
    """

    vector_label: str
    last_dim_labels: ClassVar[Mapping[str, str]]

    def compute(self) -> Any: ...

    def flatten_output(self, value: Any) -> dict[str, Tensor]: ...


_VECTOR_KEY = re.compile(r"^(?P<stat>.*?)/?(?P<label>[a-z]+)_(?P<index>\d+)$")


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ModuleNotFoundError(
            "plotting needs matplotlib, an optional extra: pip install 'metrics_suite[plots]'"
        ) from err
    return matplotlib


def _new_axes() -> tuple[Any, Any]:
    _matplotlib()
    import matplotlib.pyplot as plt

    return plt.subplots()


# ---------------------------------------------------------------------------------------------- one metric
def _scalar(value: Tensor) -> float:
    return float(value.detach().cpu().to(torch.float64))


def plot_metric(
    metric: PlottableMetric, val: PlotValue | Sequence[PlotValue] | None = None, ax: Any = None
) -> tuple[Any, Any]:
    """Plot a metric's value (torchmetrics' ``plot()`` convention).

    * ``val=None``: ``metric.compute()``;
    * one value: a marker per statistic, or for per-layer / per-component vectors one line over the
      index (x axis labelled with the metric's ``vector_label``), one line per statistic;
    * a sequence of values (e.g. one per epoch): one curve per flattened output key over the steps.

    Args:
        metric: the metric (its ``compute()``, name and ``vector_label`` are used).
        val: a ``compute()``/``forward()`` result, a sequence of them, or None.
        ax: matplotlib axes to draw into; a new figure when None.

    Returns:
        ``(figure, axes)``; ``figure`` is None when ``ax`` was given (as in torchmetrics).

    Examples:
        >>> import torch
        >>> from metrics_suite import CreditCosine
        >>> metric = CreditCosine(num_layers=3)
        >>> for layer in range(3):
        ...     metric.update(torch.randn(8, 4), torch.randn(8, 4), layer=layer)
        >>> fig, ax = plot_metric(metric)  # what metric.plot() returns
        >>> ax.get_xlabel(), len(ax.lines)
        ('layer', 1)
    """
    fig, ax = _new_axes() if ax is None else (None, ax)
    name = type(metric).__name__
    val = metric.compute() if val is None else val
    if isinstance(val, Sequence) and not isinstance(val, Tensor | str):
        series = [metric.flatten_output(v) for v in val]
        for key in series[0]:
            ax.plot(range(len(series)), [_scalar(s[key]) for s in series], marker="o", label=key or name)
        ax.set_xlabel("step")
        ax.set_xticks(range(len(series)))
    else:
        items = list(val.items()) if isinstance(val, Mapping) else [("", val)]
        scalars = [(stat, t) for stat, t in items if t.ndim == 0]
        vectors = [(stat, t) for stat, t in items if t.ndim > 0]
        for stat, t in vectors:
            flat = t.detach().cpu().to(torch.float64).reshape(-1)
            ax.plot(range(flat.numel()), flat.tolist(), marker="o", label=stat or name)
        if vectors:  # the index label of the plotted dim, e.g. "bin" of a histogram, "layer"
            labels = {metric.last_dim_labels.get(stat, metric.vector_label) for stat, _ in vectors}
            ax.set_xlabel(" / ".join(sorted(labels)))
            ax.set_xticks(range(max(t.numel() for _, t in vectors)))
            for stat, t in scalars:  # e.g. a pooled value next to per-layer ones
                ax.axhline(_scalar(t), linestyle="--", color="gray", label=stat)
        else:
            for i, (stat, t) in enumerate(scalars):
                ax.plot([i], [_scalar(t)], marker="o", markersize=8, linestyle="none", label=stat or name)
            ax.set_xticks(range(len(scalars)))
            ax.set_xticklabels([stat or name for stat, _ in scalars], rotation=20, ha="right")
    ax.set_title(name)
    ax.grid(True, alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(fontsize="small")
    return fig, ax


# ---------------------------------------------------------------------------------------------- results file
_RECORD = '{"stage": str, "epoch": int, "values": {key: number}}'


def load_results(results: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A results dict, read from a JSON file when given a path, checked to hold a ``"history"``.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not JSON, or the results are not ``{"history": [record, ...]}`` with
            records ``{"stage": str, "epoch": int, "values": {key: number}}``.
    """
    source = "results"
    data: Any = results  # from a file: any JSON value, checked below
    if isinstance(results, str | Path):
        source = str(results)
        try:
            data = json.loads(Path(results).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not JSON ({err})") from err
    history = data.get("history") if isinstance(data, Mapping) else None
    if not isinstance(history, list):
        raise ValueError(f'{source}: expected an object {{"history": [{_RECORD}, ...]}}')
    for i, record in enumerate(history):
        if not (
            isinstance(record, Mapping)
            and isinstance(record.get("stage"), str)
            and isinstance(record.get("epoch"), int)
            and isinstance(record.get("values"), Mapping)
            and all(isinstance(v, int | float) for v in record["values"].values())
        ):
            raise ValueError(f"{source}: history[{i}] is not a record {_RECORD}")
    return dict(data)


def _split_key(key: str) -> tuple[str, str, str, int | None]:
    """``"suite/metric/stat/layer_2"`` → (suite, metric, stat, 2); index None for scalar keys
    (vectors are flattened as ``{vector_label}_{i}``, labels ``layer`` and ``component``)."""
    parts = key.split("/")
    suite, metric, rest = parts[0], parts[1] if len(parts) > 1 else "", "/".join(parts[2:])
    match = _VECTOR_KEY.match(rest)
    if match and match["label"] in ("layer", "component"):
        return suite, metric, match["stat"], int(match["index"])
    return suite, metric, rest, None


def _panels(
    history: Sequence[Mapping[str, Any]],
) -> tuple[list[tuple[str, str, list[str]]], dict[str, dict[tuple[str, int], str]]]:
    """Curve panels ``(suite, metric, stats)`` and bar groups ``{suite/metric: {(stat, index): key}}``."""
    curves: dict[tuple[str, str], list[str]] = {}
    bars: dict[str, dict[tuple[str, int], str]] = {}
    for record in history:
        for key in record["values"]:
            suite, metric, stat, index = _split_key(key)
            if stat == "nonfinite_count":
                continue
            # per-layer values get a curve per layer and, in a second panel, bars of the last epoch
            curve_stat = key.split("/", 2)[2] if index is not None else stat
            stats = curves.setdefault((suite, metric), [])
            if curve_stat not in stats:
                stats.append(curve_stat)
            if index is not None:
                bars.setdefault(f"{suite}/{metric}", {})[(stat, index)] = key
    order = {s: i for i, s in enumerate(SUITE_COLORS)}
    panels = [
        (suite, metric, stats[i : i + MAX_CURVES])
        for (suite, metric), stats in sorted(curves.items(), key=lambda kv: order.get(kv[0][0], 99))
        for i in range(0, len(stats), MAX_CURVES)
    ]
    return panels, dict(sorted(bars.items(), key=lambda kv: order.get(kv[0].split("/")[0], 99)))


def _key(suite: str, metric: str, stat: str) -> str:
    return "/".join(p for p in (suite, metric, stat) if p)


def plot_results(
    results: Mapping[str, Any] | str | Path, path: str | Path | None = None, stage: str = "val"
) -> Any:
    """Render a results file as one figure: per-epoch curves per metric, per-layer bars.

    Curves: one panel per metric (metrics with many statistics take several panels), one line per
    statistic (and per layer) over the epochs of ``stage``; the same key recorded for another stage
    (e.g. the training loss) is drawn dashed. Bars: one more panel per per-layer (or per-component)
    metric, the values of the last epoch of ``stage``, one bar group per layer. Panel titles are
    coloured by suite. ``nonfinite_count`` entries are left out.

    Args:
        results: a dict with ``"history"`` — records ``{"stage", "epoch", "values": {key: float}}``
            as [`DiagnosticsCallback`][metrics_suite.integrations.lightning.DiagnosticsCallback] keeps them — or the
            path of a JSON file holding one (``results.json`` of ``metrics-suite demo``).
        path: where to save the figure (PNG, SVG, PDF by extension); not saved when None.
        stage: the stage whose epochs are drawn solid and whose last epoch gives the bars.

    Returns:
        The [`matplotlib.figure.Figure`](https://matplotlib.org/stable/api/_as_gen/matplotlib.figure.Figure.html) (made without pyplot, so no GUI backend is needed).

    Raises:
        ValueError: the results are malformed (see [`load_results`][metrics_suite.plots.load_results]), or hold records but
            none of ``stage``.

    Examples:
        >>> history = [
        ...     {"stage": "val", "epoch": e, "values": {"utility/cross_entropy/cross_entropy": 2.0 - e,
        ...                                               "credit/cosine/layer_0": 0.9, "credit/cosine/layer_1": 0.5}}
        ...     for e in range(3)
        ... ]
        >>> fig = plot_results({"history": history})
        >>> print(" | ".join(ax.get_title() for ax in fig.axes))
        utility · cross_entropy | credit · cosine | credit · cosine (last epoch)
    """
    data = load_results(results)
    history = [r for r in data["history"] if r["values"]]
    stages = sorted({r["stage"] for r in history})
    if stages and stage not in stages:
        raise ValueError(f"no {stage!r} records in the results; stages: {stages}")
    _matplotlib()
    from matplotlib.figure import Figure

    panels, bars = _panels(history)
    n = max(len(panels) + len(bars), 1)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    by_stage: dict[str, list[Mapping[str, Any]]] = {}
    for record in history:
        by_stage.setdefault(record["stage"], []).append(record)

    for ax, (suite, metric, stats) in zip(axes, panels):
        for color_index, stat in enumerate(stats):
            key = _key(suite, metric, stat)
            color = f"C{color_index}"
            lines = {
                name: [(r["epoch"], r["values"][key]) for r in records if key in r["values"]]
                for name, records in by_stage.items()
            }
            lines = {name: points for name, points in lines.items() if points}
            for name in sorted(lines, key=lambda s: s != stage):  # ``stage`` first, solid
                epochs, values = zip(*lines[name])
                label = stat or metric
                ax.plot(
                    epochs,
                    values,
                    "-" if name == stage else "--",
                    marker="o",
                    color=color,
                    label=f"{label} ({name})" if len(lines) > 1 else label,
                )
        ax.set_title(f"{suite} · {metric}", color=SUITE_COLORS.get(suite, "black"))
        ax.set_xlabel("epoch")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")

    last = by_stage.get(stage, [])[-1:]
    for ax, (group, entries) in zip(axes[len(panels) :], bars.items()):
        suite, metric = group.split("/", 1)
        values = last[0]["values"] if last else {}
        stats = list(dict.fromkeys(stat for stat, _ in entries))
        indices = sorted({index for _, index in entries})
        width = 0.8 / len(stats)
        for s, stat in enumerate(stats):
            keys = [entries.get((stat, i)) for i in indices]
            ax.bar(
                [i + (s - (len(stats) - 1) / 2) * width for i in indices],
                [float(values.get(k, float("nan"))) if k else float("nan") for k in keys],
                width=width,
                label=stat or metric,
            )
        ax.set_xticks(indices)
        ax.set_xlabel(_VECTOR_KEY.match(next(iter(entries.values())))["label"])  # type: ignore[index]
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_title(f"{suite} · {metric} (last epoch)", color=SUITE_COLORS.get(suite, "black"))
        ax.grid(True, axis="y", alpha=0.3)
        if len(stats) > 1:
            ax.legend(fontsize="x-small")
    for ax in axes[len(panels) + len(bars) :]:
        ax.set_visible(False)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
