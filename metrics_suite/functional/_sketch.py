r"""A mergeable log-bucketed quantile sketch (DDSketch's idea) kept as a fixed-size count vector.

With relative accuracy $\alpha$ and $\gamma = (1 + \alpha) / (1 - \alpha)$, a value
$x \in [\text{min\_value}, \text{max\_value}]$ is counted in bucket

$$
i(x) = \lceil \log_\gamma x \rceil, \qquad\text{so}\qquad \gamma^{i-1} < x \le \gamma^{i},
$$

and bucket $i$ reports its representative $r_i = 2\gamma^i / (\gamma + 1)$. For every $x$ in
the bucket, $r_i / x \in [2/(\gamma+1),\, 2\gamma/(\gamma+1)) = [1 - \alpha,\, 1 + \alpha)$: the
relative error is at most $\alpha$. The regular buckets are the whole buckets that cover
$[\text{min\_value}, \text{max\_value}]$, from $i_{\min} = \lceil \log_\gamma \text{min\_value} \rceil$
to $i_{\max} = \lceil \log_\gamma \text{max\_value} \rceil$. Two more buckets close the range:
an underflow bucket for $x \le \gamma^{i_{\min} - 1}$ (a value between ``min_value / γ`` and
``min_value``; zeros and rounding-noise negatives included) reported as exactly 0, and an
overflow bucket for $x > \gamma^{i_{\max}}$ (at most ``γ · max_value``), $+\infty$ and NaN,
reported as $+\infty$.

The sketch is a count per bucket, so it is a sum state: the sketch of $a \cup b$ is the sketch
of $a$ plus the sketch of $b$, exactly (integer counts), whatever the split, order or number of
ranks. Its size is fixed by the spec, never by the data. Buckets are monotone in $x$, so the
bucket holding the $k$-th smallest value is found from cumulative counts alone: any quantile
defined by a rank is reported within relative error $\alpha$ of the exact one.

**Quantile definition.** The sketch matches ``numpy.quantile(x, q, method="inverted_cdf")``
(Hyndman & Fan type 1, the only definition numpy also supports with ``weights``): the smallest
value $x_{(k)}$ whose empirical CDF reaches $q$,

$$
Q(q) = \min\{x : W(\le x) / W \ge q\},
$$

with $W$ the total count (or weight), evaluated in float64 as numpy's weighted path does
(cumulative count / total ``>= q``). $Q(0)$ is the minimum, $Q(1)$ the maximum. Interpolating
definitions (numpy's default ``"linear"``) return values between two items, which a bucket
count cannot locate. For unit weights numpy's unweighted path computes the rank as
``ceil(n*q - 1)``, which can differ by one item where ``n*q`` rounds across an integer
(``100 * 0.07``); the sketch follows the weighted path.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metrics_suite.validation import FLOAT_DTYPES, INT_DTYPES, check_float, check_tensor, shape_str

__all__ = [
    "SketchSpec",
    "check_quantiles",
    "quantile_key",
    "sketch_max",
    "sketch_outputs",
    "sketch_quantile",
    "sketch_state_shape",
    "sketch_update",
]


def _check_finite_float(owner: str, name: str, value: object, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{owner}: `{name}` must be {accepted}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SketchSpec:
    r"""The fixed layout of a quantile sketch: relative accuracy and value range.

    Bucket positions in a count vector of length `num_buckets`: 0 is the underflow/zero
    bucket ($x \le \gamma^{i_{\min} - 1}$), ``1 .. num_buckets - 2`` are $i = $ `min_index` ..
    `max_index`, the last is the overflow bucket ($x > \gamma^{i_{\max}}$, $+\infty$, NaN).

    The default range suits per-token divergences of next-token distributions (natural log):

    * ``max_value = 1e4``: Jensen–Shannon is at most $\ln 2$, total variation and squared
      Hellinger at most 1; Jeffreys and KL grow with the logit gap between the two models and
      reach a few hundred for float32 logits of real models (the issue's edge is 1e3), so one
      more decade is margin. Values above $\gamma^{461} \approx 1.0100\cdot10^4$ (and Jeffreys'
      $+\infty$ for a token banned in one model only) land in the overflow bucket.
    * ``min_value = 1e-12``: a one-ulp change of float32 logits (relative $\approx 6\cdot10^{-8}$)
      moves the second-order divergences (Jeffreys, JS, KL, $H^2$, all $\approx \sum \delta^2/p$)
      by about $(6\cdot10^{-8})^2 \approx 4\cdot10^{-15}$ per vocabulary entry that
      moves, so values below 1e-12 are at float32's rounding floor; values at or below
      $\gamma^{-1382} \approx 0.990\cdot10^{-12}$ are reported as 0 (absolute error below 1e-12).

    Each decade costs $\ln 10 / \ln\gamma \approx 115$ buckets at $\alpha = 0.01$; the default
    16 decades make `num_buckets` = 1845 counts per sketch (7380 for the four divergences).

    Args:
        relative_accuracy: $\alpha \in (0, 1)$; every reported quantile is within relative
            error $\alpha$ of the exact one.
        min_value: smallest value sure of a regular bucket (> 0); values below its bucket count as 0.
        max_value: largest value sure of a regular bucket (> ``min_value``); values above its
            bucket count as overflow.

    Examples:
        >>> spec = SketchSpec()
        >>> round(spec.gamma, 6), spec.min_index, spec.max_index, spec.num_buckets
        (1.020202, -1381, 461, 1845)
        >>> SketchSpec(relative_accuracy=0.05).num_buckets
        372
    """

    relative_accuracy: float = 0.01
    min_value: float = 1e-12
    max_value: float = 1e4

    def __post_init__(self) -> None:
        alpha = _check_finite_float(
            "SketchSpec", "relative_accuracy", self.relative_accuracy, "a float in (0, 1)"
        )
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"SketchSpec: `relative_accuracy` must be a float in (0, 1), got {alpha!r}")
        low = _check_finite_float("SketchSpec", "min_value", self.min_value, "a finite float > 0")
        if low <= 0.0:
            raise ValueError(f"SketchSpec: `min_value` must be a finite float > 0, got {low!r}")
        high = _check_finite_float("SketchSpec", "max_value", self.max_value, "a finite float > min_value")
        if high <= low:
            raise ValueError(
                f"SketchSpec: `max_value` must be a finite float > min_value={low!r}, got {high!r}"
            )
        # stored as floats, so equal specs compare (and fingerprint) equal whatever number type was passed
        object.__setattr__(self, "relative_accuracy", alpha)
        object.__setattr__(self, "min_value", low)
        object.__setattr__(self, "max_value", high)

    @property
    def gamma(self) -> float:
        r"""$\gamma = (1 + \alpha) / (1 - \alpha)$, the ratio between consecutive bucket edges."""
        return (1.0 + self.relative_accuracy) / (1.0 - self.relative_accuracy)

    @property
    def log_gamma(self) -> float:
        r"""$\ln \gamma$ (computed as ``log1p(2α / (1 − α))`` to keep small α accurate)."""
        return math.log1p(2.0 * self.relative_accuracy / (1.0 - self.relative_accuracy))

    # cached (the dataclass is frozen, cached_property writes the instance dict directly). The 1e-9
    # margins keep an edge value in a regular bucket even when another device's log differs by an ulp.
    @functools.cached_property
    def min_index(self) -> int:
        r"""$\lceil \log_\gamma \text{min\_value} \rceil$, the first regular bucket."""
        return math.ceil(math.log(self.min_value) / self.log_gamma - 1e-9)

    @functools.cached_property
    def max_index(self) -> int:
        r"""$\lceil \log_\gamma \text{max\_value} \rceil$, the last regular bucket."""
        return math.ceil(math.log(self.max_value) / self.log_gamma + 1e-9)

    @functools.cached_property
    def num_buckets(self) -> int:
        """Length of the count vector: the regular buckets plus the underflow and overflow buckets."""
        return self.max_index - self.min_index + 3

    def representatives(self, device: torch.device | str | None = None) -> Tensor:
        r"""float64 ``[num_buckets]``: 0, then $2\gamma^i/(\gamma+1)$ for each regular bucket, then $+\infty$."""
        i = torch.arange(self.min_index, self.max_index + 1, dtype=torch.float64, device=device)
        regular = torch.exp(i * self.log_gamma) * (2.0 / (self.gamma + 1.0))
        zero = torch.zeros(1, dtype=torch.float64, device=device)
        return torch.cat([zero, regular, torch.full_like(zero, math.inf)])


def _bucket_index(x: Tensor, log_gamma: float) -> Tensor:
    """``ceil(log_γ x)`` of float64 ``x``, as a new float64 tensor (the one place the bucket formula lives)."""
    return torch.log(x).div_(log_gamma).ceil_()


def _bucket_positions(values: Tensor, spec: SketchSpec) -> Tensor:
    """int64 position in the count vector of every value (same shape as ``values``).

    Few passes, in place after the first copies: a batch of tokens is read once per step.
    """
    overflow = float(spec.num_buckets - 1)
    # clamp_min keeps NaN (→ overflow below); negatives become 0, whose log is -inf (→ underflow)
    x = values.to(torch.float64).clamp_min(0.0)
    position = _bucket_index(x, spec.log_gamma).sub_(spec.min_index - 1)
    position.nan_to_num_(nan=overflow, posinf=overflow, neginf=0.0).clamp_(0.0, overflow)
    return position.to(torch.int64)


def _check_weights(weights: object, values: Tensor) -> Tensor:
    w = check_tensor("weights", weights)
    if w.device != values.device:
        raise ValueError(f"`weights` must be on the device of `values` ({values.device}), got {w.device}")
    try:
        ok = torch.broadcast_shapes(w.shape, values.shape) == values.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"`weights` must broadcast to the shape of `values` {shape_str(values.shape)}, got {shape_str(w.shape)}"
        )
    if w.dtype == torch.bool:
        return w
    if w.dtype in INT_DTYPES:
        if w.numel() and bool(((w != 0) & (w != 1)).any()):
            raise ValueError("`weights` given as an integer mask must hold only 0 and 1")
        return w != 0
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"`weights` must be a bool/0-1 integer mask or a floating-point tensor, got dtype {w.dtype}"
        )
    if w.numel() and not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError("`weights` must be finite and >= 0")
    return w


def sketch_update(
    values: Tensor,
    spec: SketchSpec,
    weights: Tensor | None = None,
    batch_dims: int = 0,
    validate: bool = True,
) -> Tensor:
    r"""Counts per bucket of ``values``: the sketch of one batch, to be added to a sum state.

    Value $x$ goes to bucket $\lceil \log_\gamma x \rceil$ (see `SketchSpec`), one
    vectorised ``scatter_add`` on the values' device. The first ``batch_dims`` dimensions index
    separate sketches (e.g. one per divergence); all other dimensions are items pooled into
    each sketch. Adding the results of two batches gives exactly the result of their union.

    Args:
        values: floating-point values ``[*batch, *items]``, meant to be non-negative (values
            below the bucket of ``spec.min_value``, negatives included, count as 0).
        spec: the sketch layout.
        weights: ``None`` (every item counts once), a bool or 0/1 integer mask (True counts,
            so NaN values at masked-out positions are fine) or non-negative float weights;
            broadcast to ``values`` with torch's rules.
        batch_dims: number of leading dimensions of ``values`` that index separate sketches.
        validate: check the arguments, and that no included value is NaN (``False`` skips the
            checks, which synchronise with the device; NaN then counts as overflow).

    Returns:
        ``[*batch, spec.num_buckets]`` counts: int64 without weights or with a mask, float64 with
        float weights.

    Examples:
        >>> import torch
        >>> spec = SketchSpec(relative_accuracy=0.01)
        >>> counts = sketch_update(torch.tensor([0.0, 1.0, 1.0, 2e4]), spec)
        >>> counts.sum().item(), counts[0].item(), counts[-1].item()  # 4 items, one zero, one overflow
        (4, 1, 1)
        >>> # 1.0 = γ^0 goes to bucket i = 0, at position i - min_index + 1 (its representative 1 - α)
        >>> counts[0 - spec.min_index + 1].item(), round(spec.representatives()[0 - spec.min_index + 1].item(), 12)
        (2, 0.99)
        >>> two = torch.tensor([[0.5, 0.5, 3.0], [1.0, 2.0, 3.0]])
        >>> sketch_update(two, spec, weights=torch.tensor([True, True, False]), batch_dims=1).sum(-1)
        tensor([2, 2])
    """
    if validate:
        check_float("values", values)
        if not isinstance(spec, SketchSpec):
            raise TypeError(f"`spec` must be a SketchSpec, got {type(spec).__name__}")
        if (
            isinstance(batch_dims, bool)
            or not isinstance(batch_dims, int)
            or not 0 <= batch_dims <= values.ndim
        ):
            raise ValueError(
                f"`batch_dims` must be an int in [0, values.ndim={values.ndim}] "
                f"(`values` has shape {shape_str(values.shape)}), got {batch_dims!r}"
            )
        if weights is not None:
            weights = _check_weights(weights, values)
        included = torch.isnan(values) if weights is None else torch.isnan(values) & (weights != 0)
        if bool(included.any()):
            raise ValueError("`values` holds NaN at included positions; mask them out with `weights`")
    elif weights is not None and weights.dtype != torch.bool and not weights.dtype.is_floating_point:
        weights = weights != 0
    batch_shape = values.shape[:batch_dims]
    num_sketches, num_items = math.prod(batch_shape), math.prod(values.shape[batch_dims:])
    position = _bucket_positions(values, spec).reshape(num_sketches, num_items)
    if weights is None:
        src = torch.ones((), dtype=torch.int64, device=values.device).expand(position.shape)
    elif weights.dtype == torch.bool:
        src = weights.expand(values.shape).reshape(position.shape).to(torch.int64)
    else:
        src = weights.to(torch.float64).expand(values.shape).reshape(position.shape)
    counts = torch.zeros(num_sketches, spec.num_buckets, dtype=src.dtype, device=values.device)
    counts.scatter_add_(1, position, src)
    return counts.reshape(*batch_shape, spec.num_buckets)


def _check_counts(counts: object, spec: SketchSpec) -> Tensor:
    c = check_tensor("counts", counts)
    if not isinstance(spec, SketchSpec):
        raise TypeError(f"`spec` must be a SketchSpec, got {type(spec).__name__}")
    if c.ndim == 0 or c.shape[-1] != spec.num_buckets:
        raise ValueError(
            f"`counts` must have shape [..., {spec.num_buckets}] (spec.num_buckets), got {shape_str(c.shape)}"
        )
    if c.dtype not in INT_DTYPES and c.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`counts` must be an integer or floating-point tensor, got dtype {c.dtype}")
    return c


def check_quantiles(quantiles: object, owner: str = "sketch") -> tuple[float, ...]:
    """Validate a non-empty sequence of quantile levels in [0, 1] (bools, strings, NaN rejected).

    Args:
        quantiles: the levels, e.g. ``(0.5, 0.9, 0.99)``.
        owner: who is asking (a metric name), for the message.

    Returns:
        The levels as a tuple of floats, in the given order.

    Examples:
        >>> check_quantiles([0.5, 1])
        (0.5, 1.0)
    """
    accepted = "a non-empty sequence of floats in [0, 1], e.g. (0.5, 0.9, 0.99)"
    if isinstance(quantiles, str | bytes) or not isinstance(quantiles, Sequence) or not quantiles:
        raise ValueError(f"{owner}: `quantiles` must be {accepted}, got {quantiles!r}")
    for q in quantiles:
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 <= float(q) <= 1.0:
            raise ValueError(f"{owner}: `quantiles` must be {accepted}, got {quantiles!r} (bad entry {q!r})")
    return tuple(float(q) for q in quantiles)


def sketch_quantile(counts: Tensor, q: float | Sequence[float], spec: SketchSpec) -> Tensor:
    r"""Quantiles of sketched values, each within relative error α of the exact one.

    For level $q$ the reported bucket is the first $b$ with cumulative count $C_b > 0$ and
    $C_b / C_\text{total} \ge q$ (numpy's ``"inverted_cdf"``, see the module docs); it reports
    its representative $2\gamma^i/(\gamma+1)$, 0 for the underflow bucket and $+\infty$ for the
    overflow bucket. An empty sketch gives NaN.

    Args:
        counts: ``[..., spec.num_buckets]`` (int or float counts, e.g. a sum of
            `sketch_update` results).
        q: one level in [0, 1] or a sequence of levels.
        spec: the layout the counts were built with.

    Returns:
        float64 ``[...]`` for one level, ``[..., len(q)]`` for a sequence.

    Examples:
        A doctest whose data separates the definitions: ``inverted_cdf`` at q = 0.3 of four items
        is the second smallest (10); ``"lower"`` would give 1 and ``"linear"`` 9.1.

        >>> import numpy as np, torch
        >>> x = [1.0, 10.0, 100.0, 1000.0]
        >>> spec = SketchSpec(relative_accuracy=0.01)
        >>> est = sketch_quantile(sketch_update(torch.tensor(x), spec), [0.3, 0.5, 1.0], spec)
        >>> [round(v, 2) for v in est.tolist()]
        [10.07, 10.07, 1002.43]
        >>> np.quantile(x, [0.3, 0.5, 1.0], method="inverted_cdf").tolist()
        [10.0, 10.0, 1000.0]
        >>> np.quantile(x, [0.3, 0.5, 1.0], method="lower").tolist(), np.quantile(x, 0.3).item()
        ([1.0, 10.0, 1000.0], 9.1)
        >>> sketch_quantile(torch.zeros(2, spec.num_buckets, dtype=torch.int64), 0.5, spec)  # empty
        tensor([nan, nan], dtype=torch.float64)
    """
    c = _check_counts(counts, spec)
    scalar = not isinstance(q, Sequence) or isinstance(q, str | bytes)
    levels = check_quantiles([q] if scalar else q, owner="sketch_quantile")
    cumulative = c.to(torch.float64).cumsum(-1)
    total = cumulative[..., -1:]
    # leading empty buckets get a CDF of -1 so that q = 0 finds the first non-empty one (as numpy)
    cdf = torch.where(cumulative > 0, cumulative / total, -1.0).contiguous()
    level = torch.tensor(levels, dtype=torch.float64, device=c.device).expand(*c.shape[:-1], len(levels))
    bucket = torch.searchsorted(cdf, level.contiguous(), side="left").clamp_max(spec.num_buckets - 1)
    estimate = spec.representatives(c.device)[bucket]
    estimate = torch.where(total > 0, estimate, math.nan)
    return estimate[..., 0] if scalar else estimate


def sketch_max(counts: Tensor, spec: SketchSpec) -> Tensor:
    r"""Largest sketched value, within relative error α of the true maximum (NaN when empty).

    The representative of the last non-empty bucket: 0 when every value was in the underflow
    bucket, $+\infty$ when one was in the overflow bucket.

    Examples:
        >>> import torch
        >>> spec = SketchSpec()
        >>> counts = sketch_update(torch.tensor([[0.3, 0.69], [0.0, 0.0], [1.0, 5e4]]), spec, batch_dims=1)
        >>> sketch_max(counts, spec)
        tensor([0.6907, 0.0000,    inf], dtype=torch.float64)
    """
    c = _check_counts(counts, spec)
    position = torch.arange(spec.num_buckets, device=c.device)
    last = torch.where(c > 0, position, 0).amax(-1)
    return torch.where((c > 0).any(-1), spec.representatives(c.device)[last], math.nan)


def quantile_key(q: float) -> str:
    """Output-key suffix of a level: ``0.5 → "p50"``, ``0.99 → "p99"``, ``0.999 → "p99.9"``.

    Examples:
        >>> [quantile_key(q) for q in (0.5, 0.9, 0.99, 0.999, 0.07)]
        ['p50', 'p90', 'p99', 'p99.9', 'p7']
    """
    return f"p{100.0 * q:g}"


def sketch_state_shape(spec: SketchSpec, batch_shape: Sequence[int] = ()) -> tuple[int, ...]:
    """Shape of a sketch state: ``(*batch_shape, spec.num_buckets)``; register it as an int64 sum state.

    Examples:
        >>> sketch_state_shape(SketchSpec(), (4,))
        (4, 1845)
    """
    return (*tuple(batch_shape), spec.num_buckets)


def sketch_outputs(
    counts: Tensor, spec: SketchSpec, quantiles: Sequence[float], names: Sequence[str]
) -> dict[str, Tensor]:
    """``{f"{name}_{quantile_key(q)}": ..., f"{name}_max": ...}`` for each sketch of ``counts [len(names), B]``.

    Examples:
        >>> import torch
        >>> spec = SketchSpec()
        >>> values = torch.tensor([[0.0, 0.1, 0.2, 0.4], [0.5, 0.5, 0.6, 0.6]])
        >>> out = sketch_outputs(sketch_update(values, spec, batch_dims=1), spec, (0.5,), ("js", "tv"))
        >>> {k: round(v.item(), 4) for k, v in out.items()}
        {'js_p50': 0.0992, 'js_max': 0.4025, 'tv_p50': 0.5015, 'tv_max': 0.6005}
    """
    c = _check_counts(counts, spec)
    if c.ndim != 2 or c.shape[0] != len(names):
        raise ValueError(
            f"`counts` must have shape [{len(names)}, {spec.num_buckets}] (one sketch per name), "
            f"got {shape_str(c.shape)}"
        )
    levels = check_quantiles(quantiles, owner="sketch_outputs")
    estimates = sketch_quantile(c, levels, spec)
    maxima = sketch_max(c, spec)
    out: dict[str, Tensor] = {}
    for row, name in enumerate(names):
        out.update({f"{name}_{quantile_key(q)}": estimates[row, j] for j, q in enumerate(levels)})
        out[f"{name}_max"] = maxima[row]
    return out
