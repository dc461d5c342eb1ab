"""Functional forms of the reconstruction suite."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from metrics_suite.functional._chunks import CHUNK_ELEMENTS, row_slices, rows_per_chunk
from metrics_suite.functional._masks import attended_positions, counted_targets, position_mask
from metrics_suite.functional._rows import RowGather
from metrics_suite.functional._stats import mean_output, mean_stats, safe_div
from metrics_suite.functional.utility import _top_k_mask, chunk_rows
from metrics_suite.validation import (
    check_broadcast_mask,
    check_float,
    check_ids_in_range,
    check_integer,
    check_mask,
    check_ndim,
    check_same_shape,
    check_tensor,
    compute_dtype,
    shape_str,
)

ScoreReduction = Literal["ratio_of_sums", "itemwise_mean"]
__all__ = [
    "activation_reconstruction",
    "changed_token_rate",
    "downstream_reconstruction",
    "feature_sparsity",
    "percentage_changed_ids",
    "reconstruction_score",
]

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
    """Per-component sums of one batch.

    Args:
        keep: bool ``[N]`` or ``[N, C]`` (for ``[N, C]`` losses): False leaves out an item, or one
            (item, component) pair, e.g. a non-finite loss of one component only.

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
        member = torch.nn.functional.one_hot(idx, num_components).bool()  # [N, C]
        l, l_rec, l_zero = (x[:, None].expand(-1, num_components) for x in (l, l_rec, l_zero))
    else:
        member = torch.ones_like(l, dtype=torch.bool)
    if keep is not None:
        member = member & (keep if keep.ndim == 2 else keep[:, None]).to(member.device)
    # where, not a product: a NaN loss must not leak into the other components
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
    if isinstance(component_idx, numbers.Integral) and not isinstance(component_idx, bool):
        # numpy ints too, as ``layer`` accepts them
        idx = torch.full((n_items,), int(component_idx), dtype=torch.long, device=device)
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
    if validate and idx.numel() and bool(((idx < 0) | (idx >= num_components)).any()):  # one read-back
        raise ValueError(
            f"`component_idx` values must be in [0, {num_components}), got {idx.unique().tolist()}"
        )
    return idx


def _one_component(component_idx: Tensor | int, num_components: int) -> int:
    """The component that ``[..., D]`` inputs belong to: ``component_idx`` (an int, a numpy int or a
    0-d integer tensor) checked exactly as `ReconstructionScore` checks it."""
    if isinstance(component_idx, Tensor) and component_idx.ndim != 0:
        raise ValueError(
            "`component_idx` must be one index (an int) for [..., D] inputs, got a tensor of shape "
            f"{shape_str(component_idx.shape)}; pass [..., C, D] inputs to update every component at once"
        )
    device = component_idx.device if isinstance(component_idx, Tensor) else torch.device("cpu")
    return int(_component_index(component_idx, 1, num_components, True, device)[0])


def _component_layout(
    name: str, x: Tensor, num_components: int, component_idx: Tensor | int | None
) -> tuple[int | None, int]:
    """Which components ``x`` holds: ``(component, C_in)``.

    ``component_idx`` given (or one component): ``[..., D]`` vectors of that one component
    (``C_in = 1``, ``component`` its index). Otherwise ``[..., C, D]`` with every component along
    dim -2 (``component`` None, ``C_in = C``). Checked even with ``validate_args=False``: costs no
    read-back, and a wrong layout would silently mix components.
    """
    if component_idx is not None:
        return _one_component(component_idx, num_components), 1
    if num_components == 1:
        return 0, 1
    check_tensor(name, x)
    if x.ndim < 2 or x.shape[-2] != num_components:
        raise ValueError(
            f"`{name}` must have shape [..., {num_components}, D] (num_components={num_components}, every "
            f"component along dim -2), or pass `component_idx` with [..., D] inputs; got {shape_str(x.shape)}"
        )
    return None, num_components


def _component_selection(
    mask: Tensor | None, shape: torch.Size, components: int, device: torch.device
) -> Tensor:
    """The selected vectors (bool, of exactly ``shape``) of inputs with leading shape ``shape``
    (``[..., C]`` when ``components > 1``); a mask without the component dim selects the same
    vectors in each component."""
    if mask is not None and components > 1 and mask.ndim == len(shape) - 1:  # [...] for [..., C] (checked)
        mask = mask[..., None]
    return position_mask(mask, shape, device)


def _check_component_mask(name: str, mask: object, shape: torch.Size, components: int) -> None:
    """``mask`` over the leading shape ``shape``; for ``[..., C]`` vectors also ``[...]`` (every component)."""
    mask_shape = tuple(getattr(mask, "shape", ()))
    if components > 1 and mask_shape not in (tuple(shape), tuple(shape[:-1])):
        raise ValueError(
            f"`{name}` must have shape {shape_str(shape)} (one per vector) or {shape_str(shape[:-1])} (the "
            f"same for every component), got {shape_str(mask_shape)}"
        )
    check_mask(name, mask, mask_shape if components > 1 else shape)


