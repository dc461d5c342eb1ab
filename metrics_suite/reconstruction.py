"""Reconstruction suite: how much of the model a transform or a spliced-in reconstruction keeps."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import PositiveInt, validate_call
from torch import Tensor

from metrics_suite.base import DiagnosticMetric, MetricOutput
from metrics_suite.conformance import ConformanceExample
from metrics_suite.functional.reconstruction import (
    ScoreReduction,
    _reconstruction_score_check,
    _reconstruction_score_compute,
    _reconstruction_score_update,
)
from metrics_suite.registry import register

__all__ = ["ReconstructionScore"]


def _score_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    clean = torch.rand(n, 2, generator=g) + 1.0
    zero = clean + 1.0 + torch.rand(n, 2, generator=g)
    recon = clean + (zero - clean) * torch.rand(n, 2, generator=g)
    return {
        "source_model_loss": clean,
        "source_model_loss_with_reconstruction": recon,
        "source_model_loss_with_zero_ablation": zero,
    }


def _score_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _score_batch(g, 4)
    return [
        {**good, "source_model_loss_with_reconstruction": good["source_model_loss"][:3]},  # N mismatch
        {**good, "source_model_loss": good["source_model_loss"][:, :1]},  # C mismatch
        {**good, "source_model_loss_with_zero_ablation": good["source_model_loss"].long()},  # dtype
        {k: v[:, 0] for k, v in good.items()},  # [N] without component_idx
    ]


@register(
    "reconstruction",
    "reconstruction_score",
    example=ConformanceExample(
        make_batch=_score_batch, bad_inputs=_score_bad, init_kwargs={"num_components": 2}
    ),
)
class ReconstructionScore(DiagnosticMetric):
    r"""Share of the loss gap between zero-ablation and the clean model that a reconstruction closes.

    Per component, with clean loss :math:`l`, loss with the reconstruction spliced in
    :math:`l^{rec}` and loss with the component zero-ablated :math:`l^{zero}`:

    .. math::
        \text{ratio\_of\_sums} = \frac{\sum_i l^{zero}_i - \sum_i l^{rec}_i}{\sum_i l^{zero}_i - \sum_i l_i},
        \qquad
        \text{itemwise\_mean} = \operatorname{mean}_i \frac{l^{zero}_i - l^{rec}_i}{l^{zero}_i - l_i}.

    Items with :math:`l^{zero}_i = l_i` are left out of ``itemwise_mean``. No data gives NaN.

    Args:
        num_components: number of components (e.g. SAEs at different layers) scored at once.
        reduction: ``"ratio_of_sums"`` (default) or ``"itemwise_mean"``.
        kwargs: :class:`~metrics_suite.base.DiagnosticMetric` options (``validate_args``,
            ``with_stderr`` — standard error of the item-wise mean — and torchmetrics' own).

    ``update(source_model_loss, source_model_loss_with_reconstruction,
    source_model_loss_with_zero_ablation, component_idx=None)`` takes losses ``[N]`` or
    ``[N, num_components]``; with ``[N]`` losses and several components, ``component_idx`` (an int
    or an ``[N]`` tensor) says which component each item belongs to.

    ``compute()`` returns a scalar when ``num_components == 1``, else ``[num_components]``.

    Example:
        >>> import torch
        >>> from metrics_suite import ReconstructionScore
        >>> metric = ReconstructionScore()
        >>> loss = torch.tensor([2.0, 2.0, 2.0])
        >>> metric.update(loss, loss + 1, loss + 3)
        >>> metric.compute()
        tensor(0.6667, dtype=torch.float64)
    """

    higher_is_better = True
    vector_label = "component"

    loss_sums: Tensor
    ratio_stats: Tensor

    @validate_call
    def __init__(
        self, num_components: PositiveInt = 1, reduction: ScoreReduction = "ratio_of_sums", **kwargs: Any
    ) -> None:
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
        finite = torch.stack([torch.isfinite(x).reshape(x.shape[0], -1).all(1) for x in losses]).all(0)
        keep, skipped = self.nonfinite_filter("source_model_loss*", finite)
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
        score = _reconstruction_score_compute(self.loss_sums, self.ratio_stats, self.reduction)
        if self.with_stderr and self.reduction == "itemwise_mean":
            out = self.mean_output(self.ratio_stats, "reconstruction_score")
            return {k: v.squeeze(0) if self.num_components == 1 else v for k, v in out.items()}
        return score.squeeze(0) if self.num_components == 1 else score
