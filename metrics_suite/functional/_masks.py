"""Position masks of the functional modules: which positions (tokens, vectors, items) an update counts.

Every suite takes an optional mask over the leading (position) shape of its inputs: ``None`` counts
every position, a bool tensor (or an integer tensor of 0/1) counts the True (1) positions. These
helpers turn such a mask into what the math needs. They trust their input: the ``_check`` function
of each metric validates the mask first (``check_mask`` for an exact shape, ``check_broadcast_mask``
for a broadcast one) and names the argument in its error message.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def position_mask(mask: Tensor | None, shape: torch.Size | tuple[int, ...], device: torch.device) -> Tensor:
    """A validated mask as a bool tensor of exactly ``shape`` on ``device``.

    A mask may broadcast to ``shape`` (``[T]`` or ``[B, 1]`` for ``[B, T]``), so callers can combine it
    element by element with per-position values; the expansion is a view, no copy.

    Args:
        mask: bool or 0/1 integer tensor that broadcasts to ``shape``, or ``None`` (every position).
        shape: the position shape, e.g. ``[B, T]``.
        device: where the result lives (the inputs' device; the mask may come from elsewhere).

    Returns:
        Bool tensor of ``shape``: True where the position counts.

    Examples:
        >>> import torch
        >>> position_mask(torch.tensor([[1], [0]]), (2, 3), torch.device("cpu"))
        tensor([[ True,  True,  True],
                [False, False, False]])
        >>> position_mask(None, (2,), torch.device("cpu"))
        tensor([True, True])
    """
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    selected = mask if mask.dtype == torch.bool else mask != 0
    return selected.to(device).expand(shape)


def attended_positions(
    mask: Tensor | None, shape: torch.Size | tuple[int, ...], device: torch.device
) -> Tensor:
    """Flat row-major indices of the positions a validated mask counts.

    The chunked passes gather only these rows of a ``[*shape, V]`` tensor (viewed as ``[N, V]``), so
    masked positions cost nothing. Without a mask the indices are an ``arange``; with one, their number
    depends on the data, so ``nonzero`` reads it back from the device (one host sync).

    Args:
        mask: bool or 0/1 integer tensor that broadcasts to ``shape``, or ``None`` (every position).
        shape: the position shape, e.g. ``[B, T]``.
        device: where the indices live.

    Returns:
        Int64 tensor ``[n]`` of the ``n`` counted positions, ascending.

    Examples:
        >>> import torch
        >>> attended_positions(torch.tensor([[True, False], [False, True]]), (2, 2), torch.device("cpu"))
        tensor([0, 3])
        >>> attended_positions(None, (2, 2), torch.device("cpu"))
        tensor([0, 1, 2, 3])
    """
    if mask is None:
        return torch.arange(math.prod(shape), device=device)
    return position_mask(mask, shape, device).reshape(-1).nonzero().squeeze(-1)


def counted_targets(target_ids: Tensor, attention_mask: Tensor | None, ignore_index: int | None) -> Tensor:
    """Bool mask of the targets a cross-entropy counts: attended and not ``ignore_index``.

    Shared by the utility suite's cross-entropy and the reconstruction suite's downstream
    cross-entropies, so both count the same tokens (and check ids only there).

    Args:
        target_ids: integer targets of any shape (``[B, T]``, or the gathered ``[n]``).
        attention_mask: validated bool or 0/1 mask that broadcasts to ``target_ids``, or ``None``.
        ignore_index: a target id that does not count, or ``None``.

    Returns:
        Bool tensor of the shape of ``target_ids``, on its device.

    Examples:
        >>> import torch
        >>> counted_targets(torch.tensor([[5, -100, 7]]), torch.tensor([[1, 1, 0]]), -100)
        tensor([[ True, False, False]])
    """
    attended = position_mask(attention_mask, target_ids.shape, target_ids.device)
    return attended if ignore_index is None else attended & (target_ids != ignore_index)
