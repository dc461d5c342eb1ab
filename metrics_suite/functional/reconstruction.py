"""Functional forms of the reconstruction suite."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from metrics_suite.base import safe_div
from metrics_suite.validation import check_float, check_integer, check_ndim, check_same_shape, shape_str

ScoreReduction = Literal["ratio_of_sums", "itemwise_mean"]
__all__ = ["reconstruction_score"]

_LOSS_NAMES = (
    "source_model_loss",
    "source_model_loss_with_reconstruction",
    "source_model_loss_with_zero_ablation",
)


def _reconstruction_score_check(
    source_model_loss: Tensor,
    source_model_loss_with_reconstruction: Tensor,
    source_model_loss_with_zero_ablation: Tensor,
    num_components: int,
    component_idx: Tensor | int | None,
) -> None:
    """Raise ``TypeError``/``ValueError`` for losses that do not fit ``num_components``."""
    losses = (source_model_loss, source_model_loss_with_reconstruction, source_model_loss_with_zero_ablation)
    for name, loss in zip(_LOSS_NAMES, losses):
        check_float(name, loss)
        check_ndim(name, loss, (1, 2))
        check_same_shape(name, loss, _LOSS_NAMES[0], losses[0])
    if losses[0].ndim == 2 and losses[0].shape[1] != num_components:
        raise ValueError(
            f"`source_model_loss` must have shape [N, {num_components}] (num_components={num_components}), "
            f"got {shape_str(losses[0].shape)}"
        )
    if losses[0].ndim == 2 and component_idx is not None:
        raise ValueError("`component_idx` is only for [N] losses; [N, C] losses already hold every component")
    if losses[0].ndim == 1:
        _component_index(component_idx, losses[0].shape[0], num_components, True, losses[0].device)


def _reconstruction_score_update(
    source_model_loss: Tensor,
    source_model_loss_with_reconstruction: Tensor,
    source_model_loss_with_zero_ablation: Tensor,
    num_components: int = 1,
    component_idx: Tensor | int | None = None,
    validate: bool = True,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-component sums of one batch (items where ``keep`` is False are left out).

    Returns:
        ``loss_sums`` ``[C, 3]``: Σl, Σl_recon, Σl_zero; and ``ratio_stats`` ``[C, 3]``:
        (n, Σr, Σr²) of the item-wise ratios r_i = (l_zero,i − l_recon,i)/(l_zero,i − l_i)
        over items with l_zero,i ≠ l_i.
    """
    losses = (source_model_loss, source_model_loss_with_reconstruction, source_model_loss_with_zero_ablation)
    if validate:
        _reconstruction_score_check(*losses, num_components=num_components, component_idx=component_idx)
    l, l_rec, l_zero = (x.to(torch.float64) for x in losses)
    n_items = l.shape[0]
    if l.ndim == 1:
        idx = _component_index(component_idx, n_items, num_components, validate, l.device)
        one_hot = torch.nn.functional.one_hot(idx, num_components).to(torch.float64)  # [N, C]
        l, l_rec, l_zero = (x[:, None] * one_hot for x in (l, l_rec, l_zero))
        member = one_hot.bool()
    else:
        member = torch.ones_like(l, dtype=torch.bool)
    if keep is not None:
        member = member & keep[:, None]
        l, l_rec, l_zero = (torch.where(member, x, 0.0) for x in (l, l_rec, l_zero))
    loss_sums = torch.stack([l.sum(0), l_rec.sum(0), l_zero.sum(0)], dim=-1)
    den = l_zero - l
    valid = member & (den != 0)
    ratio = torch.where(valid, (l_zero - l_rec) / torch.where(valid, den, torch.ones_like(den)), 0.0)
    ratio_stats = torch.stack([valid.sum(0).to(torch.float64), ratio.sum(0), (ratio * ratio).sum(0)], dim=-1)
    return loss_sums, ratio_stats


