"""Noise suite: what a privacy transform adds to its input."""

from __future__ import annotations

from typing import Any

from pydantic import StrictInt
from torch import Tensor

from metrics_suite.base import DiagnosticMetric, MetricOutput
from metrics_suite.examples import noise as examples
from metrics_suite.functional._masks import position_mask
from metrics_suite.functional.noise import (
    NOISE_STATISTICS,
    _noise_check,
    _noise_per_position,
    _noise_update,
    _positions_finite,
)
from metrics_suite.registry import register
from metrics_suite.validation import validated

__all__ = ["NoiseStatistics"]


@register("noise", "noise", example=examples.NOISE)
class NoiseStatistics(DiagnosticMetric):
    r"""How a noise transform's output ``input + mean + noise`` splits into signal, mean shift and noise.

    ``mean`` is the learned shift $\mu$, ``noise`` the zero-mean part $\varepsilon$
    (σ·ε) and $s = \mu + \varepsilon$ the mean-shifted noise. At each position (norms over
    ``dim``):

    $$
    \text{mean\_domination\_percent} = \frac{\lVert\mu\rVert}{\lVert\mu\rVert + \lVert\varepsilon\rVert},\quad
    \text{mean\_domination\_ratio} = \frac{\lVert\mu\rVert}{\lVert\varepsilon\rVert},\quad
    \text{mean\_cosine\_similarity} = \frac{\langle x, \mu\rangle}{\lVert x\rVert\,\lVert\mu\rVert},
    $$

    $$
    \text{noise\_domination\_percent} = \frac{\lVert s\rVert}{\lVert x\rVert + \lVert s\rVert},\quad
    \text{noise\_domination\_ratio} = \frac{\lVert s\rVert}{\lVert x\rVert},\quad
    \text{noise\_cosine\_similarity} = \frac{\langle x, s\rangle}{\lVert x\rVert\,\lVert s\rVert},
    $$

    and the norms ``input_norm``, ``mean_norm``, ``unshifted_noise_norm``,
    ``mean_shifted_noise_norm``. ``compute()`` returns a dict of these ten, each the mean over the
    selected positions (``noise_mask``, broadcast over the position shape = ``input``'s shape
    without ``dim``). The "percent" statistics are fractions in [0, 1].

    A position where a ratio or cosine has a zero denominator (a zero norm, e.g. ``noise`` all zero
    at evaluation) is left out of *that* statistic's mean only: every statistic keeps its own
    count, so one zero norm never turns an epoch mean into NaN or inf. A statistic with no
    defined position is NaN. Positions with NaN/inf in ``input``, ``mean`` or ``noise`` follow
    ``nan_strategy``.

    Args:
        dim: the (negative) feature dimension the norms run over, e.g. ``-1`` for ``[B, T, D]``.
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options (``with_stderr`` adds
            ``{stat}_stderr`` for every statistic).

    ``update(input, mean, noise, noise_mask=None)``: ``mean`` and ``noise`` have ``input``'s shape
    (or broadcast to it, e.g. a ``[D]`` learned mean).

    Examples:
        >>> import torch
        >>> from metrics_suite import NoiseStatistics
        >>> metric = NoiseStatistics()
        >>> x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
        >>> mu = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
        >>> eps = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
        >>> metric.update(x, mu, eps, noise_mask=torch.tensor([True, True, False]))
        >>> out = metric.compute()
        >>> round(out["input_norm"].item(), 4), round(out["mean_domination_ratio"].item(), 4)
        (3.0, 1.0)
        >>> round(out["noise_cosine_similarity"].item(), 4)
        0.7536
    """

    higher_is_better = None

    statistic_stats: Tensor

    @validated
    def __init__(self, dim: StrictInt = -1, **kwargs: Any) -> None:
        if dim >= 0:
            raise ValueError(f"`dim` must be negative (counted from the end, e.g. -1), got {dim}")
        super().__init__(**kwargs)
        self.dim = dim
        self.add_mean_state("statistic_stats", (len(NOISE_STATISTICS),))

    def update(self, input: Tensor, mean: Tensor, noise: Tensor, noise_mask: Tensor | None = None) -> None:
        """Add one batch (``noise_mask`` broadcasts over ``input``'s shape without ``dim``)."""
        if self.validate_args:
            _noise_check(input, mean, noise, noise_mask, self.dim)
        values, defined = _noise_per_position(input, mean, noise, self.dim)
        selected = position_mask(noise_mask, values.shape[1:], values.device)
        # judged on the inputs: a float64 norm of finite values near 1e200 overflows
        finite = _positions_finite(input, mean, noise, self.dim).to(values.device)
        keep, skipped = self.nonfinite_filter("input/mean/noise", finite | ~selected)
        stats = _noise_update(values, defined, selected & keep)
        self.nonfinite_count += skipped
        self.statistic_stats += stats.to(self.statistic_stats.device)

    def compute(self) -> MetricOutput:
        """The ten statistics, each averaged over the selected positions where it is defined."""
        out: dict[str, Tensor] = {}
        for name, stats in zip(NOISE_STATISTICS, self.statistic_stats):
            out |= self.mean_output(stats, name)
        return out
