"""Plots: a metric's value or history (torchmetrics' plot() convention) and a results file."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("matplotlib")
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import metrics_suite as ms
from metrics_suite.cli import main
from metrics_suite.plots import MAX_CURVES, plot_metric, plot_results


@pytest.fixture(autouse=True)
def close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def ydata(line: Any) -> list[float]:
    return [float(v) for v in line.get_ydata()]


def same(a: list[float], b: list[float]) -> bool:
    """Equal up to float64 rounding, NaN where the other is NaN."""
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-12) for x, y in zip(a, b)
    )


# ---------------------------------------------------------------------------------------------- plot_metric
def test_scalar_and_dict_values_one_marker_per_statistic() -> None:
    metric = ms.NoiseStatistics()
    g = torch.Generator().manual_seed(0)
    metric.update(
        torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    )
    value = metric.compute()
    fig, ax = plot_metric(metric)
    assert fig is not None and ax.get_title() == "NoiseStatistics"
    assert [line.get_label() for line in ax.lines] == list(value)
    assert [ydata(line) for line in ax.lines] == [[float(v)] for v in value.values()]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(value)

    score = ms.ReconstructionScore()
    loss = torch.tensor([2.0, 2.0, 2.0])
    score.update(loss, loss + 1, loss + 3)
    _, ax = plot_metric(score)
    assert len(ax.lines) == 1 and ydata(ax.lines[0]) == pytest.approx([2 / 3])


def test_per_layer_vectors_are_drawn_over_the_layer_index() -> None:
    metric = ms.CreditCosine(num_layers=3)
    credit = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    metric.update(credit, torch.tensor([[1.0, 1.0], [1.0, 1.0]]), layer=0)
    metric.update(credit, credit, layer=2)
    _, ax = plot_metric(metric)
    assert ax.get_xlabel() == "layer"
    assert same(ydata(ax.lines[0]), [(math.sqrt(0.5) + 1) / 2, math.nan, 1.0])

    nudging = ms.NudgingDelta(num_layers=2, eta=0.1)
    hidden = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    nudging.update(hidden, hidden, lambda h: 0.5 * (h**2).sum(-1), layer=1)
    value = nudging.compute()
    _, ax = plot_metric(nudging)
    assert [line.get_label() for line in ax.lines] == ["delta", "improved_fraction"]
    assert same(ydata(ax.lines[0]), [float(v) for v in value["delta"]])


def test_a_sequence_of_values_is_a_history_and_ax_is_reused() -> None:
    metric = ms.CreditCosine(num_layers=2)
    history = []
    for step in range(3):
        credit = torch.tensor([[1.0, float(step)]])
        metric.update(credit, torch.tensor([[1.0, 1.0]]), layer=0)
        metric.update(credit, torch.tensor([[0.0, 1.0]]), layer=1)
        history.append(metric.compute())
    _, ax = plt.subplots()
    returned_fig, returned_ax = plot_metric(metric, history, ax=ax)
    assert returned_fig is None and returned_ax is ax
    assert [line.get_label() for line in ax.lines] == ["layer_0", "layer_1"]
    assert ydata(ax.lines[1]) == [float(h[1]) for h in history]
    assert ax.get_xlabel() == "step"


def test_metric_plot_method_uses_plot_metric() -> None:
    metric = ms.CreditCosine(num_layers=2)
    metric.update(torch.ones(2, 3), torch.ones(2, 3), layer=1)
    _, ax = metric.plot()
    assert ax.get_xlabel() == "layer" and same(ydata(ax.lines[0]), [math.nan, 1.0])


def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"metrics_suite\[plots\]"):
        plot_results({"history": []})
    with pytest.raises(ModuleNotFoundError, match=r"metrics_suite\[plots\]"):
        plot_metric(ms.CreditCosine())


# ---------------------------------------------------------------------------------------------- plot_results
def synthetic_history() -> list[dict[str, Any]]:
    noise_stats = [f"stat{i}" for i in range(MAX_CURVES + 2)]
    records = []
    for epoch in range(3):
        values = {f"noise/noise/{s}": float(i + epoch) for i, s in enumerate(noise_stats)}
        values |= {
            "noise/noise/nonfinite_count": 0.0,
            "utility/cross_entropy/cross_entropy": 3.0 - epoch,
            "credit/nudging/delta/layer_0": -0.1 * epoch,
            "credit/nudging/delta/layer_1": -0.2 * epoch,
            "credit/nudging/improved_fraction/layer_0": 0.5,
            "credit/nudging/improved_fraction/layer_1": 0.75,
        }
        records.append({"stage": "val", "epoch": epoch, "values": values})
        records.append(
            {"stage": "train", "epoch": epoch, "values": {"utility/cross_entropy/cross_entropy": 4.0 - epoch}}
        )
    return records


def test_results_figure_curves_and_last_epoch_bars(tmp_path: Path) -> None:
    path = tmp_path / "fig.png"
    fig = plot_results({"history": synthetic_history()}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    # suites in registry order; a metric with more statistics than MAX_CURVES takes two panels
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == [
        "utility · cross_entropy",
        "noise · noise",
        "noise · noise",
        "credit · nudging",
        "credit · nudging (last epoch)",
    ]
    ce = axes["utility · cross_entropy"]
    assert [(line.get_label(), line.get_linestyle(), ydata(line)) for line in ce.lines] == [
        ("cross_entropy (val)", "-", [3.0, 2.0, 1.0]),
        ("cross_entropy (train)", "--", [4.0, 3.0, 2.0]),
    ]
    noise_labels = [
        line.get_label() for ax in fig.axes if ax.get_title() == "noise · noise" for line in ax.lines
    ]
    assert noise_labels == [f"stat{i}" for i in range(MAX_CURVES + 2)]  # nonfinite_count left out
    bars = axes["credit · nudging (last epoch)"]
    heights = [p.get_height() for p in bars.patches]
    assert heights == pytest.approx([-0.2, -0.4, 0.5, 0.75])  # delta per layer, then improved_fraction
    assert bars.get_xlabel() == "layer"
    curves = axes["credit · nudging"]
    assert [line.get_label() for line in curves.lines][:2] == ["delta/layer_0", "delta/layer_1"]


def test_results_are_read_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"history": synthetic_history()}))
    fig = plot_results(path, stage="train")
    ce = next(ax for ax in fig.axes if ax.get_title() == "utility · cross_entropy")
    assert ce.lines[0].get_label() == "cross_entropy (train)" and ce.lines[0].get_linestyle() == "-"


VAL_ONLY = json.dumps({"history": [{"stage": "val", "epoch": 0, "values": {"noise/noise/input_norm": 1.0}}]})


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, [], "No such file or directory: "),
        ("not json", [], "r.json is not JSON (Expecting value"),
        ('{"foo": 1}', [], 'r.json: expected an object {"history": ['),
        ("[1, 2]", [], 'r.json: expected an object {"history": ['),
        ('{"history": [{"stage": "val", "epoch": 0}]}', [], "r.json: history[0] is not a record {"),
        (
            '{"history": [{"stage": "val", "epoch": 0, "values": {"k": "x"}}]}',
            [],
            "history[0] is not a record",
        ),
        (VAL_ONLY, ["--stage", "test"], "no 'test' records in the results; stages: ['val']"),
    ],
)
def test_plot_command_reports_bad_input_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, args: list[str], message: str
) -> None:
    results = tmp_path / "r.json"
    if content is not None:
        results.write_text(content)
    assert main(["plot", str(results), *args]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("metrics-suite plot: ") and message in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "r.png").exists()
    if content is not None:  # the same message from the library function
        with pytest.raises(ValueError, match=re.escape(message)):
            plot_results(results, stage=args[-1] if args else "val")