def _reconstruction_score_compute(
    loss_sums: Tensor, ratio_stats: Tensor, reduction: ScoreReduction = "ratio_of_sums"
) -> Tensor:
    """Score per component from the sums of `_reconstruction_score_update`."""
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

    $$
    \text{ratio\_of\_sums} = \frac{\sum_i l^{zero}_i - \sum_i l^{rec}_i}{\sum_i l^{zero}_i - \sum_i l_i},
    \qquad
    \text{itemwise\_mean} = \frac{1}{N}\sum_i \frac{l^{zero}_i - l^{rec}_i}{l^{zero}_i - l_i}
    $$

    1 means the reconstruction recovers the clean loss, 0 means it is as bad as zero-ablation.
    Items with ``l_zero == l`` are left out of ``itemwise_mean`` (their ratio is undefined).

    Args:
        source_model_loss: clean losses ``[N]`` or ``[N, C]``.
        source_model_loss_with_reconstruction: losses with the reconstruction spliced in.
        source_model_loss_with_zero_ablation: losses with the component zero-ablated.
        reduction: ``"ratio_of_sums"`` or ``"itemwise_mean"``.

    Returns:
        A scalar for ``[N]`` inputs, ``[C]`` for ``[N, C]``.

    Examples:
        >>> import torch
        >>> l, l_rec, l_zero = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.5]), torch.tensor([5.0, 3.0])
        >>> reconstruction_score(l, l_rec, l_zero)  # (8 - 4.5) / (8 - 3)
        tensor(0.7000, dtype=torch.float64)
        >>> reconstruction_score(l, l_rec, l_zero, reduction="itemwise_mean")  # (3/4 + 1/2) / 2
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


# ---------------------------------------------------------------------------------- shared helpers
def _check_vectors(name: str, x: Tensor, size: int | None) -> None:
    """Require a floating-point ``[..., size]`` tensor (any last size when ``size`` is None)."""
    check_float(name, x)
    if size is None and x.ndim == 0:
        raise ValueError(f"`{name}` must have shape [..., D], got a 0-d tensor")
    if size is not None and (x.ndim == 0 or x.shape[-1] != size):
        raise ValueError(
            f"`{name}` must have shape [..., {size}] (num_features={size}), got {shape_str(x.shape)}"
        )


# ---------------------------------------------------------------------------------- changed tokens
def _changed_tokens_check(input_ids: Tensor, reconstructed_ids: Tensor, noise_mask: Tensor | None) -> None:
    """Raise ``TypeError``/``ValueError`` unless the ids are two equal ``[B, T]`` integer tensors.

    ``noise_mask`` must broadcast to ``[B, T]`` (``[T]``, ``[B, 1]``, ...), as in the noise suite.
    """
    check_integer("input_ids", input_ids)
    check_ndim("input_ids", input_ids, 2)
    check_integer("reconstructed_ids", reconstructed_ids)
    check_same_shape("reconstructed_ids", reconstructed_ids, "input_ids", input_ids)
    if noise_mask is not None:
        check_broadcast_mask("noise_mask", noise_mask, input_ids.shape, "shape of `input_ids`")