def _component_index(
    component_idx: Tensor | int | None,
    n_items: int,
    num_components: int,
    validate: bool,
    device: torch.device,
) -> Tensor:
    if component_idx is None:
        if validate and num_components != 1:
            raise ValueError(
                f"[N] losses with num_components={num_components} need `component_idx` (an int or an [N] tensor)"
            )
        return torch.zeros(n_items, dtype=torch.long, device=device)
    if isinstance(component_idx, int) and not isinstance(component_idx, bool):
        idx = torch.full((n_items,), component_idx, dtype=torch.long, device=device)
    elif isinstance(component_idx, Tensor):
        check_integer("component_idx", component_idx)
        idx = (
            component_idx.to(device=device, dtype=torch.long).expand(n_items)
            if component_idx.ndim == 0
            else (component_idx.to(device=device, dtype=torch.long))
        )
        if idx.shape != (n_items,):
            raise ValueError(
                f"`component_idx` must have shape [{n_items}], got {shape_str(component_idx.shape)}"
            )
    else:
        raise TypeError(
            f"`component_idx` must be an int or an integer tensor, got {type(component_idx).__name__}"
        )
    if validate and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_components):
        raise ValueError(
            f"`component_idx` values must be in [0, {num_components}), got {idx.unique().tolist()}"
        )
    return idx


def _reconstruction_score_compute(
    loss_sums: Tensor, ratio_stats: Tensor, reduction: ScoreReduction = "ratio_of_sums"
) -> Tensor:
    """Score per component from the sums of :func:`_reconstruction_score_update`."""
    if reduction == "ratio_of_sums":
        s, s_rec, s_zero = loss_sums.unbind(-1)
        return safe_div(s_zero - s_rec, s_zero - s)
    return safe_div(ratio_stats[..., 1], ratio_stats[..., 0])


def reconstruction_score(
    source_model_loss: Tensor,
    source_model_loss_with_reconstruction: Tensor,
    source_model_loss_with_zero_ablation: Tensor,
    reduction: ScoreReduction = "ratio_of_sums",
) -> Tensor:
    r"""Share of the loss gap closed by a reconstruction, per component.

    .. math::
        \text{ratio\_of\_sums} = \frac{\sum_i l^{zero}_i - \sum_i l^{rec}_i}{\sum_i l^{zero}_i - \sum_i l_i},
        \qquad
        \text{itemwise\_mean} = \frac{1}{N}\sum_i \frac{l^{zero}_i - l^{rec}_i}{l^{zero}_i - l_i}

    1 means the reconstruction recovers the clean loss, 0 means it is as bad as zero-ablation.
    Items with ``l_zero == l`` are left out of ``itemwise_mean`` (their ratio is undefined).

    Args:
        source_model_loss: clean losses ``[N]`` or ``[N, C]``.
        source_model_loss_with_reconstruction: losses with the reconstruction spliced in.
        source_model_loss_with_zero_ablation: losses with the component zero-ablated.
        reduction: ``"ratio_of_sums"`` or ``"itemwise_mean"``.

    Returns:
        A scalar for ``[N]`` inputs, ``[C]`` for ``[N, C]``.

    Example:
        >>> import torch
        >>> l = torch.full((3,), 2.0)
        >>> reconstruction_score(l, l + 1, l + 3)
        tensor(0.6667, dtype=torch.float64)
        >>> reconstruction_score(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.5]), torch.tensor([5.0, 3.0]),
        ...                      reduction="itemwise_mean")
        tensor(0.6250, dtype=torch.float64)
    """
    components = source_model_loss.shape[1] if source_model_loss.ndim == 2 else 1
    loss_sums, ratio_stats = _reconstruction_score_update(
        source_model_loss,
        source_model_loss_with_reconstruction,
        source_model_loss_with_zero_ablation,
        num_components=components,
    )
    score = _reconstruction_score_compute(loss_sums, ratio_stats, reduction)
    return score[0] if source_model_loss.ndim == 1 else score
