"""Reconstruction suite: how much of the model a transform or a spliced-in reconstruction keeps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field, StrictFloat, StrictInt
from torch import Tensor

from metrics_suite.base import DiagnosticMetric, MetricOutput
from metrics_suite.examples import reconstruction as examples
from metrics_suite.functional.reconstruction import (
    DENSITY_EDGES_LOG10,
    ScoreReduction,
    _activation_check,
    _activation_compute,
    _activation_update,
    _activation_vector_stats,
    _changed_tokens_check,
    _changed_tokens_compute,
    _changed_tokens_stats,
    _changed_tokens_update,
    _component_layout,
    _component_selection,
    _downstream_compute,
    _downstream_stats,
    _downstream_update,
    _feature_l1,
    _feature_sparsity_check,
    _feature_sparsity_compute,
    _feature_sparsity_update,
    _firing_frequency,
    _reconstruction_score_check,
    _reconstruction_score_compute,
    _reconstruction_score_update,
    dead_fraction_key,
)
from metrics_suite.registry import register
from metrics_suite.validation import Size, validated

__all__ = [
    "ActivationReconstruction",
    "ChangedTokenRate",
    "DownstreamReconstruction",
    "FeatureSparsity",
    "ReconstructionScore",
]


@register("reconstruction", "reconstruction_score", example=examples.RECONSTRUCTION_SCORE)
class ReconstructionScore(DiagnosticMetric):
    r"""Share of the loss gap between zero-ablation and the clean model that a reconstruction closes.

    Per component, with clean loss $l$, loss with the reconstruction spliced in
    $l^{rec}$ and loss with the component zero-ablated $l^{zero}$:

    $$
    \text{ratio\_of\_sums} = \frac{\sum_i l^{zero}_i - \sum_i l^{rec}_i}{\sum_i l^{zero}_i - \sum_i l_i},
    \qquad
    \text{itemwise\_mean} = \operatorname{mean}_i \frac{l^{zero}_i - l^{rec}_i}{l^{zero}_i - l_i}.
    $$

    Items with $l^{zero}_i = l_i$ are left out of ``itemwise_mean``. No data gives NaN.
    Non-finite losses follow ``nan_strategy`` per (item, component): with ``[N, C]`` losses a NaN
    of one component leaves the item out of that component only, and ``nonfinite_count`` counts
    the (item, component) pairs left out.

    Args:
        num_components: number of components (e.g. SAEs at different layers) scored at once.
        reduction: ``"ratio_of_sums"`` (default) or ``"itemwise_mean"``.
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options (``validate_args``,
            ``nan_strategy``, torchmetrics' own, and ``with_stderr``: only with
            ``reduction="itemwise_mean"``, as a ratio of sums has no per-item spread; it raises
            ``ValueError`` with ``"ratio_of_sums"``).

    ``update(source_model_loss, source_model_loss_with_reconstruction,
    source_model_loss_with_zero_ablation, component_idx=None)`` takes losses ``[N]`` or
    ``[N, num_components]``; with ``[N]`` losses and several components, ``component_idx`` (an int
    or an ``[N]`` tensor) says which component each item belongs to.

    ``compute()`` returns a scalar when ``num_components == 1``, else ``[num_components]``; with
    ``with_stderr=True`` the dict ``{"reconstruction_score", "reconstruction_score_stderr"}``
    (in a collection the score keeps its key ``reconstruction/reconstruction_score``, the standard
    error goes to ``reconstruction/reconstruction_score/stderr``).

    Examples:
        >>> import torch
        >>> from metrics_suite import ReconstructionScore
        >>> l, l_rec, l_zero = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.5]), torch.tensor([5.0, 3.0])
        >>> metric = ReconstructionScore()
        >>> metric.update(l, l_rec, l_zero)
        >>> metric.compute()  # (8 - 4.5) / (8 - 3)
        tensor(0.7000, dtype=torch.float64)
        >>> metric = ReconstructionScore(reduction="itemwise_mean")
        >>> metric.update(l, l_rec, l_zero)
        >>> metric.compute()  # (3/4 + 1/2) / 2
        tensor(0.6250, dtype=torch.float64)
    """

    higher_is_better = True
    value_name = "reconstruction_score"
    vector_label = "component"

    loss_sums: Tensor
    ratio_stats: Tensor

    @validated
    def __init__(
        self, num_components: Size = 1, reduction: ScoreReduction = "ratio_of_sums", **kwargs: Any
    ) -> None:
        if kwargs.get("with_stderr") is True and reduction == "ratio_of_sums":
            raise ValueError(
                "`with_stderr=True` needs reduction='itemwise_mean': a ratio of sums has no per-item "
                "standard error"
            )
        super().__init__(**kwargs)
        self.num_components = num_components
        self.reduction = reduction
        self.add_sum_state("loss_sums", (num_components, 3))
        self.add_mean_state("ratio_stats", (num_components,))

    def update(
        self,
        source_model_loss: Tensor,
        source_model_loss_with_reconstruction: Tensor,
        source_model_loss_with_zero_ablation: Tensor,
        component_idx: Tensor | int | None = None,
    ) -> None:
        """Add one batch of losses (``[N]`` or ``[N, num_components]``)."""
        losses = (
            source_model_loss,
            source_model_loss_with_reconstruction,
            source_model_loss_with_zero_ablation,
        )
        if self.validate_args:
            _reconstruction_score_check(*losses, self.num_components, component_idx)
        # per (item, component) for [N, C] losses: a NaN of one component leaves the others alone
        finite = torch.isfinite(torch.stack(losses)).all(0)
        keep, skipped = self.nonfinite_filter(
            "source_model_loss`, `source_model_loss_with_reconstruction` or `source_model_loss_with_zero_ablation",
            finite,
        )
        loss_sums, ratio_stats = _reconstruction_score_update(
            source_model_loss,
            source_model_loss_with_reconstruction,
            source_model_loss_with_zero_ablation,
            num_components=self.num_components,
            component_idx=component_idx,
            validate=False,
            keep=keep,
        )
        self.nonfinite_count += skipped
        self.loss_sums += loss_sums.to(self.loss_sums.device)
        self.ratio_stats += ratio_stats.to(self.ratio_stats.device)

    def compute(self) -> MetricOutput:
        """The score per component (scalar for one component)."""
        if self.with_stderr:  # itemwise_mean (checked at construction)
            out = self.mean_output(self.ratio_stats, "reconstruction_score")
            return {k: v.squeeze(0) if self.num_components == 1 else v for k, v in out.items()}
        score = _reconstruction_score_compute(self.loss_sums, self.ratio_stats, self.reduction)
        return score.squeeze(0) if self.num_components == 1 else score


# ---------------------------------------------------------------------------------- ChangedTokenRate


@register("reconstruction", "changed_tokens", example=examples.CHANGED_TOKENS)
class ChangedTokenRate(DiagnosticMetric):
    r"""Share of selected tokens whose id a transform changed (e.g. nearest-token decoding of noisy embeddings).

    Per sequence $b$, with mask $m$ (``noise_mask``, all True by default):

    $$
    c_b = \frac{\sum_t m_{bt}\,[x_{bt} \neq \hat{x}_{bt}]}{\sum_t m_{bt}},\qquad
    \text{sequence\_mean} = \operatorname{mean}_{b:\,\sum_t m_{bt} > 0} c_b,\qquad
    \text{token\_rate} = \frac{\sum_{b,t} m_{bt}\,[x_{bt} \neq \hat{x}_{bt}]}{\sum_{b,t} m_{bt}}
    $$

    Sequences without a selected token are left out of ``sequence_mean``. No selected token: NaN.
    Token ids are integers, so no item is ever skipped as non-finite.

    Args:
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options; with ``with_stderr=True`` the
            output also holds ``sequence_mean_stderr`` and ``token_rate_stderr`` (the latter treats
            tokens as independent).

    ``update(input_ids, reconstructed_ids, noise_mask=None)`` takes integer ``[B, T]`` ids and a bool
    (or 0/1) mask that broadcasts to ``[B, T]``, e.g. ``[T]`` (as
    [`NoiseStatistics`][metrics_suite.noise.NoiseStatistics] takes it). ``compute()`` returns
    ``{"sequence_mean", "token_rate"}``.

    Examples:
        >>> import torch
        >>> from metrics_suite import ChangedTokenRate
        >>> metric = ChangedTokenRate()
        >>> ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
        >>> rec = torch.tensor([[1, 2, 3], [1, 2, 6]])
        >>> mask = torch.tensor([[True, False, True], [True, True, True]])
        >>> metric.update(ids, rec, mask)
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'sequence_mean': 0.3333, 'token_rate': 0.4}
    """

    higher_is_better = None

    sequence_stats: Tensor
    token_counts: Tensor

    @validated
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_mean_state("sequence_stats")
        self.add_count_state("token_counts", (2,))

    def update(self, input_ids: Tensor, reconstructed_ids: Tensor, noise_mask: Tensor | None = None) -> None:
        """Add one batch of ``[B, T]`` token ids."""
        if self.validate_args:
            _changed_tokens_check(input_ids, reconstructed_ids, noise_mask)
        changed, selected = _changed_tokens_update(input_ids, reconstructed_ids, noise_mask, validate=False)
        sequence_stats, token_counts = _changed_tokens_stats(changed, selected)
        self.sequence_stats += sequence_stats.to(self.sequence_stats.device)
        self.token_counts += token_counts.to(self.token_counts.device)

    def compute(self) -> MetricOutput:
        """``sequence_mean`` and ``token_rate`` (plus standard errors with ``with_stderr``)."""
        return _changed_tokens_compute(self.sequence_stats, self.token_counts, self.with_stderr)


# ---------------------------------------------------------------------------------- ActivationReconstruction


@register("reconstruction", "activations", example=examples.ACTIVATIONS, needs_config=True)
class ActivationReconstruction(DiagnosticMetric):
    r"""How well a reconstruction (e.g. an SAE's output) reproduces activation vectors ``[..., D]``.

    Over the selected vectors $x_i$ (``mask``, all by default; any leading shape) with
    reconstructions $\hat{x}_i$:

    $$
    \text{mse} = \frac{1}{n}\sum_i \frac{\lVert \hat{x}_i - x_i \rVert^2}{D},\qquad
    \text{normalized\_mse} = \frac{\sum_i \lVert \hat{x}_i - x_i \rVert^2}{\sum_i \lVert x_i \rVert^2},
    $$

    $$
    \text{explained\_variance} = 1 - \frac{\sum_i \lVert \hat{x}_i - x_i \rVert^2}
    {\sum_i \lVert x_i \rVert^2 - \lVert \sum_i x_i \rVert^2 / n},\qquad
    \text{cosine\_similarity} = \operatorname{mean}_i \frac{\langle \hat{x}_i, x_i\rangle}
    {\lVert \hat{x}_i \rVert\,\lVert x_i \rVert}
    $$

    The denominator of ``explained_variance`` is $\sum_i \lVert x_i - \bar{x} \rVert^2$ with
    $\bar{x}$ the mean vector of all selected vectors on all ranks, obtained from float64 sums
    $\sum_i x_i$ ``[D]`` and $\sum_i \lVert x_i \rVert^2$ (all per-vector math is done in
    float64, so activations with a large offset keep their variance). Vectors where
    $\hat{x}_i$ or $x_i$ is zero are left out of ``cosine_similarity`` only. No data,
    or zero target variance for ``explained_variance`` (a variance below 1e-12 of
    $\sum_i \lVert x_i \rVert^2$ is float64 rounding and counts as zero): NaN.

    Norms (SAELens' ``l2_norm_in``, ``l2_norm_out``, ``l2_ratio`` and ``relative_reconstruction_bias``):

    $$
    \text{l2\_norm\_in} = \operatorname{mean}_i \lVert x_i \rVert,\quad
    \text{l2\_norm\_out} = \operatorname{mean}_i \lVert \hat{x}_i \rVert,\quad
    \text{l2\_ratio} = \operatorname{mean}_{i:\,x_i \neq 0} \frac{\lVert \hat{x}_i \rVert}{\lVert x_i \rVert},\quad
    \text{relative\_reconstruction\_bias} = \frac{\sum_i \lVert \hat{x}_i \rVert^2}{\sum_i \langle x_i, \hat{x}_i \rangle}
    $$

    Vectors with $x_i = 0$ are left out of ``l2_ratio`` (not clamped to a tiny norm, which would
    make one zero vector dominate the mean). ``relative_reconstruction_bias`` is Eq. 10 of
    arXiv 2404.16014 over all selected vectors on all ranks (SAELens averages per-batch ratios):
    below 1 a reconstruction shrinks its targets.

    **Several components** (SAEs at several layers, hook points): with ``num_components = C > 1``
    every statistic is kept per component $c$, over that component's selected vectors only
    (its own $n_c$, $\bar{x}_c$ and sums, e.g.
    $\text{explained\_variance}_c = 1 - \sum_i \lVert \hat{x}_{ic} - x_{ic} \rVert^2 /
    \sum_i \lVert x_{ic} - \bar{x}_c \rVert^2$), and each output is a ``[C]`` vector (a
    collection flattens it to ``.../{stat}/component_{c}``). ``update`` takes ``[..., D]`` vectors
    of one component, ``component_idx`` (an int), or ``[..., C, D]`` vectors of every component at
    once (``component_idx=None``, with ``mask`` ``[..., C]``, or ``[...]`` for the same vectors in
    every component). Both give the same sums. A non-finite vector is left out of its own
    component only. With one component (the default) outputs are scalars and the states are
    those of a metric without components.

    Args:
        num_features: the size ``D`` of the last dimension.
        num_components: the number ``C`` of components kept apart.
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options (``with_stderr`` adds
            ``mse_stderr`` and ``cosine_similarity_stderr``).

    Examples:
        >>> import torch
        >>> from metrics_suite import ActivationReconstruction
        >>> metric = ActivationReconstruction(num_features=2)
        >>> target = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
        >>> metric.update(torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]]), target)
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}  # doctest: +NORMALIZE_WHITESPACE
        {'mse': 0.3333, 'normalized_mse': 0.1333, 'explained_variance': 0.7, 'cosine_similarity': 0.9829,
         'l2_norm_in': 2.0787, 'l2_norm_out': 1.4714, 'l2_ratio': 0.7664, 'relative_reconstruction_bias': 0.7}

        Two SAEs: component 0 reconstructs the vectors above, component 1 doubles its targets
        (``mse`` = mean ‖x‖²/2, cosine 1, bias Σ4‖x‖²/Σ2‖x‖² = 2).

        >>> target = torch.tensor([[[1.0, 2.0], [1.0, 0.0]], [[3.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]]])
        >>> rec = torch.stack([torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]]), 2 * target[:, 1]], 1)
        >>> metric = ActivationReconstruction(num_features=2, num_components=2)
        >>> metric.update(rec, target)  # [N=3, C=2, D=2]: both components at once
        >>> out = metric.compute()
        >>> {k: [round(x, 4) for x in out[k].tolist()] for k in ("mse", "cosine_similarity", "relative_reconstruction_bias")}
        {'mse': [0.3333, 0.6667], 'cosine_similarity': [0.9829, 1.0], 'relative_reconstruction_bias': [0.7, 2.0]}
        >>> per_sae = ActivationReconstruction(num_features=2, num_components=2)
        >>> for c in range(2):  # or one component per update: the same sums
        ...     per_sae.update(rec[:, c], target[:, c], component_idx=c)
        >>> torch.allclose(per_sae.compute()["explained_variance"], out["explained_variance"])
        True
    """

    higher_is_better = None

    mse_stats: Tensor
    cosine_stats: Tensor
    norm_sums: Tensor
    target_sum: Tensor
    l2_stats: Tensor
    bias_sums: Tensor
    _activation_states = ("mse_stats", "cosine_stats", "norm_sums", "target_sum", "l2_stats", "bias_sums")

    @validated
    def __init__(self, num_features: Size, num_components: Size = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_features = num_features
        self.num_components = num_components
        # one component keeps the states of a metric without components (checkpoints load unchanged)
        per = () if num_components == 1 else (num_components,)
        self.add_mean_state("mse_stats", per)
        self.add_mean_state("cosine_stats", per)
        self.add_sum_state("norm_sums", (*per, 2))
        self.add_sum_state("target_sum", (*per, num_features))
        self.add_mean_state("l2_stats", (*per, 3))  # ‖x‖, ‖x̂‖, ‖x̂‖/‖x‖
        self.add_sum_state("bias_sums", (*per, 2))  # Σ‖x̂‖², Σ⟨x, x̂⟩

    def update(
        self,
        reconstruction: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        component_idx: Tensor | int | None = None,
    ) -> None:
        """Add one batch of ``[..., num_features]`` vectors of component ``component_idx``, or of
        ``[..., num_components, num_features]`` vectors of every component (``mask`` over the leading shape)."""
        component, components = _component_layout("target", target, self.num_components, component_idx)
        if self.validate_args:
            _activation_check(reconstruction, target, mask, self.num_features, components)
        selected = _component_selection(mask, target.shape[:-1], components, target.device)
        vector_stats = _activation_vector_stats(reconstruction, target)
        finite = torch.isfinite(vector_stats).all(0).reshape(selected.shape)
        keep, skipped = self.nonfinite_filter("reconstruction/target", finite | ~selected)
        sums = _activation_update(reconstruction, target, selected & keep, vector_stats, components)
        self.nonfinite_count += skipped
        _add_per_component(self, self._activation_states, sums, component)

    def compute(self) -> MetricOutput:
        """``mse``, ``normalized_mse``, ``explained_variance``, ``cosine_similarity`` and the four norm
        statistics: scalars for one component, ``[num_components]`` vectors otherwise."""
        out = _activation_compute(*(getattr(self, name) for name in self._activation_states))
        if self.with_stderr:
            out |= self.mean_output(self.mse_stats, "mse") | self.mean_output(
                self.cosine_stats, "cosine_similarity"
            )
        return out


def _add_per_component(
    metric: ActivationReconstruction | FeatureSparsity,
    names: Sequence[str],
    sums: Sequence[Tensor],
    component: int | None,
) -> None:
    """Add per-component sums ``[C_in, ...]`` to the states: of every component (``component`` None,
    ``C_in = num_components``) or of one (``C_in = 1``)."""
    for name, value in zip(names, sums):
        state = getattr(metric, name)
        if metric.num_components == 1:
            state += value[0].to(state.device)
        elif component is None:
            state += value.to(state.device)
        else:
            state[component] += value[0].to(state.device)


# ---------------------------------------------------------------------------------- FeatureSparsity


DeadThreshold = Annotated[float, Field(ge=0.0, le=1.0)]
FiringThreshold = Annotated[StrictFloat, Field(ge=0.0, allow_inf_nan=False)]


@register("reconstruction", "feature_sparsity", example=examples.FEATURE_SPARSITY, needs_config=True)
class FeatureSparsity(DiagnosticMetric):
    r"""Sparsity and dead features of feature activations ``[..., F]`` (e.g. an SAE's latents).

    Over the selected vectors $a_i$ (``mask``, all by default; any leading shape), with the
    firing frequency $\nu_f$ of feature $f$ over all vectors seen on all ranks:

    $$
    \text{l0} = \frac{1}{n}\sum_i \sum_f [\,|a_{if}| > \theta\,],\qquad
    \text{l1} = \frac{1}{n}\sum_i \lVert a_i \rVert_1,\qquad
    \nu_f = \frac{1}{n}\sum_i [\,|a_{if}| > \theta\,],\qquad
    \text{dead\_fraction@}\tau = \frac{\#\{f : \nu_f \le \tau\}}{F}
    $$

    Output keys: ``l0``, ``l1``, one ``dead_fraction@{τ:g}`` per threshold (``dead_fraction@0``,
    ``dead_fraction@1e-06``, ``dead_fraction@1e-05`` by default) and ``density_histogram``, a ``[9]``
    vector of feature counts per firing density: bin 0 holds the features that never fired, bins
    1..8 one decade of $\log_{10}\nu_f$ each, ``[-8, -7)`` ... ``[-1, 0]`` (edges in
    [`density_edges_log10`][metrics_suite.reconstruction.FeatureSparsity.density_edges_log10]; a density below 1e-8 goes to bin 1). A collection flattens it
    to ``.../density_histogram/bin_{i}``.

    States: int64 per-feature firing counts ``[F]`` and a vector count (so a feature firing on only
    one rank is not dead), plus (n, Σ, Σ²) of the per-vector L0 and L1. The histogram is computed
    from the summed firing counts at ``compute()``, so it describes the densities over all data.
    [`firing_frequency`][metrics_suite.reconstruction.FeatureSparsity.firing_frequency] gives $\nu_f$ for plots. No data: NaN.

    **Several components** (SAEs at several layers): with ``num_components = C > 1`` every
    statistic is kept per component $c$, with its own vector count $n_c$ and firing frequencies
    $\nu_{cf} = \frac{1}{n_c}\sum_i [\,|a_{icf}| > \theta\,]$: ``l0``, ``l1`` and the dead
    fractions are ``[C]`` vectors (a collection flattens them to ``.../{stat}/component_{c}``),
    ``density_histogram`` is ``[C, 9]`` (``.../density_histogram/component_{c}/bin_{i}``) and
    ``firing_frequency()`` ``[C, F]``. ``update`` takes ``[..., F]`` activations of one component,
    ``component_idx`` (an int), or ``[..., C, F]`` activations of every component at once
    (``component_idx=None``, with ``mask`` ``[..., C]``, or ``[...]`` for the same vectors in every
    component). With one component (the default) the outputs and states are those of a metric
    without components.

    Args:
        num_features: the number of features ``F``.
        dead_thresholds: firing frequencies in ``[0, 1]`` at or below which a feature counts as dead.
        firing_threshold: $\theta$: a feature fires where $|a| > \theta$ (``l0``, densities, dead
            features; ``l1`` sums all activations). 0 (default) counts every non-zero activation,
            signed ones included, as SAELens does.
        num_components: the number ``C`` of components kept apart.
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options (``with_stderr`` adds
            ``l0_stderr`` and ``l1_stderr``).

    Examples:
        >>> import torch
        >>> from metrics_suite import FeatureSparsity
        >>> metric = FeatureSparsity(num_features=3, dead_thresholds=(0.0, 0.3))
        >>> metric.update(torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]]))
        >>> metric.update(torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.5, 0.0]]))
        >>> out = metric.compute()
        >>> {k: round(v.item(), 4) for k, v in out.items() if k != "density_histogram"}
        {'l0': 1.25, 'l1': 1.875, 'dead_fraction@0': 0.3333, 'dead_fraction@0.3': 0.6667}
        >>> metric.firing_frequency().tolist()
        [0.25, 1.0, 0.0]
        >>> out["density_histogram"].tolist()
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]

        Two SAEs of three features, two vectors each (``[N=2, C=2, F=3]``):

        >>> metric = FeatureSparsity(num_features=3, dead_thresholds=(0.0,), num_components=2)
        >>> metric.update(torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, -1.0, 0.0], [0.0, 0.0, 4.0]]]))
        >>> out = metric.compute()
        >>> {k: [round(x, 4) for x in v.tolist()] for k, v in out.items() if k != "density_histogram"}
        {'l0': [1.5, 0.5], 'l1': [2.0, 2.0], 'dead_fraction@0': [0.3333, 0.6667]}
        >>> out["density_histogram"][:, [0, 8]].tolist()  # never fired, and densities in [0.1, 1]
        [[1.0, 2.0], [2.0, 1.0]]
    """

    higher_is_better = None
    last_dim_labels: ClassVar[Mapping[str, str]] = {"density_histogram": "bin"}
    #: log10 firing-density edges of histogram bins 1..8.
    density_edges_log10: tuple[float, ...] = DENSITY_EDGES_LOG10

    firing_counts: Tensor
    vector_count: Tensor
    l0_stats: Tensor
    l1_stats: Tensor
    _sparsity_states = ("firing_counts", "vector_count", "l0_stats", "l1_stats")

    @validated
    def __init__(
        self,
        num_features: Size,
        dead_thresholds: tuple[DeadThreshold, ...] = (0.0, 1e-6, 1e-5),
        firing_threshold: FiringThreshold = 0.0,
        num_components: Size = 1,
        **kwargs: Any,
    ) -> None:
        keys = [dead_fraction_key(t) for t in dead_thresholds]
        if len(set(keys)) != len(keys):
            raise ValueError(f"`dead_thresholds` must give distinct keys, got {keys}")
        super().__init__(**kwargs)
        self.num_features = num_features
        self.dead_thresholds = tuple(dead_thresholds)
        self.firing_threshold = float(firing_threshold)
        self.num_components = num_components
        # one component keeps the states of a metric without components (checkpoints load unchanged)
        per = () if num_components == 1 else (num_components,)
        self.add_count_state("firing_counts", (*per, num_features))
        self.add_count_state("vector_count", per)
        self.add_mean_state("l0_stats", per)
        self.add_mean_state("l1_stats", per)

    def update(
        self,
        feature_activations: Tensor,
        mask: Tensor | None = None,
        component_idx: Tensor | int | None = None,
    ) -> None:
        """Add one batch of ``[..., num_features]`` activations of component ``component_idx``, or of
        ``[..., num_components, num_features]`` activations of every component (``mask`` over the leading shape)."""
        component, components = _component_layout(
            "feature_activations", feature_activations, self.num_components, component_idx
        )
        if self.validate_args:
            _feature_sparsity_check(feature_activations, mask, self.num_features, components)
        selected = _component_selection(
            mask, feature_activations.shape[:-1], components, feature_activations.device
        )
        l1 = _feature_l1(feature_activations)
        finite = torch.isfinite(feature_activations).all(-1)
        keep, skipped = self.nonfinite_filter("feature_activations", finite | ~selected)
        sums = _feature_sparsity_update(
            feature_activations, selected & keep, l1, self.firing_threshold, components
        )
        self.nonfinite_count += skipped
        _add_per_component(self, self._sparsity_states, sums, component)

    def compute(self) -> MetricOutput:
        """``l0``, ``l1``, ``dead_fraction@{thr}`` per threshold and ``density_histogram`` ``[9]``: per
        component, as ``[num_components]`` vectors and a ``[num_components, 9]`` histogram for several."""
        out = _feature_sparsity_compute(
            self.firing_counts, self.vector_count, self.l0_stats, self.l1_stats, self.dead_thresholds
        )
        if self.with_stderr:
            out |= self.mean_output(self.l0_stats, "l0") | self.mean_output(self.l1_stats, "l1")
        return out

    def firing_frequency(self) -> Tensor:
        """Per-feature firing frequency ``[F]`` (``[num_components, F]`` for several components; float64)
        over all vectors seen, NaN before any data.

        Under DDP this sums the states over ranks like ``compute()``: call it on every rank.
        """
        sync = self._to_sync and not self._is_synced
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            process_group=self.process_group,
            should_sync=sync,
            should_unsync=sync,
            distributed_available=self.distributed_available_fn,
        ):
            return _firing_frequency(self.firing_counts, self.vector_count)


# ---------------------------------------------------------------------------------- DownstreamReconstruction


@register("reconstruction", "downstream", example=examples.DOWNSTREAM)
class DownstreamReconstruction(DiagnosticMetric):
    r"""How much of the model's next-token behaviour survives splicing in a reconstruction (e.g. an SAE).

    Takes logits ``[B, T, V]`` of the clean model, of the model with the reconstruction spliced in,
    and of the model with the spliced activations zero-ablated. Per attended token $t$, with $p_t$,
    $q^{spl}_t$, $q^{abl}_t$ their softmax distributions and the natural log:

    $$
    \text{kl\_spliced} = \frac{1}{|S|}\sum_{t \in S} \mathrm{KL}(p_t \,\|\, q^{spl}_t),\qquad
    \text{kl\_score} = \frac{\sum_{t \in S} \mathrm{KL}(p_t \| q^{abl}_t) - \sum_{t \in S} \mathrm{KL}(p_t \| q^{spl}_t)}
    {\sum_{t \in S} \mathrm{KL}(p_t \| q^{abl}_t)},
    $$

    $$
    \text{ce\_score} = \frac{\sum_{t \in S'} \mathrm{CE}^{abl}_t - \sum_{t \in S'} \mathrm{CE}^{spl}_t}
    {\sum_{t \in S'} \mathrm{CE}^{abl}_t - \sum_{t \in S'} \mathrm{CE}^{clean}_t},
    $$

    over the attended tokens $S$ of all updates on all ranks ($S'$: those whose target is not
    ``ignore_index``), with ``kl_ablated``, ``ce_clean``, ``ce_spliced``, ``ce_ablated`` the token
    means like ``kl_spliced`` and ``top1_agreement`` the share of tokens whose spliced argmax equals
    the clean argmax. These are SAELens' ``kl_div_score`` and ``ce_loss_score``, but as ratios of
    global sums: SAELens averages per-batch values, so batches with few tokens or a small gap weigh
    as much as large ones. ``ce_score`` equals [`ReconstructionScore`][metrics_suite.reconstruction.ReconstructionScore] fed the per-token
    cross-entropies of the three models. With ``num_logits=k`` each KL is taken on the union of the
    top-k sets of its two logit rows, both renormalised on it (as in
    [`NextTokenDivergence`][metrics_suite.utility.NextTokenDivergence]); cross-entropy and argmax use the full
    vocabulary.

    The three inputs are read one chunk of attended positions at a time (log space, at least
    float32): the extra memory is ``O(chunk × V)``, never a ``[B, T, V]`` intermediate. An item is a
    token: with ``nan_strategy="skip"`` a position where any of the three logit rows holds NaN or
    +inf, or is all −inf, is left out (of every output) and counted in ``nonfinite_count``; the other
    tokens of its sequence still count. No token: NaN; the ``ce_*`` values are NaN until an update
    with ``target_ids``.

    Args:
        num_logits: size of the top-k sets of the KL support, or None for the full vocabulary.
        max_batch_size: chunk limit, as in [`NextTokenDivergence`][metrics_suite.utility.NextTokenDivergence].
        max_sequence_length: chunk limit, as in [`NextTokenDivergence`][metrics_suite.utility.NextTokenDivergence].
        ignore_index: target id whose positions are left out of the cross-entropies, or None.
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options (``with_stderr`` adds
            ``kl_spliced_stderr``, ``kl_ablated_stderr`` and the ``ce_*_stderr`` of the three
            token means).

    ``update(clean_logits, spliced_logits, ablated_logits, target_ids=None, attention_mask=None)``:
    logits ``[B, T, V]``, integer targets ``[B, T]`` (``target_ids[b, t]`` is the token that
    ``logits[b, t]`` predicts), bool mask ``[B, T]``.

    Examples:
        Two batches, the first perfectly reconstructed (score 1), the second no better than ablation
        (score 0): the scores are ratios of sums over both, not the mean 0.5 of per-batch scores.

        >>> import torch
        >>> from metrics_suite import DownstreamReconstruction
        >>> metric = DownstreamReconstruction()
        >>> clean, ablated = torch.tensor([[[3.0, 0.0, 0.0]]]), torch.zeros(1, 1, 3)
        >>> metric.update(clean, clean, ablated, target_ids=torch.tensor([[0]]))
        >>> clean = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
        >>> metric.update(clean, torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), target_ids=torch.tensor([[1, 0]]))
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}  # doctest: +NORMALIZE_WHITESPACE
        {'kl_spliced': 0.0822, 'kl_ablated': 0.3262, 'kl_score': 0.748, 'top1_agreement': 0.6667,
         'ce_clean': 0.3993, 'ce_spliced': 0.764, 'ce_ablated': 1.0986, 'ce_score': 0.4784}

        ``kl_score`` is 0.732 / (0.732 + 2 × 0.1233): the first batch's one token carries most of
        the KL gap.
    """

    higher_is_better = None
    fingerprint_exclude = DiagnosticMetric.fingerprint_exclude | {"max_batch_size", "max_sequence_length"}

    kl_stats: Tensor
    top1_count: Tensor
    ce_stats: Tensor

    @validated
    def __init__(
        self,
        num_logits: Size | None = None,
        max_batch_size: Size | None = None,
        max_sequence_length: Size | None = None,
        ignore_index: StrictInt | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_logits = num_logits
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.ignore_index = ignore_index
        # (n, Σx, Σx²) per token of KL_spliced, KL_ablated, and of CE clean/spliced/ablated
        self.add_mean_state("kl_stats", (2,))
        self.add_count_state("top1_count")
        self.add_mean_state("ce_stats", (3,))

    def update(
        self,
        clean_logits: Tensor,
        spliced_logits: Tensor,
        ablated_logits: Tensor,
        target_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> None:
        """Add one batch of the three models' logits ``[B, T, V]`` (and ``[B, T]`` targets and mask)."""
        values, finite, counted = _downstream_update(
            clean_logits,
            spliced_logits,
            ablated_logits,
            target_ids,
            attention_mask,
            num_logits=self.num_logits,
            ignore_index=self.ignore_index,
            max_batch_size=self.max_batch_size,
            max_sequence_length=self.max_sequence_length,
            validate=self.validate_args,
        )
        keep, skipped = self.nonfinite_filter("clean_logits`/`spliced_logits`/`ablated_logits", finite)
        sums = _downstream_stats(values, counted, keep)
        self.nonfinite_count += skipped.to(self.nonfinite_count.device)
        for name, value in zip(("kl_stats", "top1_count", "ce_stats"), sums):
            state = getattr(self, name)
            state += value.to(state.device)

    def compute(self) -> MetricOutput:
        """The eight outputs (plus the ``*_stderr`` of the token means with ``with_stderr=True``)."""
        out = _downstream_compute(self.kl_stats, self.top1_count, self.ce_stats)
        if self.with_stderr:
            for name, stats in zip(("kl_spliced", "kl_ablated"), self.kl_stats):
                out |= self.mean_output(stats, name)
            for name, stats in zip(("ce_clean", "ce_spliced", "ce_ablated"), self.ce_stats):
                out |= self.mean_output(stats, name)
        return out
