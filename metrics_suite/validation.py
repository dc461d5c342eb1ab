"""Input checks shared by every metric.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape or values) with a message that names the argument, what was expected and what was
received. Metrics run all checks before touching any state, so a rejected update leaves the
state exactly as it was.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def shape_str(shape: Sequence[int | None] | torch.Size) -> str:
    """Render a shape as ``[2, 3, *]`` (``*`` for any size)."""
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_tensor(name: str, value: object) -> Tensor:
    """Require a tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, value: object) -> Tensor:
    """Require a floating-point tensor (float16, bfloat16, float32 or float64)."""
    x = check_tensor(name, value)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_integer(name: str, value: object) -> Tensor:
    """Require an integer tensor (class ids, token ids)."""
    x = check_tensor(name, value)
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"`{name}` must be an integer tensor, got dtype {x.dtype}")
    return x


def check_ndim(name: str, x: Tensor, ndims: int | Sequence[int]) -> None:
    """Require ``x.ndim`` to be one of ``ndims``."""
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if x.ndim not in allowed:
        want = " or ".join(f"{n}-d" for n in allowed)
        raise ValueError(f"`{name}` must be {want}, got shape {shape_str(x.shape)}")


def check_shape(name: str, x: Tensor, expected: Sequence[int | None]) -> None:
    """Require ``x.shape`` to match ``expected`` (``None`` matches any size)."""
    ok = x.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        raise ValueError(f"`{name}` must have shape {shape_str(expected)}, got {shape_str(x.shape)}")


def check_same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    """Require ``x`` to have the same shape as ``ref``."""
    if x.shape != ref.shape:
        raise ValueError(
            f"`{name}` must have the same shape as `{ref_name}` {shape_str(ref.shape)}, got {shape_str(x.shape)}"
        )


def _as_bool_mask(name: str, mask: object) -> Tensor:
    """``mask`` as a bool tensor; integer masks (signed or unsigned, any width) must hold only 0 and 1."""
    m = check_tensor(name, mask)
    if m.dtype == torch.bool:
        return m
    if m.dtype.is_floating_point or m.dtype.is_complex:
        raise TypeError(f"`{name}` must be a bool (or 0/1 integer) tensor, got dtype {m.dtype}")
    if m.numel() and bool(((m != 0) & (m != 1)).any()):
        raise ValueError(f"`{name}` must hold only 0 and 1 when given as integers")
    return m != 0


def check_mask(name: str, mask: object, shape: Sequence[int] | torch.Size) -> Tensor:
    """Return ``mask`` as a bool tensor of exactly ``shape``.

    Bool masks and integer masks holding only 0/1 are accepted; True (1) means "include".
    """
    m = _as_bool_mask(name, mask)
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {shape_str(shape)}, got {shape_str(m.shape)}")
    return m


def check_broadcast_mask(name: str, mask: object, shape: torch.Size, what: str = "") -> Tensor:
    """Return ``mask`` as a bool tensor that broadcasts to ``shape`` (torch rules).

    ``what`` describes ``shape`` in the error message, e.g. ``"position shape (input without dim)"``.
    """
    m = _as_bool_mask(name, mask)
    try:
        ok = torch.broadcast_shapes(m.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"`{name}` must broadcast to the {what or 'shape'} {shape_str(shape)}, got {shape_str(m.shape)}"
        )
    return m


def check_finite(name: str, x: Tensor) -> None:
    """Require every element of ``x`` to be finite."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values")


def ids_out_of_range(ids: Tensor, size: int, selected: Tensor | None = None) -> Tensor:
    """Bool mask of the ids outside ``[0, size)`` (where ``selected``, if given), computed on the device."""
    out = (ids < 0) | (ids >= size)
    return out if selected is None else out & selected


def check_ids_in_range(
    name: str, ids: Tensor, size: int, kind: str, where: str, selected: Tensor | None = None
) -> None:
    """Require integer ids ``0 <= id < size`` (only where the bool ``selected`` is True, if given).

    The message reads "`{name}` must hold {kind} in [0, size) ({where}, got [...]", e.g.
    kind ``"class ids"`` and where ``"num_classes=3) at selected items"``. One value is read back
    from the device (whether any id is out of range); the ids are gathered only for the message.
    """
    out = ids_out_of_range(ids, size, selected)
    if ids.numel() and bool(out.any()):
        bad = ids[out]
        raise ValueError(
            f"`{name}` must hold {kind} in [0, {size}) ({where}, got {bad.unique()[:8].tolist()}"
        )


def check_index(name: str, value: object, size: int, size_name: str) -> int:
    """Require an integer index ``0 <= value < size`` (e.g. ``layer`` against ``num_layers``).

    Python and numpy integers and one-element integer tensors are accepted; bools are not.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype in INT_DTYPES:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < size:
        raise ValueError(f"`{name}` must be in [0, {size}) (`{size_name}`={size}), got {value}")
    return value


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype to do math in: at least float32, float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
