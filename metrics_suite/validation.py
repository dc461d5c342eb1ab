"""Input checks shared by every metric.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape or values) with a message that names the argument, what was expected and what was
received. Metrics run all checks before touching any state, so a rejected update leaves the
state exactly as it was.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, TypeVar

import torch
from pydantic import BeforeValidator, ConfigDict, ValidationError, validate_call
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])

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


def check_item_size(name: str, x: Tensor) -> None:
    """Require items (``x[i]``) with at least one element: ``[N, 0]`` has nothing to measure."""
    if any(s == 0 for s in x.shape[1:]):
        raise ValueError(
            f"`{name}` must hold at least one element per item [N, ...], got shape {shape_str(x.shape)}"
        )


def check_device(name: str, x: Tensor, device: torch.device) -> None:
    """Require ``x`` on ``device`` (the metric's states); ``cuda`` matches any ``cuda:i`` and back."""
    same = x.device.type == device.type and (
        x.device.index is None or device.index is None or x.device.index == device.index
    )
    if not same:
        raise ValueError(
            f"`{name}` is on device {x.device}, the metric's states on {device}: move the input or the "
            "metric (`.to(device)`) so both are on one device"
        )


def check_devices(arguments: Mapping[str, object], device: torch.device) -> None:
    """[`check_device`][metrics_suite.validation.check_device] for every tensor among ``arguments``, and the tensors of a mapping or the
    parameters of a module among them (e.g. FeatureDrift's ``params``)."""
    for name, value in arguments.items():
        if isinstance(value, Tensor):
            check_device(name, value, device)
            continue
        items = (
            value.named_parameters()
            if isinstance(value, torch.nn.Module)
            else (value.items() if isinstance(value, Mapping) else ())
        )
        for key, item in items:
            if isinstance(item, Tensor):
                check_device(f"{name}[{key!r}]", item, device)


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


# ---------------------------------------------------------------------------------------------- constructor arguments
def _size(value: object) -> int:
    # numbers.Integral takes numpy ints; bool is an int subclass but no size
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise ValueError("a positive int (True, 2.0 or '8' are not sizes)")
    return int(value)


def _non_negative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ValueError("a non-negative int")
    return int(value)


def _positive_finite(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError("a finite number > 0")
    return float(value)


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("True or False")
    return value


#: A strict positive int (``True``, ``2.0``, ``"8"`` rejected; numpy ints accepted).
Size = Annotated[int, BeforeValidator(_size)]
#: A strict non-negative int (e.g. a seed).
NonNegativeSize = Annotated[int, BeforeValidator(_non_negative_int)]
#: A finite float > 0 (``epsilon``, ``eta``, ``lam``: ``inf``/``nan`` make no sense there).
PositiveFinite = Annotated[float, BeforeValidator(_positive_finite)]
#: ``True`` or ``False`` only.
Flag = Annotated[bool, BeforeValidator(_flag)]


#: What the constructor argument types accept, for messages about a missing argument.
_ACCEPTS = {
    "Size": "a positive int",
    "NonNegativeSize": "a non-negative int",
    "PositiveFinite": "a finite number > 0",
    "Flag": "True or False",
}


def closest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean `x`?)`` for the known name closest to ``name``, or ``""``."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def unknown_names(what: str, names: Iterable[str], known: Iterable[str]) -> str:
    """One line for unknown ``names``: the closest known name of each, and the valid ones."""
    known = list(known)
    parts = [f"`{n}`{closest(n, known)}" for n in names]
    return f"unknown {what} {', '.join(parts)}; valid: {', '.join(known)}"


def describe_validation_error(owner: str, err: ValidationError, signature: inspect.Signature) -> str:
    """pydantic's multi-line dump as one line per error: owner, argument, what was received and accepted."""
    params = list(signature.parameters)
    lines = []
    for e in err.errors():
        loc = e["loc"][0] if e["loc"] else "?"
        # positional arguments are located by their index in the signature (``self`` is 0)
        arg = params[loc] if isinstance(loc, int) and loc < len(params) else loc
        accepted = e["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
        if e["type"] == "missing_argument":
            annotation = signature.parameters[str(arg)].annotation if arg in signature.parameters else "?"
            accepts = _ACCEPTS.get(str(annotation), str(annotation))
            lines.append(f"{owner}: missing required argument `{arg}` (accepted: {accepts})")
        elif e["type"] == "unexpected_keyword_argument":
            lines.append(unknown_names(f"argument of {owner}:", [str(arg)], params[1:]))
        else:
            lines.append(f"{owner}: `{arg}` got {e['input']!r}; accepted: {accepted}")
    return "; ".join(lines)


def validated(init: F) -> F:
    """``pydantic.validate_call`` for a metric constructor, with one-line ``ValueError`` messages.

    The message names the class, the argument, what was received and what is accepted, instead of
    pydantic's multi-line dump. Arbitrary types (modules, tensors) are allowed as annotations.
    """
    checked = validate_call(config=ConfigDict(arbitrary_types_allowed=True))(init)
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return checked(self, *args, **kwargs)
        except ValidationError as err:
            raise ValueError(describe_validation_error(type(self).__name__, err, signature)) from None

    return wrapper  # type: ignore[return-value]