def _changed_tokens_update(
    input_ids: Tensor, reconstructed_ids: Tensor, noise_mask: Tensor | None = None, validate: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-sequence counts of one batch.

    Returns:
        ``changed`` ``[B]`` and ``selected`` ``[B]`` (int64): Σ_t m·[x ≠ x̂] and Σ_t m.
    """
    if validate:
        _changed_tokens_check(input_ids, reconstructed_ids, noise_mask)
    m = position_mask(noise_mask, input_ids.shape, input_ids.device)
    changed = (m & (input_ids != reconstructed_ids.to(input_ids.device))).sum(-1)
    return changed, m.sum(-1)


def _changed_tokens_stats(changed: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
    """Sum statistics of one batch from per-sequence counts.

    Returns:
        ``sequence_stats`` ``[3]``: (n, Σc_b, Σc_b²) over sequences with at least one selected
        token; ``token_counts`` ``[2]`` int64: (Σ changed, Σ selected).
    """
    has_tokens = selected > 0
    rate = torch.where(has_tokens, changed.to(torch.float64) / selected.clamp_min(1), 0.0)
    sequence_stats = mean_stats(rate, has_tokens)
    token_counts = torch.stack([changed.sum(), selected.sum()]).to(torch.int64)
    return sequence_stats, token_counts


def _token_rate_stats(token_counts: Tensor) -> Tensor:
    """(n, Σx, Σx²) of the 0/1 "changed" indicator over selected tokens (x² = x)."""
    changed, selected = token_counts.to(torch.float64).unbind(-1)
    return torch.stack([selected, changed, changed], dim=-1)


def percentage_changed_ids(
    input_ids: Tensor, reconstructed_ids: Tensor, noise_mask: Tensor | None = None
) -> Tensor:
    r"""Fraction of selected tokens per sequence whose id the reconstruction changed.

    $$
    c_b = \frac{\sum_t m_{bt}\,[x_{bt} \neq \hat{x}_{bt}]}{\sum_t m_{bt}}
    $$

    Args:
        input_ids: original token ids ``[B, T]``.
        reconstructed_ids: ids after the transform (e.g. nearest-token decoding) ``[B, T]``.
        noise_mask: bool ``[B, T]`` (or broadcastable to it, e.g. ``[T]`` or ``[B, 1]``), True for
            the tokens to compare (default: all).

    Returns:
        ``[B]`` float64 fractions; NaN for a sequence without selected tokens.

    Examples:
        >>> import torch
        >>> ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
        >>> rec = torch.tensor([[1, 2, 3], [1, 2, 6]])
        >>> mask = torch.tensor([[True, False, True], [True, True, True]])
        >>> percentage_changed_ids(ids, rec, mask)
        tensor([0.0000, 0.6667], dtype=torch.float64)
    """
    changed, selected = _changed_tokens_update(input_ids, reconstructed_ids, noise_mask)
    return safe_div(changed.to(torch.float64), selected.to(torch.float64))


def changed_token_rate(
    input_ids: Tensor, reconstructed_ids: Tensor, noise_mask: Tensor | None = None
) -> dict[str, Tensor]:
    r"""Share of changed token ids, per sequence then averaged, and over all tokens.

    $$
    \text{sequence\_mean} = \operatorname{mean}_{b:\,\sum_t m_{bt} > 0} c_b,
    \qquad
    \text{token\_rate} = \frac{\sum_{b,t} m_{bt}\,[x_{bt} \neq \hat{x}_{bt}]}{\sum_{b,t} m_{bt}}
    $$

    with $c_b$ from [`percentage_changed_ids`][metrics_suite.functional.reconstruction.percentage_changed_ids]. Sequences without selected tokens are
    left out of ``sequence_mean``; no selected token at all gives NaN.

    Examples:
        >>> import torch
        >>> ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
        >>> rec = torch.tensor([[1, 2, 3], [1, 2, 6]])
        >>> mask = torch.tensor([[True, False, True], [True, True, True]])
        >>> {k: round(v.item(), 4) for k, v in changed_token_rate(ids, rec, mask).items()}
        {'sequence_mean': 0.3333, 'token_rate': 0.4}
    """
    sequence_stats, token_counts = _changed_tokens_stats(
        *_changed_tokens_update(input_ids, reconstructed_ids, noise_mask)
    )
    return _changed_tokens_compute(sequence_stats, token_counts)


def _changed_tokens_compute(
    sequence_stats: Tensor, token_counts: Tensor, with_stderr: bool = False
) -> dict[str, Tensor]:
    """``sequence_mean`` and ``token_rate`` (each followed by its ``_stderr`` with ``with_stderr``)."""
    return {
        **mean_output(sequence_stats, "sequence_mean", with_stderr),
        **mean_output(_token_rate_stats(token_counts), "token_rate", with_stderr),
    }


# ---------------------------------------------------------------------------------- activations
def _activation_check(
    reconstruction: Tensor, target: Tensor, mask: Tensor | None, num_features: int | None, components: int = 1
) -> None:
    """Raise ``TypeError``/``ValueError`` unless both inputs are ``[..., D]`` and ``mask`` is ``[...]``
    (for ``components > 1``: ``[..., C, D]`` inputs, ``mask`` ``[..., C]`` or ``[...]``)."""
    _check_vectors("target", target, num_features)
    check_float("reconstruction", reconstruction)
    check_same_shape("reconstruction", reconstruction, "target", target)
    if mask is not None:
        _check_component_mask("mask", mask, target.shape[:-1], components)


def _activation_vector_stats(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Per-vector ``[4, N]`` float64 (‖x̂ − x‖², ‖x‖², ‖x̂‖², ⟨x̂, x⟩) of ``[..., D]`` inputs (``N`` vectors).

    Computed in float64: with a large offset (activations around 1000 with unit spread) float32
    squares would lose the variance that ``explained_variance`` needs. The dot product is summed
    directly: recovering it from the three norms (polarisation) cancels catastrophically when
    ‖x̂‖ ≪ ‖x‖. A vector holding NaN/inf gets non-finite entries (float64 products of
    float32-range values never overflow), so this doubles as the finiteness check.
    """
    d = target.shape[-1]
    x_all = target.detach().reshape(-1, d)
    x_hat_all = reconstruction.detach().reshape(-1, d).to(x_all.device)
    parts = [x_all.new_zeros((4, 0), dtype=torch.float64)]
    for rows in row_slices(x_all.shape[0], rows_per_chunk(d, CHUNK_ELEMENTS)):
        x = x_all[rows].to(torch.float64)
        x_hat = x_hat_all[rows].to(torch.float64)
        norms = [torch.linalg.vector_norm(v, dim=-1).square() for v in (x_hat - x, x, x_hat)]
        parts.append(torch.stack([*norms, torch.linalg.vecdot(x_hat, x)]))
    return torch.cat(parts, dim=1)


def _activation_update(
    reconstruction: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    vector_stats: Tensor | None = None,
    components: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sum statistics per component of one batch (only vectors where ``mask`` is True).

    Args:
        reconstruction, target: ``[..., D]`` (one component), or ``[..., C, D]`` with
            ``components = C`` along dim -2.
        mask: bool over the leading shape (``[..., C]``, or ``[...]`` for every component; all True
            when ``None``).
        vector_stats: `_activation_vector_stats` of the inputs, if already computed.
        components: the number ``C`` of components along dim -2 (1: plain ``[..., D]`` inputs).

    Returns:
        Per component (leading dim ``[C]``): ``mse_stats`` ``[C, 3]`` and ``cosine_stats`` ``[C, 3]``
        (n, Σv, Σv²) of the per-vector mean squared error and cosine (the cosine only where both
        norms are non-zero); ``norm_sums`` ``[C, 2]``: (Σ‖x̂ − x‖², Σ‖x‖²); ``target_sum``
        ``[C, D]``: Σx; ``l2_stats`` ``[C, 3, 3]``: (n, Σv, Σv²) of ‖x‖, ‖x̂‖ and ‖x̂‖/‖x‖ (the ratio
        where ‖x‖ > 0); ``bias_sums`` ``[C, 2]``: (Σ‖x̂‖², Σ⟨x, x̂⟩). Rows are processed in chunks,
        so the float64 copies never exceed a few `CHUNK_ELEMENTS`.
    """
    d = target.shape[-1]
    if vector_stats is None:
        vector_stats = _activation_vector_stats(reconstruction, target)
    selected = _component_selection(mask, target.shape[:-1], components, vector_stats.device)
    selected = selected.reshape(-1, components)
    # torch.where, not a product: masked-out vectors may hold NaN
    sq_err, sq_norm, sq_norm_hat, dot = torch.where(selected, vector_stats.view(4, -1, components), 0.0)
    cos_den = sq_norm.sqrt() * sq_norm_hat.sqrt()
    has_cos = selected & (cos_den != 0)
    cosine = torch.where(has_cos, dot / torch.where(has_cos, cos_den, 1.0), 0.0)
    x_all = target.detach().reshape(-1, components, d)
    target_sum = torch.zeros(components, d, dtype=torch.float64, device=x_all.device)
    for rows in row_slices(x_all.shape[0], rows_per_chunk(components * d, CHUNK_ELEMENTS)):
        target_sum += x_all[rows].to(torch.float64).masked_fill_(~selected[rows, :, None], 0.0).sum(0)
    norm_sums = torch.stack([sq_err.sum(0), sq_norm.sum(0)], dim=-1)
    norm_in, norm_out = sq_norm.sqrt(), sq_norm_hat.sqrt()
    # a zero target vector has no ratio: left out, not clamped into a huge value
    has_norm = selected & (sq_norm > 0)
    ratio = torch.where(has_norm, norm_out / torch.where(has_norm, norm_in, 1.0), 0.0)
    l2_stats = mean_stats(
        torch.stack([norm_in, norm_out, ratio], dim=-1), torch.stack([selected, selected, has_norm], dim=-1)
    )
    bias_sums = torch.stack([sq_norm_hat.sum(0), dot.sum(0)], dim=-1)
    return (
        mean_stats(sq_err / d, selected),
        mean_stats(cosine, has_cos),
        norm_sums,
        target_sum,
        l2_stats,
        bias_sums,
    )


#: Relative resolution below which Σ‖x − x̄‖² counts as zero (float64 eps is 2.2e-16).
_VARIANCE_RESOLUTION = 1e-12


def _activation_compute(
    mse_stats: Tensor,
    cosine_stats: Tensor,
    norm_sums: Tensor,
    target_sum: Tensor,
    l2_stats: Tensor,
    bias_sums: Tensor,
) -> dict[str, Tensor]:
    """The eight statistics from the sums of `_activation_update`, per component.

    Works on states with or without the leading component dim: each output has the leading shape of
    ``norm_sums[..., 0]`` (a scalar for one component stored without it).
    """
    n = mse_stats[..., 0]
    sq_err, sq_norm = norm_sums.unbind(-1)
    # Σ‖x − x̄‖² = Σ‖x‖² − ‖Σx‖²/n. A variance below float64 resolution of Σ‖x‖² is rounding
    # noise of a zero variance: make it exactly 0 (-> NaN) rather than a huge negative score
    total_variance = sq_norm - safe_div(target_sum.square().sum(-1), n)
    total_variance = torch.where(total_variance > _VARIANCE_RESOLUTION * sq_norm, total_variance, 0.0)
    return {
        "mse": safe_div(mse_stats[..., 1], n),
        "normalized_mse": safe_div(sq_err, sq_norm),
        "explained_variance": 1.0 - safe_div(sq_err, total_variance),
        "cosine_similarity": safe_div(cosine_stats[..., 1], cosine_stats[..., 0]),
        "l2_norm_in": safe_div(l2_stats[..., 0, 1], l2_stats[..., 0, 0]),
        "l2_norm_out": safe_div(l2_stats[..., 1, 1], l2_stats[..., 1, 0]),
        "l2_ratio": safe_div(l2_stats[..., 2, 1], l2_stats[..., 2, 0]),
        "relative_reconstruction_bias": safe_div(bias_sums[..., 0], bias_sums[..., 1]),
    }


def activation_reconstruction(
    reconstruction: Tensor, target: Tensor, mask: Tensor | None = None
) -> dict[str, Tensor]:
    r"""How well ``reconstruction`` reproduces ``target``, over the selected ``[..., D]`` vectors.

    $$
    \text{mse} = \frac{1}{n}\sum_i \frac{\lVert \hat{x}_i - x_i \rVert^2}{D},\quad
    \text{normalized\_mse} = \frac{\sum_i \lVert \hat{x}_i - x_i \rVert^2}{\sum_i \lVert x_i \rVert^2},
    $$

    $$
    \text{explained\_variance} = 1 - \frac{\sum_i \lVert \hat{x}_i - x_i \rVert^2}
    {\sum_i \lVert x_i - \bar{x} \rVert^2},\quad
    \text{cosine\_similarity} = \frac{1}{n'}\sum_i \frac{\langle \hat{x}_i, x_i\rangle}
    {\lVert \hat{x}_i \rVert\,\lVert x_i \rVert}
    $$

    with $\bar{x}$ the mean vector of the selected targets, and the cosine averaged over
    the $n'$ vectors where both norms are non-zero. Also ``l2_norm_in`` (mean $\lVert x_i \rVert$),
    ``l2_norm_out`` (mean $\lVert \hat{x}_i \rVert$), ``l2_ratio`` (mean of
    $\lVert \hat{x}_i \rVert / \lVert x_i \rVert$ over vectors with $x_i \neq 0$) and
    ``relative_reconstruction_bias`` $= \sum_i \lVert \hat{x}_i \rVert^2 / \sum_i \langle x_i, \hat{x}_i \rangle$.

    Args:
        reconstruction: ``[..., D]`` (e.g. SAE output).
        target: ``[..., D]`` (the activations it reconstructs).
        mask: bool over the leading shape ``[...]``, True for vectors to include (default: all).

    Returns:
        dict of float64 scalars ``mse``, ``normalized_mse``, ``explained_variance``,
        ``cosine_similarity``, ``l2_norm_in``, ``l2_norm_out``, ``l2_ratio``,
        ``relative_reconstruction_bias`` (NaN where undefined, e.g. no vectors).

    Examples:
        >>> import torch
        >>> target = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
        >>> rec = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
        >>> {k: round(v.item(), 4) for k, v in activation_reconstruction(rec, target).items()}  # doctest: +NORMALIZE_WHITESPACE
        {'mse': 0.3333, 'normalized_mse': 0.1333, 'explained_variance': 0.7, 'cosine_similarity': 0.9829,
         'l2_norm_in': 2.0787, 'l2_norm_out': 1.4714, 'l2_ratio': 0.7664, 'relative_reconstruction_bias': 0.7}
    """
    _activation_check(reconstruction, target, mask, None)
    sums = _activation_update(reconstruction, target, mask)
    return _activation_compute(*(x[0] for x in sums))


# ---------------------------------------------------------------------------------- feature sparsity
#: log10 firing-density bin edges of the density histogram: one bin per decade from 1e-8 to 1.
DENSITY_EDGES_LOG10: tuple[float, ...] = tuple(float(e) for e in range(-8, 1))


def _feature_sparsity_check(
    feature_activations: Tensor, mask: Tensor | None, num_features: int | None, components: int = 1
) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``feature_activations`` is ``[..., F]`` and ``mask`` ``[...]``
    (for ``components > 1``: ``[..., C, F]`` activations, ``mask`` ``[..., C]`` or ``[...]``)."""
    _check_vectors("feature_activations", feature_activations, num_features)
    if mask is not None:
        _check_component_mask("mask", mask, feature_activations.shape[:-1], components)


def _feature_l1(feature_activations: Tensor) -> Tensor:
    """Per-vector L1 norm ``[N]`` of ``[..., F]`` activations, in float64.

    float64 throughout (in chunks, so the copies stay small): a float32 sum of finite values near
    3e38 would overflow to inf. Finiteness is judged on the activations themselves, not on this norm.
    """
    f = feature_activations.shape[-1]
    a_all = feature_activations.detach().reshape(-1, f)
    parts = [a_all.new_zeros(0, dtype=torch.float64)]
    for rows in row_slices(a_all.shape[0], rows_per_chunk(f, CHUNK_ELEMENTS)):
        parts.append(torch.linalg.vector_norm(a_all[rows], ord=1, dim=-1, dtype=torch.float64))
    return torch.cat(parts)


def _feature_sparsity_update(
    feature_activations: Tensor,
    mask: Tensor | None = None,
    l1: Tensor | None = None,
    firing_threshold: float = 0.0,
    components: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sum statistics per component of one batch of feature activations (vectors where ``mask``).

    Args:
        feature_activations: ``[..., F]`` (one component), or ``[..., C, F]`` with ``components = C``
            along dim -2.
        mask: bool over the leading shape (``[..., C]``, or ``[...]`` for every component; all True
            when ``None``).
        l1: `_feature_l1` of the activations, if already computed.
        firing_threshold: a feature fires where ``|a| > firing_threshold`` (``a != 0`` for 0).
        components: the number ``C`` of components along dim -2 (1: plain ``[..., F]`` inputs).

    Returns:
        Per component (leading dim ``[C]``): ``firing_counts`` ``[C, F]`` int64 (vectors where each
        feature fires), ``vector_count`` ``[C]`` int64, and ``l0_stats``, ``l1_stats`` ``[C, 3]``
        (n, Σv, Σv²) of the per-vector firing count and L1 norm.
    """
    f = feature_activations.shape[-1]
    a_all = feature_activations.detach().reshape(-1, components, f)
    if l1 is None:
        l1 = _feature_l1(feature_activations)
    selected = _component_selection(mask, feature_activations.shape[:-1], components, a_all.device)
    selected = selected.reshape(-1, components)
    dtype = compute_dtype(a_all)
    weights = selected.to(dtype)
    firing_counts = torch.zeros(components, f, dtype=torch.float64, device=a_all.device)
    l0_parts = [a_all.new_zeros((0, components), dtype=dtype)]
    for rows in row_slices(a_all.shape[0], rows_per_chunk(components * f, CHUNK_ELEMENTS)):
        # 0/1 in float: row sums and the weighted column sums are exact integers, as a chunk holds
        # far fewer than 2**24 rows and features
        a = a_all[rows]
        fires = (a != 0 if firing_threshold == 0.0 else a.abs() > firing_threshold).to(dtype)
        l0_parts.append(fires.sum(-1))
        firing_counts += torch.einsum("nc,ncf->cf", weights[rows], fires).to(torch.float64)
    # where, not a product: masked-out or skipped vectors may hold NaN
    l0 = torch.where(selected, torch.cat(l0_parts).to(torch.float64), 0.0)
    l1 = torch.where(selected, l1.view(-1, components), 0.0)
    vector_count = selected.sum(0, dtype=torch.int64)
    return (
        firing_counts.round().to(torch.int64),
        vector_count,
        mean_stats(l0, selected),
        mean_stats(l1, selected),
    )


def _density_histogram(
    firing_counts: Tensor, vector_count: Tensor, edges: Sequence[float] = DENSITY_EDGES_LOG10
) -> Tensor:
    """Number of features per firing-density bin: ``[..., 1 + B]`` = ``[never fired, bin 1, ..., bin B]``.

    ``firing_counts`` ``[..., F]`` and ``vector_count`` ``[...]`` (any leading shape, e.g. per component).
    Bin ``k >= 1`` holds densities with log10 in ``[edges[k-1], edges[k])`` (the last bin also holds
    density 1, densities below ``10**edges[0]`` go to bin 1), as ``numpy.histogram`` bins them.
    NaN where no vector was seen.
    """
    num_bins = len(edges) - 1
    n = vector_count.to(torch.float64)[..., None]
    fired = firing_counts > 0
    log_density = torch.log10(firing_counts.to(torch.float64).clamp_min(1) / n.clamp_min(1))
    edge_t = torch.tensor(edges, dtype=torch.float64, device=firing_counts.device)
    bin_idx = (torch.searchsorted(edge_t, log_density, right=True) - 1).clamp(0, num_bins - 1) + 1
    bin_idx = torch.where(fired, bin_idx, 0)
    counts = torch.zeros((*bin_idx.shape[:-1], num_bins + 1), dtype=torch.float64, device=bin_idx.device)
    counts.scatter_add_(-1, bin_idx, torch.ones_like(bin_idx, dtype=torch.float64))
    return torch.where(n > 0, counts, float("nan"))


def dead_fraction_key(threshold: float) -> str:
    """Output key of the dead fraction at ``threshold``, e.g. ``"dead_fraction@1e-06"``."""
    return f"dead_fraction@{threshold:g}"


def _firing_frequency(firing_counts: Tensor, vector_count: Tensor) -> Tensor:
    """Per-feature firing frequency ``[..., F]`` (float64) from the summed counts, NaN where no vector was seen."""
    return safe_div(firing_counts, vector_count.to(torch.float64)[..., None])


def _feature_sparsity_compute(
    firing_counts: Tensor,
    vector_count: Tensor,
    l0_stats: Tensor,
    l1_stats: Tensor,
    dead_thresholds: Sequence[float],
) -> dict[str, Tensor]:
    """``l0``, ``l1``, ``dead_fraction@{thr}`` and ``density_histogram`` from the summed states.

    Works on states with or without the leading component dim: ``l0``, ``l1`` and the dead fractions
    have the shape of ``vector_count``, ``density_histogram`` one more dim of 9 bins.
    """
    n = vector_count.to(torch.float64)
    frequency = _firing_frequency(firing_counts, vector_count)
    out = {
        "l0": safe_div(l0_stats[..., 1], l0_stats[..., 0]),
        "l1": safe_div(l1_stats[..., 1], l1_stats[..., 0]),
    }
    for threshold in dead_thresholds:
        dead = (frequency <= threshold).to(torch.float64).mean(-1)
        out[dead_fraction_key(threshold)] = torch.where(n > 0, dead, float("nan"))
    out["density_histogram"] = _density_histogram(firing_counts, vector_count)
    return out


def feature_sparsity(
    feature_activations: Tensor,
    mask: Tensor | None = None,
    dead_thresholds: Sequence[float] = (0.0, 1e-6, 1e-5),
    firing_threshold: float = 0.0,
) -> dict[str, Tensor]:
    r"""Sparsity of feature activations ``[..., F]`` over the selected vectors.

    $$
    \text{l0} = \frac{1}{n}\sum_i \lVert a_i \rVert_0,\quad
    \text{l1} = \frac{1}{n}\sum_i \lVert a_i \rVert_1,\quad
    \text{dead\_fraction@}\tau = \frac{1}{F}\,\#\{f : \nu_f \le \tau\},\quad
    \nu_f = \frac{1}{n}\sum_i [|a_{if}| > \theta]
    $$

    ``density_histogram`` ``[9]`` counts features per firing density $\nu_f$: bin 0 holds
    features that never fired, bins 1..8 one decade of $\log_{10}\nu_f$ each, from
    $[-8, -7)$ to $[-1, 0]$ (densities below 1e-8 go to bin 1).

    Args:
        feature_activations: ``[..., F]`` (e.g. SAE feature activations).
        mask: bool over the leading shape ``[...]``, True for vectors to include (default: all).
        dead_thresholds: firing frequencies at or below which a feature counts as dead.
        firing_threshold: a feature fires where ``|a| > firing_threshold``; 0 (default) counts every
            non-zero activation, signed ones included.

    Examples:
        >>> import torch
        >>> acts = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.5, 0.0]])
        >>> out = feature_sparsity(acts, dead_thresholds=(0.0, 0.3))
        >>> {k: round(v.item(), 4) for k, v in out.items() if k != "density_histogram"}
        {'l0': 1.25, 'l1': 1.875, 'dead_fraction@0': 0.3333, 'dead_fraction@0.3': 0.6667}
        >>> out["density_histogram"].tolist()
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]
    """
    _feature_sparsity_check(feature_activations, mask, None)
    sums = _feature_sparsity_update(feature_activations, mask, firing_threshold=firing_threshold)
    firing_counts, vector_count, l0_stats, l1_stats = (x[0] for x in sums)
    return _feature_sparsity_compute(firing_counts, vector_count, l0_stats, l1_stats, dead_thresholds)


# ---------------------------------------------------------------------------------- downstream reconstruction
_DOWNSTREAM_LOGITS = ("clean_logits", "spliced_logits", "ablated_logits")
#: Columns of the per-token values of `_downstream_rows`.
DOWNSTREAM_COLUMNS = ("kl_spliced", "kl_ablated", "top1_agreement", "ce_clean", "ce_spliced", "ce_ablated")


def _downstream_check(
    clean_logits: Tensor,
    spliced_logits: Tensor,
    ablated_logits: Tensor,
    target_ids: Tensor | None,
    attention_mask: Tensor | None,
    ignore_index: int | None,
) -> None:
    """Raise ``TypeError``/``ValueError`` unless three equal ``[B, T, V]`` logits, ``[B, T]`` targets and mask."""
    logits = (clean_logits, spliced_logits, ablated_logits)
    for name, x in zip(_DOWNSTREAM_LOGITS, logits):
        check_float(name, x)
        check_ndim(name, x, 3)
        check_same_shape(name, x, "clean_logits", clean_logits)
    batch, seq, vocab = clean_logits.shape
    if vocab == 0:
        raise ValueError(f"`clean_logits` must be [B, T, V] with V >= 1, got {shape_str(clean_logits.shape)}")
    if attention_mask is not None:
        check_mask("attention_mask", attention_mask, (batch, seq))
    if target_ids is not None:
        check_integer("target_ids", target_ids)
        if tuple(target_ids.shape) != (batch, seq):
            raise ValueError(
                f"`target_ids` must have shape {shape_str((batch, seq))} (the [B, T] of `clean_logits` "
                f"{shape_str(clean_logits.shape)}), got {shape_str(target_ids.shape)}"
            )
        counted = counted_targets(target_ids, attention_mask, ignore_index)
        check_ids_in_range(
            "target_ids",
            target_ids,
            vocab,
            "token ids",
            "the vocabulary of the logits) at counted positions",
            selected=counted,
        )


def _kl_rows(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row KL(p‖q) ``[n]`` from ``p`` and both log-probabilities ``[n, W]``; ``log_q`` is used as scratch.

    An entry with p = 0 contributes 0 (its ``0·(−inf)`` and ``0·NaN`` products are the only NaN
    of a finite row, so ``nansum`` drops exactly those); p > 0 with q = 0 gives +inf.
    """
    return torch.sub(log_p, log_q, out=log_q).mul_(p).nansum(-1)


