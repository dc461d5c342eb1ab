"""What the demo shows at the end: a table per suite, and the figure (via [`metrics_suite.plots`][metrics_suite.plots])."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metrics_suite.plots import _matplotlib, load_results, plot_results
from metrics_suite.registry import SUITES

__all__ = ["demo_figure", "format_tables", "save_figure"]


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


#: Colours of the credit rules and noise scales (one meaning per colour across the panels).
RULE_STYLE = {
    "backprop": ("#1b9e77", "o"),
    "feedback_alignment": ("#d95f02", "s"),
    "noisy": ("#7570b3", "^"),
    "random": ("#666666", "x"),
}


def _scales(values: Mapping[str, float]) -> list[str]:
    return sorted({k.split("/")[2] for k in values if k.startswith("utility/next_token/sigma_")})


def _scale_label(tag: str) -> str:
    return f"σ × {int(tag[len('sigma_') : -len('pct')]) / 100:g}"


def _series(records: list[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], float(r["values"][key])) for r in records if key in r["values"]]
    return [e for e, _ in points], [v for _, v in points]


def _legend(ax: Any, title: str | None = None) -> None:
    # outside the axes, so it never covers a curve or a bar
    ax.legend(
        fontsize="x-small",
        title=title,
        title_fontsize="x-small",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )


def demo_figure(results: Mapping[str, Any] | str | Path) -> Any:
    """The demo's figure: one quantity per panel, each with a y label and its own title.

    Top row, credit rules on the feedback-alignment chain (last epoch, per hidden layer, and the
    feedback-alignment credit's alignment over the epochs); middle row, utility and reconstruction
    over the epochs at each noise scale; bottom row, the validation vs training cross-entropy, the
    changed-token rate, the noise-to-input ratio and the weight drift.
    """
    from matplotlib.figure import Figure

    data = load_results(results)
    val = [r for r in data["history"] if r["stage"] == "val"]
    train = [r for r in data["history"] if r["stage"] == "train"]
    if not val:
        raise ValueError("no 'val' records in the results")
    last = val[-1]["values"]
    scales = _scales(last)
    fig = Figure(figsize=(19, 11), layout="constrained")
    axes = fig.subplots(3, 4)
    suite_color = {"reconstruction": "#1b9e77", "utility": "#d95f02", "noise": "#7570b3", "credit": "#e7298a"}

    def titled(ax: Any, suite: str, title: str, ylabel: str, xlabel: str = "epoch") -> None:
        ax.set_title(f"{suite}: {title}", color=suite_color[suite], fontsize="medium")
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)

    # -------- credit rules, last epoch, per layer
    rules = [r for r in RULE_STYLE if f"credit/cosine/{r}/layer_0" in last]
    layers = sorted(int(k.rsplit("_", 1)[1]) for k in last if k.startswith("credit/cosine/backprop/layer_"))
    width = 0.8 / max(len(rules), 1)
    for ax, (metric, title, ylabel) in zip(
        axes[0, :3],
        [
            ("perturbation_correlation/{rule}/layer_{i}", "perturbation correlation ρ (last epoch)", "ρ"),
            ("cosine/{rule}/layer_{i}", "cosine of the credit with the gradient (last epoch)", "cosine"),
            ("nudging/{rule}/delta/layer_{i}", "nudging: loss change of a step along the credit", "Δ loss"),
        ],
    ):
        for j, rule in enumerate(rules):
            heights = [last.get(f"credit/{metric.format(rule=rule, i=i)}", math.nan) for i in layers]
            xs = [i + (j - (len(rules) - 1) / 2) * width for i in layers]
            ax.bar(xs, heights, width=width, color=RULE_STYLE[rule][0], label=rule.replace("_", " "))
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(layers, [f"h{i + 1}" for i in layers])
        titled(ax, "credit", title, ylabel, "hidden layer of the chain")
        _legend(ax, "credit rule")
    ax = axes[0, 3]
    for rule in rules:
        keys = [f"credit/perturbation_correlation/{rule}/layer_{i}" for i in layers]
        epochs = [r["epoch"] for r in val]
        mean = [sum(float(r["values"][k]) for k in keys) / len(keys) for r in val]
        color, marker = RULE_STYLE[rule]
        ax.plot(epochs, mean, marker=marker, color=color, label=rule.replace("_", " "))
    titled(ax, "credit", "ρ over training (mean over layers)", "ρ")
    _legend(ax, "credit rule")

    # -------- utility and reconstruction at each noise scale
    cmap = ["#fdae6b", "#e6550d", "#7f2704", "#3f007d"]
    panels = [
        (
            axes[1, 0],
            "utility",
            "next_token/{s}/jensen_shannon",
            "Jensen–Shannon, clean vs noisy next token",
            "JS (nats)",
        ),
        (
            axes[1, 1],
            "utility",
            "prediction_change/{s}/target_change",
            "share of argmax predictions changed",
            "share",
        ),
        (
            axes[1, 2],
            "reconstruction",
            "reconstruction_score/{s}",
            "reconstruction score (loss gap kept)",
            "score",
        ),
        (
            axes[1, 3],
            "reconstruction",
            "activations/{s}/cosine_similarity",
            "cosine, noisy vs clean embeddings",
            "cosine",
        ),
        (
            axes[2, 1],
            "reconstruction",
            "changed_tokens/{s}/token_rate",
            "tokens not recovered by nearest embedding",
            "share of tokens",
        ),
    ]
    for ax, suite, pattern, title, ylabel in panels:
        spread = False
        for c, tag in enumerate(scales):
            key, color = f"{suite}/{pattern.format(s=tag)}", cmap[c % len(cmap)]
            ax.plot(*_series(val, key), marker="o", color=color, label=_scale_label(tag))
            if f"{key}_p90" in last:  # JS's per-token 90th percentile (quantiles enabled)
                spread = True
                ax.plot(
                    *_series(val, f"{key}_p90"), linestyle=":", color=color, label=f"p90, {_scale_label(tag)}"
                )
        titled(ax, suite, "JS, clean vs noisy: mean and p90 (dotted)" if spread else title, ylabel)
        _legend(ax, "noise scale")

    # -------- cross-entropy: validation per scale, training (noise at the learned scale)
    ax = axes[2, 0]
    for c, tag in enumerate(scales):
        ax.plot(
            *_series(val, f"utility/cross_entropy/{tag}/cross_entropy"),
            marker="o",
            color=cmap[c % len(cmap)],
            label=f"val, {_scale_label(tag)}",
        )
    if train:
        ax.plot(
            *_series(train, "utility/cross_entropy/cross_entropy"),
            linestyle="--",
            marker="D",
            color="black",
            label="train, σ × 1",
        )
    titled(ax, "utility", "cross-entropy of the noisy model", "nats per token")
    _legend(ax, "stage, noise scale")

    ax = axes[2, 2]
    ax.plot(
        *_series(val, "noise/noise/noise_domination_ratio"),
        marker="o",
        color=suite_color["noise"],
        label="‖noise‖ / ‖input‖",
    )
    ax.plot(
        *_series(val, "noise/noise/mean_domination_ratio"),
        marker="s",
        color="#bcbddc",
        label="‖mean‖ / ‖noise‖",
    )
    titled(ax, "noise", "size of the learned noise and shift", "ratio of norms")
    _legend(ax)

    ax = axes[2, 3]
    for c, key in enumerate(
        k for k in last if k.startswith("credit/feature_drift/") and not k.endswith("nonfinite_count")
    ):
        ax.plot(*_series(val, key), marker="o", color=f"C{c}", label=key.split("/", 2)[2])
    titled(ax, "credit", "drift of LM weights from initialisation", "relative drift")
    _legend(ax, "weight")
    return fig


def save_figure(results: Mapping[str, Any] | str | Path, path: str | Path) -> Path:
    """Render the demo's figure ([`demo_figure`][metrics_suite.demo.figure.demo_figure]) to ``path`` (PNG); results of another layout
    get the generic [`plot_results`][metrics_suite.plots.plot_results]."""
    data = load_results(results)
    values: Mapping[str, float] = next(
        (r["values"] for r in reversed(data["history"]) if r["stage"] == "val"), {}
    )
    if _scales(values) and "credit/cosine/backprop/layer_0" in values:
        _matplotlib()
        demo_figure(data).savefig(path, dpi=90)
    else:
        plot_results(data, path)
    return Path(path)
