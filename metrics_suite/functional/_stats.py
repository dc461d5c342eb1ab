"""Sum statistics shared by every functional module and the metric classes: safe division, mean sums.

A mean is kept as three sums (Σw, Σw·x, Σw·x²), so partial results merge by addition; the mean and
its standard error are read back at the end. Pure tensor math: nothing here knows a ``Metric``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def safe_div(num: Tensor, den: Tensor | float) -> Tensor:
    """``num / den`` in float64 where ``den != 0``, NaN elsewhere (never inf from an empty denominator).

    Both sides go to float64 first: casting ``den`` to the dtype of ``num`` would turn ``0.5`` into
    ``0`` for an integer ``num``, or a tiny float64 ``den`` into ``0`` for a float32 one.
    """
    num = num.to(torch.float64)
    den = torch.as_tensor(den, device=num.device).to(torch.float64)
    return torch.where(den != 0, num / den, float("nan"))


def mean_stats(values: Tensor, weights: Tensor | None = None, dim: int | tuple[int, ...] = 0) -> Tensor:
    """Sum statistics ``[..., 3]`` = (Σw, Σw·x, Σw·x²) of ``values`` over ``dim``, in float64.

    Add these to a state created with [`add_mean_state`][metrics_suite.base.DiagnosticMetric.add_mean_state]; read the mean and
    its standard error back with `mean_and_stderr`.
    """
    x = values.to(torch.float64)
    w = torch.ones_like(x) if weights is None else weights.to(torch.float64).expand_as(x)
    wx = w * x
    return torch.stack([w.sum(dim), wx.sum(dim), (wx * x).sum(dim)], dim=-1)


def mean_and_stderr(stats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard error of the mean from ``[..., 3]`` sum statistics.

    The standard error uses the unbiased variance (frequency weights): NaN for fewer than two items.
    """
    n, s1, s2 = stats.unbind(-1)
    mean = safe_div(s1, n)
    var = safe_div((s2 - s1 * mean).clamp_min(0.0), n - 1)
    var = torch.where(n > 1, var, torch.full_like(var, float("nan")))
    return mean, torch.sqrt(safe_div(var, n))


def mean_output(stats: Tensor, name: str, with_stderr: bool = False) -> dict[str, Tensor]:
    """``{name: mean}`` from ``[..., 3]`` sum statistics, plus ``{name}_stderr`` with ``with_stderr``."""
    if not with_stderr:
        return {name: safe_div(stats[..., 1], stats[..., 0])}
    mean, stderr = mean_and_stderr(stats)
    return {name: mean, f"{name}_stderr": stderr}
