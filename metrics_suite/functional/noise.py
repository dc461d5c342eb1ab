"""Functional forms of the noise suite."""

from __future__ import annotations

import torch
from torch import Tensor

from metrics_suite.functional._chunks import (
    NOISE_CHUNK_ELEMENTS,
    NOISE_DEVICE_CHUNK_FACTOR,
    row_slices,
    rows_per_chunk,
)
from metrics_suite.functional._masks import position_mask
from metrics_suite.functional._rows import RowGather
from metrics_suite.functional._stats import mean_stats
from metrics_suite.validation import check_broadcast_mask, check_float, shape_str

__all__ = ["noise_statistics"]

#: Names of the per-position statistics, in the order of [`noise_statistics`][metrics_suite.functional.noise.noise_statistics].
NOISE_STATISTICS: tuple[str, ...] = (
    "input_norm",
    "mean_norm",
    "unshifted_noise_norm",
    "mean_shifted_noise_norm",
    "mean_domination_percent",
    "mean_domination_ratio",
    "mean_cosine_similarity",
    "noise_domination_percent",
    "noise_domination_ratio",
    "noise_cosine_similarity",
)


def _position_shape(shape: torch.Size, dim: int) -> torch.Size:
    """The shape of ``input`` without ``dim``."""
    axis = len(shape) + dim
    return torch.Size((*shape[:axis], *shape[axis + 1 :]))


def _noise_check(input: Tensor, mean: Tensor, noise: Tensor, noise_mask: Tensor | None, dim: int) -> None:
    """Raise ``TypeError``/``ValueError`` for inputs that do not fit ``input`` and ``dim``."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim >= 0:
        raise ValueError(f"`dim` must be a negative int (counted from the end), got {dim!r}")
    check_float("input", input)
    if input.ndim < -dim:
        raise ValueError(
            f"`input` must have at least {-dim} dims for dim={dim}, got {shape_str(input.shape)}"
        )
    for name, x in (("mean", mean), ("noise", noise)):
        check_float(name, x)
        try:
            broadcast = torch.broadcast_shapes(x.shape, input.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != input.shape:
            raise ValueError(
                f"`{name}` must have the shape of `input` {shape_str(input.shape)} (or broadcast to it), "
                f"got {shape_str(x.shape)}"
            )
    if noise_mask is not None:
        check_broadcast_mask(
            "noise_mask", noise_mask, _position_shape(input.shape, dim), "position shape (input without dim)"
        )


def _positions_finite(input: Tensor, mean: Tensor, noise: Tensor, dim: int) -> Tensor:
    """Bool over the position shape: True where ``input``, ``mean`` and ``noise`` are all finite."""
    finite = torch.isfinite(input).all(dim)
    for x in (mean, noise):
        finite = finite & torch.isfinite(x.to(input.device).expand(input.shape)).all(dim)
    return finite


def _div_defined(num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """``num / den`` (NaN where ``den == 0``) and the bool "defined" mask ``den != 0``."""
    defined = den != 0
    return torch.where(defined, num / torch.where(defined, den, 1.0), float("nan")), defined


def _noise_per_position(input: Tensor, mean: Tensor, noise: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The ten statistics at every position.

    Norms and dot products in float64: squares of float32/bfloat16/float16 values (up to 3.4e38,
    down to 1e-45) neither overflow nor underflow there, and ratios of such norms stay in float64
    range, so a finite input never gives an inf or a spurious zero norm (float64 inputs get the
    same math; their squares overflow beyond about 1e154). Positions are processed in chunks (see
    ``NOISE_CHUNK_ELEMENTS``), so the float64 copies stay small.

    Returns:
        ``values`` ``[10, *positions]`` (order of [`NOISE_STATISTICS`][metrics_suite.functional.noise.NOISE_STATISTICS], NaN where a ratio or
        cosine has a zero denominator) and ``defined`` ``[10, *positions]`` bool.
    """
    x_all, mu_all, eps_all = torch.broadcast_tensors(
        *(t.detach().to(input.device) for t in (input, mean, noise))
    )
    positions, d = _position_shape(x_all.shape, dim), x_all.shape[dim]
    chunk_elements = NOISE_CHUNK_ELEMENTS
    if x_all.device.type != "cpu":
        chunk_elements *= NOISE_DEVICE_CHUNK_FACTOR
    rows = rows_per_chunk(d, chunk_elements)
    gathers = [RowGather(t.movedim(dim, -1), torch.float64, rows) for t in (x_all, mu_all, eps_all)]
    buffers = [x_all.new_empty((rows, d), dtype=torch.float64) for _ in gathers]
    parts = [x_all.new_zeros((6, 0), dtype=torch.float64)]
    for part in row_slices(positions.numel(), rows):
        start, end = part.start, part.stop
        x, mu, eps = (gather.span(start, end, out[: end - start]) for gather, out in zip(gathers, buffers))
        shifted = mu + eps
        norms = [torch.linalg.vector_norm(t, dim=-1) for t in (x, mu, eps, shifted)]
        parts.append(torch.stack([*norms, torch.linalg.vecdot(x, mu), torch.linalg.vecdot(x, shifted)]))
    x_norm, mu_norm, eps_norm, shifted_norm, x_dot_mu, x_dot_shifted = torch.cat(parts, 1).view(6, *positions)
    always = torch.ones_like(x_norm, dtype=torch.bool)
    ratios = [
        _div_defined(mu_norm, mu_norm + eps_norm),
        _div_defined(mu_norm, eps_norm),
        _div_defined(x_dot_mu, x_norm * mu_norm),
        _div_defined(shifted_norm, x_norm + shifted_norm),
        _div_defined(shifted_norm, x_norm),
        _div_defined(x_dot_shifted, x_norm * shifted_norm),
    ]
    values = torch.stack([x_norm, mu_norm, eps_norm, shifted_norm, *(v for v, _ in ratios)])
    defined = torch.stack([always, always, always, always, *(d for _, d in ratios)])
    return values, defined