def _downstream_rows(
    logits: tuple[Tensor, Tensor, Tensor],
    positions: Tensor,
    targets: Tensor | None,
    num_logits: int | None,
    rows: int,
) -> tuple[Tensor, Tensor]:
    """Per-token values ``[n, 6]`` (columns `DOWNSTREAM_COLUMNS`, float64) and finiteness ``[n]``.

    ``positions`` are flat indices into the ``[B, T]`` grid; ``targets`` ``[n]`` (or None: the
    cross-entropy columns are 0). Reads ``rows`` positions of each input at a time into reused
    ``[rows, V]`` buffers (or, for consecutive positions of a CPU input, as views of it: the inputs
    are only read): the extra memory is seven such buffers, whatever ``B`` and ``T``.
    """
    clean_logits = logits[0]
    vocab = clean_logits.shape[-1]
    dtype = functools.reduce(torch.promote_types, (compute_dtype(x) for x in logits))
    device = clean_logits.device
    n_rows = positions.numel()
    values = torch.zeros(n_rows, len(DOWNSTREAM_COLUMNS), dtype=torch.float64, device=device)
    finite = torch.ones(n_rows, dtype=torch.bool, device=device)
    if n_rows == 0:
        return values, finite
    rows = min(rows, n_rows)
    top_k = num_logits if num_logits is not None and num_logits < vocab else None
    gathers = [RowGather(x.to(device), dtype, rows) for x in logits]
    raw = [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in logits]
    log_p, p, log_q = (torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(3))
    support = [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(2)] if top_k else []
    for part in row_slices(n_rows, rows):
        chunk = positions[part]
        n = chunk.numel()
        xs = [gather.read(chunk, buffer[:n]) for gather, buffer in zip(gathers, raw)]  # read only
        out = values[part]
        # one pass gives each row's maximum (NaN, +inf or -inf exactly for a row that is not a
        # distribution, as in the utility suite) and, for clean and spliced, its argmax
        (clean_max, clean_arg), (spliced_max, spliced_arg) = xs[0].max(-1), xs[1].max(-1)
        finite[part] = (
            torch.isfinite(clean_max) & torch.isfinite(spliced_max) & torch.isfinite(xs[2].amax(-1))
        )
        out[:, 2] = clean_arg == spliced_arg
        lp = torch.log_softmax(xs[0], -1, out=log_p[:n])
        t = targets[part, None] if targets is not None else None
        if t is not None:
            out[:, 3] = lp.gather(-1, t).squeeze(-1).neg()
        if top_k is None:
            # each model's log-probabilities serve its cross-entropy and its KL: one log_softmax each
            pr = torch.exp(lp, out=p[:n])
            for column, x in ((0, xs[1]), (1, xs[2])):
                lq = torch.log_softmax(x, -1, out=log_q[:n])
                if t is not None:
                    out[:, column + 4] = lq.gather(-1, t).squeeze(-1).neg()
                out[:, column] = _kl_rows(pr, lp, lq)
            continue
        if t is not None:
            for column, x in ((4, xs[1]), (5, xs[2])):
                out[:, column] = torch.log_softmax(x, -1, out=log_q[:n]).gather(-1, t).squeeze(-1).neg()
        clean_mask = _top_k_mask(xs[0], top_k)
        for column, x in ((0, xs[1]), (1, xs[2])):
            # both distributions renormalised on the union of the two top-k sets, as NextTokenDivergence
            outside = ~(clean_mask | _top_k_mask(x, top_k))
            c = support[0][:n].copy_(xs[0]).masked_fill_(outside, -math.inf)
            o = support[1][:n].copy_(x).masked_fill_(outside, -math.inf)
            lp_k = torch.log_softmax(c, -1, out=log_p[:n])
            out[:, column] = _kl_rows(
                torch.exp(lp_k, out=p[:n]), lp_k, torch.log_softmax(o, -1, out=log_q[:n])
            )
    return values, finite


