"""Credit suite: credit-assignment signals (alternatives to backprop) checked against ground truth.

Every metric but [`FeatureDrift`][metrics_suite.credit.FeatureDrift] is kept per layer: ``num_layers`` at construction, a
``layer`` index per ``update``. A per-layer value is a scalar when ``num_layers == 1`` and a
``[num_layers]`` vector otherwise (NaN for layers never updated); a collection flattens vectors
as ``.../layer_{i}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metrics_suite.base import DiagnosticMetric, MetricOutput, mean_stats, safe_div
from metrics_suite.examples import credit as examples
from metrics_suite.functional.credit import (
    Difference,
    LossFn,
    _bridge_check,
    _bridge_residuals,
    _credit_cosine_check,
    _drift_check,
    _drift_compute,
    _drift_groups,
    _drift_sq,
    _flatten_items,
    _hidden_credit_check,
    _named_tensors,
    _nudging_delta,
    _nudging_stats,
    _pearson_compute,
    _pearson_sums,
    _per_item_cosine,
    _perturbation_pairs,
    _reference_sq_norms,
)
from metrics_suite.registry import register
from metrics_suite.validation import Flag, NonNegativeSize, PositiveFinite, Size, check_index, validated

__all__ = ["BridgeResidual", "CreditCosine", "FeatureDrift", "NudgingDelta", "PerturbationCorrelation"]


def _items_finite(*tensors: Tensor) -> Tensor:
    """Bool ``[N]``: True where every element of the item is finite in all ``tensors``."""
    finite = torch.isfinite(_flatten_items(tensors[0])).all(1)
    for t in tensors[1:]:
        finite = finite & torch.isfinite(_flatten_items(t)).all(1).to(finite.device)
    return finite


def _per_layer(value: Tensor, num_layers: int) -> Tensor:
    """A scalar for one layer, else the ``[num_layers]`` vector."""
    return value[0] if num_layers == 1 else value


class _PerLayerMetric(DiagnosticMetric):
    """Shared plumbing of the per-layer credit metrics."""

    vector_label = "layer"

    def __init__(self, num_layers: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_layers = num_layers

    def _layer(self, layer: Any) -> int:
        # checked even with validate_args=False: a negative index would silently hit another layer
        return check_index("layer", layer, self.num_layers, "num_layers")

    def _layer_means(self, stats: Tensor, name: str) -> dict[str, Tensor]:
        """``{name: mean}`` (plus ``{name}_stderr``) per layer from ``[L, 3]`` mean statistics."""
        return {k: _per_layer(v, self.num_layers) for k, v in self.mean_output(stats, name).items()}

    def _layer_value(self, stats: Tensor) -> MetricOutput:
        """The per-layer mean of a one-value metric, or with ``with_stderr`` the dict under [`value_name`][metrics_suite.base.DiagnosticMetric.value_name]."""
        assert self.value_name is not None
        out = self._layer_means(stats, self.value_name)
        return out if self.with_stderr else out[self.value_name]


# ---------------------------------------------------------------------------------------------- metrics
@register("credit", "cosine", example=examples.COSINE)
class CreditCosine(_PerLayerMetric):
    r"""Mean per-item cosine between a credit signal and a reference, per layer.

    $$
    \Gamma_l = \frac{1}{|S_l|} \sum_{i \in S_l}
    \frac{\langle a_i, r_i\rangle}{\lVert a_i\rVert\, \lVert r_i\rVert}
    $$

    over the items $S_l$ seen for layer $l$ on all ranks, with $a_i$ and
    $r_i$ the flattened credit and reference of item $i$ (``[N, ...] → [N, -1]``).
    With the backprop gradient as reference this is the offline BP cosine; with the exact costate
    ([`lq_costates`][metrics_suite.functional.credit.lq_costates]) the exact costate cosine. Items where either
    norm is zero have no defined cosine and are left out (they are not counted as non-finite).
    Cosines are computed in float64.

    Args:
        num_layers: number of layers tracked.
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options (``with_stderr=True`` returns
            ``{"cosine", "cosine_stderr"}``; a collection keeps the cosine under
            ``credit/cosine`` and the standard error under ``credit/cosine/stderr``).

    ``update(credit, reference, layer=0)`` takes ``[N, ...]`` tensors of one shape.
    ``compute()`` returns a float64 scalar (one layer) or ``[num_layers]``.

    Examples:
        >>> import torch
        >>> from metrics_suite import CreditCosine
        >>> metric = CreditCosine(num_layers=2)
        >>> credit = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
        >>> reference = torch.tensor([[1.0, 1.0], [1.0, 1.0], [3.0, 4.0]])
        >>> metric.update(credit, reference, layer=0)
        >>> metric.compute()  # layer 0: (0.7071 + 1) / 2 (zero credit left out); layer 1: no data
        tensor([0.8536,    nan], dtype=torch.float64)
    """

    higher_is_better = True
    value_name = "cosine"

    cosine_stats: Tensor

    @validated
    def __init__(self, num_layers: Size = 1, **kwargs: Any) -> None:
        super().__init__(num_layers, **kwargs)
        self.add_mean_state("cosine_stats", (num_layers,))

    def update(self, credit: Tensor, reference: Tensor, layer: int = 0) -> None:
        """Add the cosines of one batch of items to ``layer``."""
        layer = self._layer(layer)
        if self.validate_args:
            _credit_cosine_check(credit, reference)
        cosine, defined = _per_item_cosine(credit, reference)
        keep, skipped = self.nonfinite_filter("credit` or `reference", _items_finite(credit, reference))
        use = keep & defined
        stats = mean_stats(torch.where(use, cosine, 0.0), use)
        self.nonfinite_count += skipped
        self.cosine_stats[layer] += stats.to(self.cosine_stats.device)

    def compute(self) -> MetricOutput:
        """Mean cosine per layer."""
        return self._layer_value(self.cosine_stats)


@register("credit", "perturbation_correlation", example=examples.PERTURBATION_CORRELATION)
class PerturbationCorrelation(_PerLayerMetric):
    r"""Correlation between the loss change a credit signal predicts and the true change, per layer.

    For each item $i$ and $M$ random unit directions $v_{im}$ (uniform on the
    sphere of the flattened item, keyed by the item: see *Randomness* below):

    $$
    x_{im} = \langle a_i, \varepsilon v_{im}\rangle, \qquad
    y_{im} = \mathcal{L}(h_i + \varepsilon v_{im}) - \mathcal{L}(h_i)
    \quad\Big(\text{central: } \tfrac12\big[\mathcal{L}(h_i + \varepsilon v_{im})
    - \mathcal{L}(h_i - \varepsilon v_{im})\big]\Big),
    $$

    and $\rho_l$ is the Pearson correlation of all pairs seen for layer $l$ on all ranks:

    $$
    \rho = \frac{n\sum xy - \sum x \sum y}{\sqrt{n\sum x^2 - (\sum x)^2}\,\sqrt{n\sum y^2 - (\sum y)^2}}.
    $$

    The state is the six float64 sums per layer. They are raw (not centred) moments so that they
    stay sums; the predicted changes have mean zero by the symmetry of the directions, so their
    moments do not cancel, and the forward-difference curvature offset of $y$ is
    $O(\varepsilon^2)$, small next to its $O(\varepsilon)$ spread, so
    $n\sum y^2 - (\sum y)^2$ loses only a few digits of float64's sixteen. NaN without pairs or with zero
    variance (e.g. an all-zero credit).

    All ``M`` directions go through ``loss_fn`` in batched calls of at most ``chunk_size`` rows (see
    [`perturbation_pairs`][metrics_suite.functional.credit.perturbation_pairs]), under ``torch.no_grad()``;
    ``loss_fn`` must be item-wise, and sees whole copies of the batch stacked (row ``s·N + i`` is
    item ``i``: tile per-item targets with ``targets.repeat(R // N)``).

    Randomness: item $i$'s directions are a keyed hash of ``seed``, the values of $h_i$, the
    direction and the coordinate, mapped to normals on the input's device
    (``perturbation_pairs(..., seed=seed)``). So an item gets the same directions in
    any batch, at any position and on any rank: any split of the same data, and any number of ranks,
    gives the same $\rho$ up to float64 rounding (for a ``loss_fn`` whose per-item values do not
    depend on the batch: float32 matrix products may round differently for another number of rows),
    and the same data gives the same $\rho$ after a ``reset()`` or a resume from a checkpoint. Two
    metrics with the same seed score two credit rules on the same directions (a paired comparison).
    Items with equal values share directions (as duplicates should); two distinct items share them
    with probability about ``2**-64`` (their 64-bit keys collide).

    Args:
        num_layers: number of layers tracked.
        epsilon: step size $\varepsilon$.
        num_directions: directions per item $M$.
        difference: ``"forward"`` or ``"central"`` differences.
        seed: key of the directions (computed on the input's device). ``None`` derives
            it from torch's global RNG at construction without advancing it, so ``torch.manual_seed``
            makes runs reproducible and building the metric does not change what is drawn next (e.g.
            a model's initialisation). Under DDP every rank needs the same seed: pass one, or seed
            torch alike on every rank (Lightning's ``seed_everything`` does). The seed is saved in
            ``state_dict()`` (module extra state, not a summed metric state): a metric loaded from a
            checkpoint takes the checkpoint's seed, so a resumed run draws the same directions.
        chunk_size: maximum rows per ``loss_fn`` call (default ``2**22 // D``, at least one direction).
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options (``with_stderr=True``
            raises ``ValueError``: $\rho$ is not a mean).

    ``update(hidden, credit, loss_fn, layer=0)``: ``hidden`` and ``credit`` ``[N, d]`` (or
    ``[N, *F]``), ``loss_fn`` maps ``[R, d]`` to per-item losses ``[R]``, item-wise and without keeping
    its input (see [`perturbation_pairs`][metrics_suite.functional.credit.perturbation_pairs]). Items
    whose inputs or losses are not finite follow ``nan_strategy``.

    Examples:
        >>> import torch
        >>> from metrics_suite import PerturbationCorrelation
        >>> hidden = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> loss_fn = lambda h: 0.5 * (h**2).sum(-1)  # gradient = hidden
        >>> metric = PerturbationCorrelation(difference="central", seed=0)
        >>> metric.update(hidden, hidden, loss_fn)
        >>> round(metric.compute().item(), 6)
        1.0
        >>> noisy = PerturbationCorrelation(seed=0)
        >>> noisy.update(hidden, hidden + torch.randn(32, 4, dtype=torch.float64), loss_fn)
        >>> 0.0 < noisy.compute().item() < 0.99
        True
    """

    higher_is_better = True
    no_stderr = "rho is a correlation, not a mean over items"
    fingerprint_exclude = DiagnosticMetric.fingerprint_exclude | {"chunk_size"}  # memory only

    pair_sums: Tensor

    @validated
    def __init__(
        self,
        num_layers: Size = 1,
        epsilon: PositiveFinite = 1e-3,
        num_directions: Size = 32,
        difference: Difference = "forward",
        seed: NonNegativeSize | None = None,
        chunk_size: Size | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_layers, **kwargs)
        self.epsilon = epsilon
        self.num_directions = num_directions
        self.difference = difference
        if seed is None:  # read from the global RNG without advancing it (a model built next is unchanged)
            with torch.random.fork_rng(devices=[]):
                seed = int(torch.randint(0, 2**62, ()).item())
        self.seed = seed
        self.chunk_size = chunk_size
        self.add_sum_state("pair_sums", (num_layers, 6))

    def update(self, hidden: Tensor, credit: Tensor, loss_fn: LossFn, layer: int = 0) -> None:
        """Add the (predicted, true) pairs of one batch to ``layer``."""
        layer = self._layer(layer)
        if self.validate_args:
            _hidden_credit_check(hidden, credit, loss_fn)
        predicted, true = _perturbation_pairs(
            hidden,
            credit,
            loss_fn,
            self.epsilon,
            self.num_directions,
            self.difference,
            generator=None,
            chunk_size=self.chunk_size,
            seed=self.seed,
        )
        finite = _items_finite(hidden, credit).to(predicted.device) & _items_finite(predicted, true)
        keep, skipped = self.nonfinite_filter("hidden`, `credit` or `loss_fn", finite)
        sums = _pearson_sums(predicted, true, keep)
        self.nonfinite_count += skipped
        self.pair_sums[layer] += sums.to(self.pair_sums.device)

    def get_extra_state(self) -> dict[str, Tensor]:
        """The seed, saved by ``state_dict()`` so a resumed run draws the same directions."""
        return {"seed": torch.tensor(self.seed, dtype=torch.int64)}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        """Restore the seed saved by [`get_extra_state`][metrics_suite.credit.PerturbationCorrelation.get_extra_state]."""
        self.seed = int(state["seed"])

    def compute(self) -> Tensor:
        """Pearson correlation per layer."""
        return _per_layer(_pearson_compute(self.pair_sums), self.num_layers)


@register("credit", "nudging", example=examples.NUDGING)
class NudgingDelta(_PerLayerMetric):
    r"""Does a small step against the credit signal lower the loss? Per layer.

    $$
    \hat a_i = \frac{a_i}{\operatorname{rms}(a_i) + 10^{-6}}, \qquad
    \Delta_i = \mathcal{L}(h_i - \eta\, \hat a_i) - \mathcal{L}(h_i),
    $$

    with the RMS over the flattened item. Returns ``delta`` (mean $\Delta_i$) and
    ``improved_fraction`` (share of items with $\Delta_i < 0$) over all items of the layer on
    all ranks; ``with_stderr=True`` adds ``delta_stderr`` and ``improved_fraction_stderr``.
    Both losses of a batch come from one ``loss_fn`` call on ``2N`` rows, under ``torch.no_grad()``.

    Args:
        num_layers: number of layers tracked.
        eta: step size $\eta$ (in units of the credit's RMS).
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options.

    ``update(hidden, credit, loss_fn, layer=0)`` as in [`PerturbationCorrelation`][metrics_suite.credit.PerturbationCorrelation].

    Examples:
        >>> import torch
        >>> from metrics_suite import NudgingDelta
        >>> hidden = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.2]])
        >>> loss_fn = lambda h: 0.5 * (h**2).sum(-1)  # gradient = hidden
        >>> metric = NudgingDelta(eta=0.1)
        >>> metric.update(hidden, hidden * torch.tensor([[1.0], [1.0], [-1.0]]), loss_fn)
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'delta': -0.1311, 'improved_fraction': 0.6667}
    """

    higher_is_better = None  # delta: lower is better; improved_fraction: higher is better

    delta_stats: Tensor
    improved_stats: Tensor

    @validated
    def __init__(self, num_layers: Size = 1, eta: PositiveFinite = 0.01, **kwargs: Any) -> None:
        super().__init__(num_layers, **kwargs)
        self.eta = eta
        self.add_mean_state("delta_stats", (num_layers,))
        self.add_mean_state("improved_stats", (num_layers,))

    def update(self, hidden: Tensor, credit: Tensor, loss_fn: LossFn, layer: int = 0) -> None:
        """Add the loss changes of one batch to ``layer``."""
        layer = self._layer(layer)
        if self.validate_args:
            _hidden_credit_check(hidden, credit, loss_fn)
        delta = _nudging_delta(hidden, credit, loss_fn, self.eta)
        finite = _items_finite(hidden, credit).to(delta.device) & torch.isfinite(delta)
        keep, skipped = self.nonfinite_filter("hidden`, `credit` or `loss_fn", finite)
        delta_stats, improved_stats = _nudging_stats(delta, keep)
        self.nonfinite_count += skipped
        self.delta_stats[layer] += delta_stats.to(self.delta_stats.device)
        self.improved_stats[layer] += improved_stats.to(self.improved_stats.device)

    def compute(self) -> dict[str, Tensor]:
        """``delta`` and ``improved_fraction`` per layer."""
        return {
            **self._layer_means(self.delta_stats, "delta"),
            **self._layer_means(self.improved_stats, "improved_fraction"),
        }


@register("credit", "bridge_residual", example=examples.BRIDGE_RESIDUAL)
class BridgeResidual(_PerLayerMetric):
    r"""Mean absolute residual of a value function against its soft-min (bridge) target, per layer.

    $$
    V^{target}_b = -\lambda \operatorname{logsumexp}_k\!\big(-V^{next}_{bk}/\lambda\big) + \lambda \log K,
    \qquad
    r = \operatorname{mean}_b \big|V_b - V^{target}_b\big|,
    $$

    over all items of the layer on all ranks, in float64. $V^{target}$ lies between the
    minimum and the mean of the $K$ next values. Build the inputs from a value network and a
    target network with [`bridge_values`][metrics_suite.functional.credit.bridge_values].

    Args:
        num_layers: number of layers (or value functions) tracked.
        lam: temperature $\lambda > 0$.
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options (``with_stderr=True`` returns
            ``{"bridge_residual", "bridge_residual_stderr"}``; a collection keeps the residual under
            ``credit/bridge_residual`` and the standard error under ``credit/bridge_residual/stderr``).

    ``update(value, next_values, layer=0)``: ``value`` ``[B]``, ``next_values`` ``[B, K]``.

    Examples:
        >>> import torch
        >>> from metrics_suite import BridgeResidual
        >>> metric = BridgeResidual(lam=1.0)
        >>> metric.update(torch.tensor([0.5, 0.0]), torch.tensor([[0.0, 1.0], [2.0, 2.0]]))
        >>> round(metric.compute().item(), 4)  # (|0.5 - 0.3799| + |0 - 2|) / 2
        1.0601
    """

    higher_is_better = False
    value_name = "bridge_residual"

    residual_stats: Tensor

    @validated
    def __init__(self, num_layers: Size = 1, lam: PositiveFinite = 0.1, **kwargs: Any) -> None:
        super().__init__(num_layers, **kwargs)
        self.lam = lam
        self.add_mean_state("residual_stats", (num_layers,))

    def update(self, value: Tensor, next_values: Tensor, layer: int = 0) -> None:
        """Add the residuals of one batch to ``layer``."""
        layer = self._layer(layer)
        if self.validate_args:
            _bridge_check(value, next_values)
        residual = _bridge_residuals(value, next_values, self.lam)
        keep, skipped = self.nonfinite_filter("value` or `next_values", _items_finite(value, next_values))
        stats = mean_stats(torch.where(keep, residual, 0.0), keep)
        self.nonfinite_count += skipped
        self.residual_stats[layer] += stats.to(self.residual_stats.device)

    def compute(self) -> MetricOutput:
        """Mean absolute residual per layer."""
        return self._layer_value(self.residual_stats)


@register("credit", "feature_drift", example=examples.FEATURE_DRIFT, needs_config=True)
class FeatureDrift(DiagnosticMetric):
    r"""How far parameters have moved from a reference (e.g. their initial values).

    $$
    \text{drift}(W) = \frac{\lVert W - W_{init}\rVert_F}{\lVert W_{init}\rVert_F},
    \qquad
    \text{drift}(\text{module}) = \sqrt{\frac{\sum_{W \in \text{module}} \lVert W - W_{init}\rVert_F^2}
    {\sum_{W \in \text{module}} \lVert W_{init}\rVert_F^2}}
    \ (\texttt{group\_by\_module=True}).
    $$

    ``compute()`` returns ``{name: value}`` for the parameters of the **latest** ``update``: each
    update replaces the state (it does not accumulate), and ``forward()`` follows the same rule.
    Names are parameter names (``"layer1.weight"``: the dots are kept, so a collection reports
    ``credit/feature_drift/layer1.weight``) or, grouped, module names (the parameter name up to the
    last dot; ``"root"`` for top-level parameters).

    Distributed: parameters are replicated, so the state holds per parameter the float64
    $\lVert W - W_{init}\rVert_F^2$ of the latest update and a count set to 1 by that update;
    the sync sums both over ranks, and their ratio is the replicated value. A rank that never
    updated adds 0/0; a parameter no rank has seen is NaN. $\lVert W_{init}\rVert_F^2$ is a
    buffer computed at construction, not a state (states are summed by the sync). ``merge_state``
    sums as the sync does (it merges ranks, not successive updates).

    The reference is copied at construction (memory: one copy of the referenced parameters, kept
    on the metric's device). A parameter with non-finite values follows ``nan_strategy``
    (``"skip"``: NaN for that parameter, counted in ``nonfinite_count`` of the latest update).
    A zero reference norm (e.g. a zero-initialised bias) gives NaN for that parameter; grouping by
    module avoids it.

    Args:
        reference: an ``nn.Module`` (its ``named_parameters()``; buffers are ignored) or a mapping
            of names to float tensors.
        group_by_module: report one value per module instead of per parameter.
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options.

    ``update(params)`` takes a module or a mapping holding every reference name with the reference
    shape; extra names are ignored (so the whole model can be passed for a partial reference).

    Examples:
        >>> import torch
        >>> from metrics_suite import FeatureDrift
        >>> model = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0), model.bias.fill_(1.0)
        >>> metric = FeatureDrift(model, group_by_module=True)
        >>> with torch.no_grad():
        ...     model.weight[1, 1] = 3.0
        >>> metric.update(model)
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}  # sqrt(4 / 6)
        {'root': 0.8165}
    """

    no_stderr = "a drift compares parameters with a reference, not a mean over items"
    higher_is_better = None
    # the reference is held in buffers: its parameter names (one state entry each) stand for it
    fingerprint_exclude = DiagnosticMetric.fingerprint_exclude | {"reference"}
    fingerprint_attributes = ("parameter_names",)

    drift_sq: Tensor
    drift_count: Tensor
    replicas: Tensor
    reference_sq_norms: Tensor
    group_index: Tensor

    @validated
    def __init__(
        self,
        reference: nn.Module | Mapping[str, Tensor],
        group_by_module: Flag = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        ref = _named_tensors("reference", reference)
        if not ref:
            raise ValueError("`reference` holds no parameters")
        self.group_by_module = group_by_module
        self.parameter_names = list(ref)
        self.output_names, group_index = _drift_groups(self.parameter_names, group_by_module)
        for i, w in enumerate(ref.values()):
            self.register_buffer(f"reference_{i}", w.clone(), persistent=False)
        self.register_buffer("reference_sq_norms", _reference_sq_norms(ref), persistent=False)
        self.register_buffer("group_index", group_index, persistent=False)
        self.add_sum_state("drift_sq", (len(ref),))
        self.add_count_state("drift_count", (len(ref),))
        self.add_count_state("replicas")  # ranks whose latest update is in the state

    def _reference(self) -> dict[str, Tensor]:
        return {k: getattr(self, f"reference_{i}") for i, k in enumerate(self.parameter_names)}

    def update(self, params: nn.Module | Mapping[str, Tensor]) -> None:
        """Replace the state with the drift of ``params``."""
        current = _named_tensors("params", params)
        reference = self._reference()
        if self.validate_args:
            _drift_check(current, reference)
        drift_sq = _drift_sq(current, reference).to(self.drift_sq.device)
        finite = torch.stack([torch.isfinite(current[k]).all().to(drift_sq.device) for k in reference])
        keep, skipped = self.nonfinite_filter("params", finite)
        self.drift_sq = torch.where(keep, drift_sq, 0.0)
        self.drift_count = keep.to(self.drift_count.dtype)
        self.nonfinite_count = skipped.to(self.nonfinite_count.device)
        self.replicas = torch.ones_like(self.replicas)

    def skipped_items(self) -> Tensor:
        """Non-finite parameters of the latest update, counted once however many ranks hold a replica."""
        return self.nonfinite_count // self.replicas.clamp_min(1)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Update and return the drift of this batch (which is also the accumulated value).

        torchmetrics' ``forward`` adds the batch state to the previous one; here an update replaces
        the state, so the previous state is cleared first (and restored if the update fails).
        """
        saved, count = self._copy_state_dict(), self._update_count
        self.reset()
        self._update_count = count
        try:
            return super().forward(*args, **kwargs)
        except Exception:
            for attr, value in saved.items():
                setattr(self, attr, value)
            raise

    def compute(self) -> dict[str, Tensor]:
        """Relative drift per parameter (or module) of the latest update."""
        per_param = safe_div(self.drift_sq, self.drift_count.to(torch.float64))
        values = _drift_compute(per_param, self.reference_sq_norms, self.group_index, len(self.output_names))
        return dict(zip(self.output_names, values.unbind(0)))