def _noise_update(values: Tensor, defined: Tensor, selected: Tensor) -> Tensor:
    """Sum statistics ``[10, 3]`` (n, Σv, Σv²) of each statistic over the ``selected`` positions.

    Args:
        values, defined: `_noise_per_position` output ``[10, *positions]``.
        selected: bool ``[*positions]``.

    A position enters a statistic only where that statistic is defined (non-zero denominator).
    """
    weights = (defined & selected).reshape(len(NOISE_STATISTICS), -1)
    # where, not a product: values are NaN where undefined
    values = torch.where(weights, values.reshape(len(NOISE_STATISTICS), -1), 0.0)
    return mean_stats(values, weights, dim=1)


def noise_statistics(
    input: Tensor, mean: Tensor, noise: Tensor, noise_mask: Tensor | None = None, dim: int = -1
) -> dict[str, Tensor]:
    r"""Per-position norms, domination shares and cosines of a noise transform's parts.

    The transform outputs ``input + mean + noise`` (``noise`` the zero-mean part, σ·ε); the
    mean-shifted noise is $s = \mu + \varepsilon$. At each position (norms over ``dim``):

    $$
    \text{mean\_domination\_percent} = \frac{\lVert\mu\rVert}{\lVert\mu\rVert + \lVert\varepsilon\rVert},\quad
    \text{mean\_domination\_ratio} = \frac{\lVert\mu\rVert}{\lVert\varepsilon\rVert},\quad
    \text{mean\_cosine\_similarity} = \cos(x, \mu),
    $$

    $$
    \text{noise\_domination\_percent} = \frac{\lVert s\rVert}{\lVert x\rVert + \lVert s\rVert},\quad
    \text{noise\_domination\_ratio} = \frac{\lVert s\rVert}{\lVert x\rVert},\quad
    \text{noise\_cosine\_similarity} = \cos(x, s),
    $$

    plus ``input_norm`` $\lVert x\rVert$, ``mean_norm`` $\lVert\mu\rVert$,
    ``unshifted_noise_norm`` $\lVert\varepsilon\rVert$ and ``mean_shifted_noise_norm``
    $\lVert s\rVert$. The "percent" statistics are fractions in [0, 1]. A ratio or cosine
    with a zero denominator is NaN at that position.

    Args:
        input: the transform's input, e.g. token embeddings ``[B, T, D]``.
        mean: the learned mean shift, of ``input``'s shape or broadcastable to it.
        noise: the zero-mean noise, of ``input``'s shape or broadcastable to it.
        noise_mask: bool (or 0/1) mask over the position shape (``input``'s shape without ``dim``),
            broadcast with torch rules (e.g. ``[T]`` for every sequence, ``[B, 1]`` per sequence).
        dim: the (negative) feature dimension the norms run over.

    Returns:
        ``{name: values}`` for the ten statistics, each a 1-d float64 tensor of the selected
        positions in row-major order (computed in float64 for every input dtype, so finite
        float32/bfloat16 inputs never give an inf or an underflowed zero norm).

    Examples:
        >>> import torch
        >>> x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        >>> mu = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> eps = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
        >>> out = noise_statistics(x, mu, eps)
        >>> out["input_norm"].tolist(), out["mean_domination_ratio"].tolist()
        ([5.0, 1.0], [nan, 1.0])
        >>> cosines = [round(v, 4) for v in out["noise_cosine_similarity"].tolist()]
        >>> cosines
        [0.8, 0.7071]
    """
    _noise_check(input, mean, noise, noise_mask, dim)
    values, _ = _noise_per_position(input, mean, noise, dim)
    selected = position_mask(noise_mask, values.shape[1:], values.device)
    return {name: v[selected] for name, v in zip(NOISE_STATISTICS, values)}