def _downstream_update(
    clean_logits: Tensor,
    spliced_logits: Tensor,
    ablated_logits: Tensor,
    target_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    num_logits: int | None = None,
    ignore_index: int | None = None,
    max_batch_size: int | None = None,
    max_sequence_length: int | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token values of one batch at its attended positions.

    Returns:
        ``values`` ``[n, 6]`` float64 (`DOWNSTREAM_COLUMNS`), ``finite`` ``[n]`` (all three
        logit rows define a distribution) and ``counted`` ``[n]`` (the cross-entropy counts: targets
        given, not ``ignore_index``).
    """
    if validate:
        _downstream_check(
            clean_logits, spliced_logits, ablated_logits, target_ids, attention_mask, ignore_index
        )
    batch, seq, vocab = clean_logits.shape
    device = clean_logits.device
    positions = attended_positions(attention_mask, (batch, seq), device)
    logits = (clean_logits, spliced_logits, ablated_logits)
    dtype = functools.reduce(torch.promote_types, (compute_dtype(x) for x in logits))
    rows = chunk_rows(vocab, dtype, batch, seq, max_batch_size, max_sequence_length)
    if target_ids is None:
        targets, counted = None, torch.zeros(positions.numel(), dtype=torch.bool, device=device)
    else:
        flat_targets = target_ids.to(device).reshape(-1)[positions]
        counted = counted_targets(flat_targets, None, ignore_index)
        # ignored positions gather a valid index; their value is never counted
        targets = torch.where(counted, flat_targets, 0).to(torch.long)
    values, finite = _downstream_rows(logits, positions, targets, num_logits, rows)
    return values, finite, counted


def _downstream_stats(values: Tensor, counted: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sum statistics of the kept tokens.

    Returns:
        ``kl_stats`` ``[2, 3]`` (n, Σ, Σ²) of KL_spliced and KL_ablated, ``top1_count`` (int64: tokens
        whose argmax agree) and ``ce_stats`` ``[3, 3]`` of the three cross-entropies over counted tokens.
    """
    # where, not a weight: a skipped token's values may be NaN
    kl = torch.where(keep[:, None], values[:, :3], 0.0)
    ce_kept = keep & counted
    ce = torch.where(ce_kept[:, None], values[:, 3:], 0.0)
    kl_stats = mean_stats(kl[:, :2], keep[:, None].expand(-1, 2))
    top1_count = kl[:, 2].nan_to_num(0.0).sum().round().to(torch.int64)
    ce_stats = mean_stats(ce, ce_kept[:, None].expand(-1, 3))
    return kl_stats, top1_count, ce_stats


def _downstream_compute(kl_stats: Tensor, top1_count: Tensor, ce_stats: Tensor) -> dict[str, Tensor]:
    """The eight outputs from the summed statistics (ratios of global sums, NaN where undefined)."""
    n_tokens, kl_sums = kl_stats[0, 0], kl_stats[:, 1]
    ce_sums = ce_stats[:, 1]
    return {
        "kl_spliced": safe_div(kl_sums[0], n_tokens),
        "kl_ablated": safe_div(kl_sums[1], n_tokens),
        "kl_score": safe_div(kl_sums[1] - kl_sums[0], kl_sums[1]),
        "top1_agreement": safe_div(top1_count, n_tokens),
        "ce_clean": safe_div(ce_sums[0], ce_stats[0, 0]),
        "ce_spliced": safe_div(ce_sums[1], ce_stats[1, 0]),
        "ce_ablated": safe_div(ce_sums[2], ce_stats[2, 0]),
        "ce_score": safe_div(ce_sums[2] - ce_sums[1], ce_sums[2] - ce_sums[0]),
    }


def downstream_reconstruction(
    clean_logits: Tensor,
    spliced_logits: Tensor,
    ablated_logits: Tensor,
    target_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    num_logits: int | None = None,
    ignore_index: int | None = None,
) -> dict[str, Tensor]:
    r"""How much of the model's next-token behaviour a spliced-in reconstruction keeps.

    Per attended token $t$, with $p$, $q^{spl}$, $q^{abl}$ the softmax of the clean, spliced
    and ablated logits and natural logs, and over the attended tokens $S$ (for cross-entropy
    those whose target is not ``ignore_index``):

    $$
    \text{kl\_score} = \frac{\sum_{t \in S} \mathrm{KL}(p_t\|q^{abl}_t) - \sum_{t \in S} \mathrm{KL}(p_t\|q^{spl}_t)}
    {\sum_{t \in S} \mathrm{KL}(p_t\|q^{abl}_t)},\qquad
    \text{ce\_score} = \frac{\sum_t \mathrm{CE}^{abl}_t - \sum_t \mathrm{CE}^{spl}_t}{\sum_t \mathrm{CE}^{abl}_t - \sum_t \mathrm{CE}_t}
    $$

    plus the token means ``kl_spliced``, ``kl_ablated``, ``ce_clean``, ``ce_spliced``, ``ce_ablated``
    and ``top1_agreement`` (share of tokens whose spliced argmax is the clean one). Without
    ``target_ids`` the ``ce_*`` values are NaN. With ``num_logits=k`` each KL is taken on the union of
    the top-k sets of its two logit rows, both renormalised on it (cross-entropy and argmax always use
    the full vocabulary). Read in chunks of positions: extra memory ``O(chunk × V)``.

    Examples:
        >>> import torch
        >>> clean = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        >>> spliced = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])
        >>> ablated = torch.zeros(1, 2, 3)
        >>> out = downstream_reconstruction(clean, spliced, ablated, target_ids=torch.tensor([[0, 1]]))
        >>> {k: round(v.item(), 4) for k, v in out.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'kl_spliced': 0.0987, 'kl_ablated': 0.2782, 'kl_score': 0.645, 'top1_agreement': 1.0,
         'ce_clean': 0.3955, 'ce_spliced': 0.7067, 'ce_ablated': 1.0986, 'ce_score': 0.5574}
    """
    values, finite, counted = _downstream_update(
        clean_logits, spliced_logits, ablated_logits, target_ids, attention_mask, num_logits, ignore_index
    )
    # a non-finite token makes the results NaN (the metric class can skip it instead)
    values = torch.where(finite[:, None], values, math.nan)
    keep = torch.ones_like(finite)
    return _downstream_compute(*_downstream_stats(values, counted, keep))
