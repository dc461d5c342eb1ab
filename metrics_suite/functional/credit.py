"""Functional forms of the credit suite: credit-assignment signals checked against ground truth.

Shapes use suffixes: ``N`` items (samples), ``D`` flattened features of one item, ``M`` random
directions, ``K`` next states, ``L`` layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from metrics_suite.functional._chunks import CHUNK_ELEMENTS, LOSS_CALL_ELEMENTS, row_slices, rows_per_chunk
from metrics_suite.functional._stats import mean_stats, safe_div
from metrics_suite.validation import (
    check_float,
    check_item_size,
    check_ndim,
    check_same_shape,
    check_shape,
    compute_dtype,
    shape_str,
)

__all__ = [
    "bridge_residual",
    "bridge_target",
    "bridge_values",
    "credit_cosine",
    "feature_drift",
    "lq_costates",
    "lq_forward",
    "nudging_delta",
    "perturbation_correlation",
    "perturbation_pairs",
]

#: Maps a batch of hidden states ``[N, *F]`` to one loss per item ``[N]``.
LossFn = Callable[[Tensor], Tensor]
Difference = Literal["forward", "central"]
#: Added to the per-item RMS of the credit in [`nudging_delta`][metrics_suite.functional.credit.nudging_delta].
RMS_EPS = 1e-6


def _flatten_items(x: Tensor) -> Tensor:
    """``[N, ...] -> [N, D]`` (also for ``N = 0`` and for ``[N]``, where ``D = 1``)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


# ---------------------------------------------------------------------------------------------- LQ chain
def _lq_check(weights: Sequence[Tensor], h0: Tensor, Q: Tensor | None) -> None:
    check_float("h0", h0)
    check_ndim("h0", h0, 2)
    dim = h0.shape[1]
    for l, A in enumerate(weights):
        check_float(f"weights[{l}]", A)
        check_shape(f"weights[{l}]", A, (None, dim))
        dim = A.shape[0]
    if Q is not None:
        check_float("Q", Q)
        check_shape("Q", Q, (dim, dim))


def _lq_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32


def lq_forward(weights: Sequence[Tensor], h0: Tensor) -> list[Tensor]:
    r"""Run the linear chain $h_{l+1} = A_l h_l$ on a batch (``h @ A_l.T``).

    Args:
        weights: ``[A_0, ..., A_{L-1}]``, ``A_l`` of shape ``[d_{l+1}, d_l]`` (a ``[L, d, d]`` tensor works too).
        h0: ``[B, d_0]`` inputs.

    Returns:
        ``[h_0, ..., h_L]``, each ``[B, d_l]``, in at least float32.

    Examples:
        >>> import torch
        >>> A = [torch.tensor([[2.0, 0.0], [1.0, 1.0]])]
        >>> lq_forward(A, torch.tensor([[1.0, 3.0]]))[1]
        tensor([[2., 4.]])
    """
    weights = list(weights)
    _lq_check(weights, h0, None)
    dtype = _lq_dtype(h0, *weights)
    hs = [h0.to(dtype)]
    for A in weights:
        hs.append(hs[-1] @ A.to(dtype).T)
    return hs


def lq_costates(weights: Sequence[Tensor], Q: Tensor, h0: Tensor) -> list[Tensor]:
    r"""Exact costates of the linear chain $h_{l+1} = A_l h_l$ with a quadratic terminal loss.

    With $\mathcal{L} = \tfrac12 \sum_b h_{L,b}^\top Q\, h_{L,b}$:

    $$
    p_L = Q_s h_L, \qquad p_l = A_l^\top p_{l+1}, \qquad Q_s = \tfrac12 (Q + Q^\top),
    $$

    so $p_l = \partial \mathcal{L} / \partial h_l$ exactly. For a symmetric $Q$ (the usual
    case) $Q_s = Q$ and $p_L = Q h_L$; a non-symmetric $Q$ only enters the loss
    through its symmetric part, which is therefore what is used, so the costates always equal the
    autograd gradients.

    Args:
        weights: ``[A_0, ..., A_{L-1}]``, ``A_l`` of shape ``[d_{l+1}, d_l]``.
        Q: ``[d_L, d_L]`` terminal cost matrix.
        h0: ``[B, d_0]`` inputs.

    Returns:
        ``[p_0, ..., p_L]``, each ``[B, d_l]`` (batched: ``p_L = h_L @ Q_s``, ``p_l = p_{l+1} @ A_l``).

    Examples:
        >>> import torch
        >>> A = [torch.tensor([[2.0, 0.0], [1.0, 1.0]])]
        >>> p0, p1 = lq_costates(A, torch.eye(2), torch.tensor([[1.0, 3.0]]))
        >>> p1, p0
        (tensor([[2., 4.]]), tensor([[8., 4.]]))
    """
    weights = list(weights)
    _lq_check(weights, h0, Q)
    dtype = _lq_dtype(h0, Q, *weights)
    h_last = lq_forward(weights, h0)[-1]
    q = Q.to(dtype)
    p = h_last @ (0.5 * (q + q.T))
    costates = [p]
    for A in reversed(weights):
        p = p @ A.to(dtype)
        costates.append(p)
    return costates[::-1]


# ---------------------------------------------------------------------------------------------- cosine
def _flat_pair(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    check_float(name, x)
    check_float(ref_name, ref)
    check_same_shape(ref_name, ref, name, x)
    if x.ndim < 1:
        raise ValueError(
            f"`{name}` must have a leading batch dimension [N, ...], got shape {shape_str(x.shape)}"
        )
    check_item_size(name, x)


def _credit_cosine_check(credit: Tensor, reference: Tensor) -> None:
    _flat_pair("credit", credit, "reference", reference)


def _per_item_cosine(credit: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine of the flattened items in float64 (clamped to [-1, 1]), and a bool ``[N]``: True where
    both norms are non-zero.

    Items go through float64 in chunks of about ``CHUNK_ELEMENTS``, so the extra memory
    stays bounded for large activations.
    """
    a, r = _flatten_items(credit), _flatten_items(reference.to(credit.device))
    dots, norms = [], []
    for rows in row_slices(a.shape[0], rows_per_chunk(a.shape[1], CHUNK_ELEMENTS)):
        a64, r64 = a[rows].to(torch.float64), r[rows].to(torch.float64)
        dots.append((a64 * r64).sum(1))
        sq_a, sq_r = (a64 * a64).sum(1), (r64 * r64).sum(1)
        # sqrt of the product (summed as the dot is): a vector with itself gives exactly 1, as
        # sqrt(fl(s*s)) == s; the product of the norms where that product over- or underflows
        product = sq_a * sq_r
        exact = torch.isfinite(product) & ((product > 0) | (sq_a == 0) | (sq_r == 0))
        norms.append(torch.where(exact, product.sqrt(), sq_a.sqrt() * sq_r.sqrt()))
    if not dots:
        empty = torch.zeros(0, dtype=torch.float64, device=a.device)
        return empty, empty.bool()
    dot, norm = torch.cat(dots), torch.cat(norms)
    # rounding can still put a cosine at 1 + 2**-52 (e.g. nearly parallel vectors)
    return safe_div(dot, norm).clamp(-1.0, 1.0), norm != 0


def credit_cosine(credit: Tensor, reference: Tensor) -> Tensor:
    r"""Mean per-item cosine between a credit signal and a reference (e.g. the backprop gradient).

    $$
    \Gamma = \frac{1}{|S|} \sum_{i \in S} \frac{\langle a_i, r_i\rangle}{\lVert a_i\rVert\, \lVert r_i\rVert}
    $$

    over the items whose flattened credit $a_i$ and reference $r_i$ both have a non-zero
    norm ($S$); the cosine of a zero vector is undefined, so such items are left out.

    Args:
        credit: ``[N, ...]`` credit signal.
        reference: ``[N, ...]`` reference of the same shape (backprop gradient or exact costate).

    Returns:
        A float64 scalar; NaN when no item has both norms non-zero.

    Examples:
        >>> import torch
        >>> credit = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
        >>> reference = torch.tensor([[1.0, 1.0], [1.0, 1.0], [3.0, 4.0]])
        >>> round(credit_cosine(credit, reference).item(), 4)  # (0.7071 + 1) / 2, third item left out
        0.8536
    """
    _credit_cosine_check(credit, reference)
    cos, defined = _per_item_cosine(credit, reference)
    return safe_div(torch.where(defined, cos, 0.0).sum(), defined.sum().to(torch.float64))


# ---------------------------------------------------------------------------------------------- losses
def _check_positive(name: str, value: object, allow_zero: bool = False, integer: bool = False) -> None:
    """A clear error for a step size, temperature or count the functional API cannot use."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"`{name}` must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")


def _check_loss_fn(loss_fn: object) -> None:
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable ([N, ...] -> [N]), got {type(loss_fn).__name__}")


def _evaluate(loss_fn: LossFn, rows: Tensor) -> Tensor:
    """``loss_fn(rows)`` as float64 ``[rows]``, with a clear error for a wrong output."""
    out = loss_fn(rows)
    if not isinstance(out, Tensor):
        raise TypeError(f"`loss_fn` must return a tensor of per-item losses, got {type(out).__name__}")
    if out.shape != (rows.shape[0],):
        raise ValueError(
            f"`loss_fn` must map [N, ...] inputs to per-item losses [N]; for {shape_str(rows.shape)} inputs "
            f"it returned {shape_str(out.shape)}"
        )
    if not out.is_floating_point():
        # an integer loss cannot resolve a step of size epsilon: every change would read as 0
        raise TypeError(f"`loss_fn` must return floating-point losses, got {out.dtype}")
    return out.detach().to(torch.float64)


def _hidden_credit_check(hidden: Tensor, credit: Tensor, loss_fn: object) -> None:
    _flat_pair("hidden", hidden, "credit", credit)
    _check_loss_fn(loss_fn)


# ---------------------------------------------------------------------------------------------- perturbation
def _fill_gaussian(out: Tensor, generator: torch.Generator | None) -> None:
    """Fill ``out`` with standard normal draws from ``generator``.

    Drawn in place when the generator lives on ``out``'s device (no large temporary), else drawn on
    the generator's device (CPU without a generator) and copied.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    if out.device == device:
        out.normal_(generator=generator)
    else:
        out.copy_(torch.randn(out.shape, generator=generator, dtype=out.dtype, device=device))


def _int64(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value`` (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


#: SplitMix64 (Steele, Lea & Flood 2014): the state advances by the golden-ratio increment γ and each
#: output is the state through three xorshift-multiply rounds (right shift, multiplier); as int64 for
#: torch, as uint64 for numpy
_SPLITMIX_GAMMA = _int64(0x9E3779B97F4A7C15)
_SPLITMIX_ROUNDS = ((30, _int64(0xBF58476D1CE4E5B9)), (27, _int64(0x94D049BB133111EB)), (31, 1))
_SPLITMIX_GAMMA_UINT64 = np.uint64(_SPLITMIX_GAMMA % 2**64)
_SPLITMIX_ROUNDS_UINT64 = tuple((np.uint64(shift), np.uint64(m % 2**64)) for shift, m in _SPLITMIX_ROUNDS)

# The hash runs in numpy on the memory of contiguous CPU tensors read as uint64, and with int64 tensor
# ops elsewhere; both give the bits of the uint64 reference. On a CPU numpy is the faster: torch has no
# logical right shift on int64 and no right shift at all on uint64, so each of its shifts is the
# arithmetic one plus a mask (four passes per round instead of three), and a numpy call on the few
# item keys costs a fraction of a torch op's dispatch. bench_credit's keyed directions (32 directions
# of 64 items of width 256, one thread): the 262,144 outputs 1.66 -> 1.03 ms, the 64 keys 0.64 -> 0.38 ms.


#: Elements from which torch splits an elementwise op across its intra-op threads (ATen's grain size)
_TORCH_GRAIN_SIZE = 32768


def _uint64_words(t: Tensor) -> np.ndarray | None:
    """The memory of a contiguous CPU int64 tensor as a numpy uint64 array; None where torch ops run.

    torch runs where numpy cannot (off the CPU, strided memory) and where it is the faster: numpy uses
    one thread, torch all its intra-op threads on a large tensor (with 2: 0.90 vs 1.06 ms for 262,144).
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    if t.numel() >= _TORCH_GRAIN_SIZE and torch.get_num_threads() > 1:
        return None
    return t.numpy().view(np.uint64)


def _mix_uint64(z: np.ndarray, shifted: np.ndarray) -> None:
    """In place: the SplitMix64 output for the uint64 ``z`` (numpy wraps modulo 2**64 like uint64)."""
    for shift, multiplier in _SPLITMIX_ROUNDS_UINT64:
        np.right_shift(z, shift, out=shifted)
        np.bitwise_xor(z, shifted, out=z)
        if multiplier != 1:
            np.multiply(z, multiplier, out=z)


def _mix_int64(state: Tensor, shifted: Tensor) -> None:
    """In place: the SplitMix64 output for the int64 ``state``, on any device.

    Addition and multiplication wrap modulo 2**64 as on uint64; each logical right shift is torch's
    arithmetic one with the copied sign bits masked off.
    """
    for shift, multiplier in _SPLITMIX_ROUNDS:
        torch.bitwise_right_shift(state, shift, out=shifted)
        state ^= shifted.bitwise_and_((1 << (64 - shift)) - 1)
        if multiplier != 1:
            state *= multiplier


def _mix64_(state: Tensor, scratch: Tensor | None = None) -> Tensor:
    """In place: the SplitMix64 output for the (already advanced) int64 ``state``, a bijection of 64 bits.

    ``scratch`` (a tensor like ``state``) holds the shifted copies.
    """
    shifted = torch.empty_like(state) if scratch is None else scratch
    z, z_shifted = _uint64_words(state), _uint64_words(shifted)
    if z is not None and z_shifted is not None:
        _mix_uint64(z, z_shifted)
    else:
        _mix_int64(state, shifted)
    return state


def _fold64_(key: Tensor, words: Tensor) -> Tensor:
    """In place: ``key = mix((key ^ w) + γ)`` for each column ``w`` of ``words`` (int64 ``[N, C]``) in turn."""
    shifted = torch.empty_like(key)
    columns = words.T.contiguous()
    z, z_shifted, z_columns = _uint64_words(key), _uint64_words(shifted), _uint64_words(columns)
    if z is not None and z_shifted is not None and z_columns is not None:
        for w in z_columns:
            np.bitwise_xor(z, w, out=z)
            np.add(z, _SPLITMIX_GAMMA_UINT64, out=z)
            _mix_uint64(z, z_shifted)
    else:
        for w in columns:
            _mix_int64(key.bitwise_xor_(w).add_(_SPLITMIX_GAMMA), shifted)
    return key


#: 16-bit pieces of an item hashed per exact float64 dot product: weights < 2**20 keep every
#: partial sum an integer below 2**53, so the key does not depend on the BLAS summation order
_KEY_PIECES = 1 << 17
_KEY_WEIGHT_BITS = 20
#: Dot products per block of pieces: distinct blocks agree on all of them with probability <= 2**-80
_KEY_SUMS = 4


@functools.lru_cache(maxsize=8)
def _key_weights(width: int) -> Tensor:
    """The fixed random hash weights ``[width, 4]`` of `_item_keys` (CPU; callers only read them)."""
    generator = torch.Generator().manual_seed(0x6B657965)
    shape = (width, _KEY_SUMS)
    return torch.randint(1 << _KEY_WEIGHT_BITS, shape, generator=generator, dtype=torch.float64)


def _item_keys(flat_ND: Tensor, seed: int) -> Tensor:
    """One 64-bit key per row of ``flat_ND`` (int64 ``[N]`` on its device) from ``seed`` and the row's bits.

    Each row's 16-bit pieces are hashed by four exact integer dot products per block of ``2**17``
    pieces with fixed random 20-bit weights (in float64: every sum is an integer below 2**53, so the
    sums are the same for any batch size, BLAS or device); SplitMix64 folds the sums into ``seed``:
    ``key = mix(seed + γ)``, then ``key = mix((key ^ sum) + γ)`` per sum. Equal rows get equal keys
    wherever they come from. For two distinct rows, each of the four sums of a block where they differ
    agrees with probability at most ``2**-20`` (over the weights), so their keys collide with
    probability about ``2**-64`` (the key's width).
    """
    n_items, width = flat_ND.shape[0], flat_ND.shape[1] * flat_ND.element_size() // 2
    pieces = (flat_ND + 0.0).contiguous().view(torch.int16).reshape(n_items, width)  # + 0.0: -0.0 -> 0.0
    weights = _key_weights(width).to(flat_ND.device)
    rows_per_block = rows_per_chunk(width, CHUNK_ELEMENTS)
    col_blocks = range(0, width, _KEY_PIECES)
    sums = torch.empty(n_items, _KEY_SUMS * len(col_blocks), dtype=torch.float64, device=flat_ND.device)
    for r in range(0, n_items, rows_per_block):  # blocks of rows bound the float64 copy
        for b, c in enumerate(col_blocks):
            block = pieces[r : r + rows_per_block, c : c + _KEY_PIECES].double()
            sums[r : r + rows_per_block, _KEY_SUMS * b : _KEY_SUMS * (b + 1)] = (
                block @ weights[c : c + _KEY_PIECES]
            )
    key = torch.full(
        (n_items,), _int64((seed + _SPLITMIX_GAMMA) % 2**64), dtype=torch.int64, device=flat_ND.device
    )
    return _fold64_(_mix64_(key), sums.long())  # one pass per sum, over all items


def _keyed_normals_(out_mND: Tensor, keys_N: Tensor, first: int) -> None:
    """Fill ``out_mND`` with directions ``first, ..., first + m - 1`` of every item's keyed normals.

    Item ``i`` reads the SplitMix64 stream seeded with its key, ``z_s = mix(key_i + (s + 1)·γ)``. Output
    ``s = m·P + p`` (``P = ⌈D/2⌉``) gives coordinates ``p`` and ``P + p`` of direction ``m`` by
    Box-Muller: ``r cos θ`` and ``r sin θ`` with ``r = sqrt(-2 log(1 - k·2^-b))``, ``k`` the low ``b``
    bits of ``z_s`` (``b`` = 24 in float32, 32 in float64, so ``1 - k·2^-b`` is exact and never 0),
    and ``θ = π·2^-63·t``, ``t`` all of ``z_s`` read as a signed integer (rounded to the float type).
    Each value depends on (seed, item, direction, coordinate) alone and is computed elementwise on
    ``out_mND``'s device (tensor ops, or numpy's on a CPU tensor's memory), so any chunk of
    directions, batch, position or rank reads the same normals.
    """
    m, n_items, dim = out_mND.shape
    half = (dim + 1) // 2
    device, dtype = out_mND.device, out_mND.dtype
    steps = torch.arange(first * half + 1, (first + m) * half + 1, dtype=torch.int64, device=device)
    bits = torch.add(keys_N.view(1, n_items, 1), steps.mul_(_SPLITMIX_GAMMA).view(m, 1, half))
    scratch = torch.empty_like(bits)  # one int64 buffer for the shifts and the radius bits
    _mix64_(bits, scratch)
    b = 24 if dtype == torch.float32 else 32  # a float32 significand holds 24 bits
    radius = torch.bitwise_and(bits, (1 << b) - 1, out=scratch).to(dtype)
    radius = torch.rsub(radius, 1.0, alpha=2.0**-b).log_().mul_(-2.0).sqrt_()
    angle = bits.to(dtype).mul_(math.pi * 2.0**-63)
    pairs = out_mND.view(m, n_items, 2, half) if dim % 2 == 0 else out_mND.new_empty(m, n_items, 2, half)
    # cos into a contiguous buffer, then scaled into the strided half: 0.71 vs 0.86 ms for 262,144
    torch.mul(torch.cos(angle), radius, out=pairs[:, :, 0])
    torch.mul(angle.sin_(), radius, out=pairs[:, :, 1])
    if dim % 2:
        out_mND.copy_(pairs.view(m, n_items, 2 * half)[..., :dim])


def perturbation_pairs(
    hidden: Tensor,
    credit: Tensor,
    loss_fn: LossFn,
    epsilon: float = 1e-3,
    num_directions: int = 32,
    difference: Difference = "forward",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Predicted and true loss changes along random directions, the pairs behind [`perturbation_correlation`][metrics_suite.functional.credit.perturbation_correlation].

    For each item $i$ and each of $M$ directions $v_{im}$ drawn uniformly on the unit
    sphere of the flattened item:

    $$
    x_{im} = \langle a_i, \varepsilon v_{im}\rangle, \qquad
    y_{im} = \mathcal{L}(h_i + \varepsilon v_{im}) - \mathcal{L}(h_i)
    \quad\Big(\text{central: } \tfrac12\big[\mathcal{L}(h_i + \varepsilon v_{im})
    - \mathcal{L}(h_i - \varepsilon v_{im})\big]\Big).
    $$

    $\varepsilon v_{im}$ in $x_{im}$ is the step actually taken: $h_i + \varepsilon v_{im}$ rounded to
    the working precision, minus $h_i$ (central: half the difference of the two perturbed inputs), so
    the exact gradient of a linear loss gives $x = y$ in float32 too.

    All perturbed inputs are evaluated in batched ``loss_fn`` calls of at most ``chunk_size`` rows
    (whole directions per call; the unperturbed rows ride along in the first call), not in ``M``
    separate calls. ``loss_fn`` runs under ``torch.no_grad()`` and must be item-wise (no coupling
    between rows, e.g. no batch-norm in training mode). Its input holds whole copies of the batch,
    block after block: row ``s·N + i`` is (a perturbation of) item ``i``, so a loss with per-item
    targets can tile them (``targets.repeat(R // N)``). The input buffer is reused once ``loss_fn``
    returns: ``loss_fn`` must not keep it (the losses it returns may be views of it). Inputs are
    perturbed in at least float32 (float16/bfloat16 inputs reach ``loss_fn`` as float32: a
    perturbation of size ``epsilon`` would round away in half precision).

    Args:
        hidden: ``[N, *F]`` hidden states (``[N, d]`` in the usual case).
        credit: ``[N, *F]`` credit signal $a$ (e.g. a gradient estimate w.r.t. ``hidden``).
        loss_fn: maps ``[R, *F]`` to per-item losses ``[R]``.
        epsilon: step size $\varepsilon$.
        num_directions: $M$.
        difference: ``"forward"`` or ``"central"``.
        generator: random source of the directions (drawn on its device, then moved to ``hidden``'s);
            ``None`` uses torch's global RNG. It advances by ``M·N·D`` normal draws per call, in chunks
            of whole directions, so the same generator state and ``chunk_size`` give the same pairs.
        chunk_size: maximum rows per ``loss_fn`` call (at least one direction's rows are sent);
            default ``2**22 // D``.
        seed: key the directions by item instead of drawing them from ``generator``: item $i$'s
            directions are a counter-based hash of (``seed``, the values of $h_i$, direction,
            coordinate) mapped to normals by Box-Muller, computed with tensor ops on ``hidden``'s
            device (what [`PerturbationCorrelation`][metrics_suite.credit.PerturbationCorrelation] uses). An item then gets
            the same directions in any batch, at any position, on any rank and for any
            ``chunk_size``, so pairs, and sums of them, do not depend on how the data is split.
            Items with equal values share directions; distinct items share them with probability
            about ``2**-64`` (their 64-bit keys collide). Exclusive with ``generator``.

    Returns:
        ``(predicted, true)``, each float64 ``[N, M]``.

    Examples:
        >>> import torch
        >>> hidden = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
        >>> loss_fn = lambda h: 0.5 * (h**2).sum(-1)  # gradient = hidden
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = perturbation_pairs(hidden, hidden, loss_fn, num_directions=4, difference="central", generator=g)
        >>> x.shape, bool(torch.allclose(x, y, rtol=1e-9, atol=1e-15))
        (torch.Size([2, 4]), True)
    """
    _hidden_credit_check(hidden, credit, loss_fn)
    _check_positive("epsilon", epsilon)
    _check_positive("num_directions", num_directions, allow_zero=True, integer=True)
    if difference not in ("forward", "central"):
        raise ValueError(f"`difference` must be 'forward' or 'central', got {difference!r}")
    if chunk_size is not None:
        _check_positive("chunk_size", chunk_size, integer=True)
    if seed is not None:
        _check_positive("seed", seed, allow_zero=True, integer=True)
        if generator is not None:
            raise ValueError(
                "pass either `generator` (one stream for the batch) or `seed` (a stream per item), not both"
            )
    return _perturbation_pairs(
        hidden, credit, loss_fn, epsilon, num_directions, difference, generator, chunk_size, seed
    )


def _row_dots(steps_mND: Tensor, a_ND: Tensor) -> Tensor:
    """Float64 ``[m, N]`` dot products of each step with its item's credit, overwriting ``steps_mND``.

    The product and sum of ``torch.linalg.vecdot(steps_mND, a_ND)`` (same values) without the product's
    fresh ``[m, N, D]`` temporary: about half its time on a CPU.
    """
    return steps_mND.mul_(a_ND).sum(-1).double()


def _perturbation_pairs(
    hidden: Tensor,
    credit: Tensor,
    loss_fn: LossFn,
    epsilon: float,
    num_directions: int,
    difference: Difference,
    generator: torch.Generator | None,
    chunk_size: int | None,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """[`perturbation_pairs`][metrics_suite.functional.credit.perturbation_pairs] without the input checks."""
    n_items, features = hidden.shape[0], tuple(hidden.shape[1:])
    dim = math.prod(features)
    dtype = compute_dtype(hidden)
    h = hidden.detach().reshape(n_items, dim).to(dtype)
    a = credit.detach().reshape(n_items, dim).to(device=h.device, dtype=dtype)
    if n_items == 0 or num_directions == 0:
        empty = torch.zeros(n_items, num_directions, dtype=torch.float64, device=h.device)
        return empty, empty.clone()
    central = difference == "central"
    # a "slot" is the rows of one loss_fn input block: one direction (2N rows when central), or the
    # N unperturbed rows of forward differences, which share the first call
    slot_rows = 2 * n_items if central else n_items
    max_rows = chunk_size if chunk_size is not None else LOSS_CALL_ELEMENTS // max(dim, 1)
    slots_per_call = max(1, max_rows // slot_rows)
    keys_N = _item_keys(h, seed) if seed is not None else None
    predicted_MN, true_MN = [], []
    base: Tensor | None = None
    start = 0
    with torch.no_grad():
        while start < num_directions:
            base_rows = 0 if central or base is not None else 1
            m = min(slots_per_call - base_rows, num_directions - start)
            if m == 0:  # one slot per call: the unperturbed rows get their own call
                base = _evaluate(loss_fn, h.view(n_items, *features))
                continue
            rows = torch.empty(
                2 * m if central else base_rows + m, n_items, dim, dtype=dtype, device=h.device
            )
            dirs_mND = rows[:m] if central else rows[base_rows:]
            # a direction is a normalised Gaussian (uniform on the sphere), drawn straight into the
            # loss_fn input buffer; the normalisation and the step are folded into one scale
            if keys_N is not None:
                _keyed_normals_(dirs_mND, keys_N, start)
            else:
                _fill_gaussian(dirs_mND, generator)
            step_mN1 = epsilon / dirs_mND.norm(dim=-1, keepdim=True)
            # the predicted change uses the step actually taken (h + εv rounded, minus h: exact in
            # floating point), so an exact gradient of a linear loss scores 1 even in float32
            if central:
                torch.addcmul(h, dirs_mND, step_mN1, value=-1.0, out=rows[m:])
                torch.addcmul(h, dirs_mND, step_mN1, out=dirs_mND)
                plus, minus = _evaluate(loss_fn, rows.view(-1, *features)).view(2, m, n_items)
                true_MN.append(0.5 * (plus - minus))
                predicted_MN.append(0.5 * _row_dots(rows[:m].sub_(rows[m:]), a))
            else:
                rows[:base_rows] = h
                torch.addcmul(h, dirs_mND, step_mN1, out=dirs_mND)
                losses = _evaluate(loss_fn, rows.view(-1, *features)).view(base_rows + m, n_items)
                if base is None:
                    base = losses[0]
                true_MN.append(losses[base_rows:] - base)
                predicted_MN.append(_row_dots(dirs_mND.sub_(h), a))
            start += m
    return torch.cat(predicted_MN).T, torch.cat(true_MN).T


def _pearson_sums(x: Tensor, y: Tensor, keep: Tensor | None = None) -> Tensor:
    """The six float64 sums (n, Σx, Σy, Σx², Σy², Σxy) over all elements of ``x`` and ``y``.

    ``keep`` (bool ``[N]``, optional) leaves out the items (dim 0) where it is False. The items
    are zeroed rather than gathered: a boolean-mask gather waits for the device to count them.
    """
    x, y = x.to(torch.float64), y.to(torch.float64)
    if keep is None:
        n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    else:
        keep = keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim))
        n = keep.sum(dtype=torch.float64) * (x.numel() // max(x.shape[0], 1))
        x, y = torch.where(keep, x, 0.0), torch.where(keep, y, 0.0)
    return torch.stack([n, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])


def _pearson_compute(sums: Tensor) -> Tensor:
    """Pearson correlation from ``[..., 6]`` sums; NaN without data or with zero variance."""
    n, sx, sy, sxx, syy, sxy = sums.unbind(-1)
    cov = sxy - safe_div(sx * sy, n)
    var_x = (sxx - safe_div(sx * sx, n)).clamp_min(0.0)
    var_y = (syy - safe_div(sy * sy, n)).clamp_min(0.0)
    return safe_div(cov, torch.sqrt(var_x * var_y)).clamp(-1.0, 1.0)


def perturbation_correlation(
    hidden: Tensor,
    credit: Tensor,
    loss_fn: LossFn,
    epsilon: float = 1e-3,
    num_directions: int = 32,
    difference: Difference = "forward",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Tensor:
    r"""Pearson correlation between predicted and true loss changes over all (item, direction) pairs.

    $$
    \rho = \frac{n\sum xy - \sum x \sum y}{\sqrt{n\sum x^2 - (\sum x)^2}\,\sqrt{n\sum y^2 - (\sum y)^2}}
    $$

    with the pairs of [`perturbation_pairs`][metrics_suite.functional.credit.perturbation_pairs] (``generator`` or ``seed`` picks the directions).
    1 means the credit predicts the loss change along every direction; about 0 means it carries no
    information. NaN without pairs or when either side has zero variance.

    Examples:
        >>> import torch
        >>> hidden = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> loss_fn = lambda h: 0.5 * (h**2).sum(-1)
        >>> g = torch.Generator().manual_seed(1)
        >>> round(perturbation_correlation(hidden, hidden, loss_fn, difference="central", generator=g).item(), 6)
        1.0
        >>> round(perturbation_correlation(hidden, -hidden, loss_fn, difference="central", generator=g).item(), 6)
        -1.0
    """
    x, y = perturbation_pairs(
        hidden, credit, loss_fn, epsilon, num_directions, difference, generator, seed=seed
    )
    return _pearson_compute(_pearson_sums(x, y))


# ---------------------------------------------------------------------------------------------- nudging
def nudging_delta(hidden: Tensor, credit: Tensor, loss_fn: LossFn, eta: float = 0.01) -> Tensor:
    r"""Per-item loss change after a small step against the RMS-normalised credit.

    $$
    \hat a_i = \frac{a_i}{\operatorname{rms}(a_i) + 10^{-6}}, \qquad
    \Delta_i = \mathcal{L}(h_i - \eta\, \hat a_i) - \mathcal{L}(h_i),
    $$

    with the RMS over the flattened item. A useful credit signal gives $\Delta_i < 0$. Both
    losses come from one ``loss_fn`` call on ``2N`` rows (the batch, then the nudged batch), under
    ``torch.no_grad()``, in at least float32.

    Args:
        hidden: ``[N, *F]`` hidden states.
        credit: ``[N, *F]`` credit signal $a$.
        loss_fn: maps ``[R, *F]`` to per-item losses ``[R]``.
        eta: step size $\eta$.

    Returns:
        float64 ``[N]`` loss changes $\Delta_i$.

    Examples:
        >>> import torch
        >>> hidden = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
        >>> loss_fn = lambda h: 0.5 * (h**2).sum(-1)  # gradient = hidden
        >>> bool((nudging_delta(hidden, hidden, loss_fn) < 0).all())
        True
        >>> bool((nudging_delta(hidden, -hidden, loss_fn) > 0).all())
        True
    """
    _hidden_credit_check(hidden, credit, loss_fn)
    _check_positive("eta", eta)
    return _nudging_delta(hidden, credit, loss_fn, eta)


def _nudging_delta(hidden: Tensor, credit: Tensor, loss_fn: LossFn, eta: float) -> Tensor:
    """[`nudging_delta`][metrics_suite.functional.credit.nudging_delta] without the input checks."""
    n_items, features = hidden.shape[0], tuple(hidden.shape[1:])
    if n_items == 0:
        return torch.zeros(0, dtype=torch.float64, device=hidden.device)
    dtype = compute_dtype(hidden)
    h = _flatten_items(hidden.detach()).to(dtype)
    a = _flatten_items(credit.detach()).to(device=h.device, dtype=dtype)
    # the RMS in float64: squares of a float32 credit above ~1e19 would overflow to inf
    rms = torch.linalg.vector_norm(a, dim=1, keepdim=True, dtype=torch.float64) / math.sqrt(a.shape[1])
    a_hat = (a / (rms + RMS_EPS)).to(dtype)
    with torch.no_grad():
        losses = _evaluate(loss_fn, torch.cat([h, h - eta * a_hat]).reshape(-1, *features))
    return losses[n_items:] - losses[:n_items]


def _nudging_stats(delta: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean statistics ``[3]`` of the loss changes ``delta`` ``[N]`` over ``keep``, and of "improved".

    Improved means $\Delta_i < 0$; its mean is ``improved_fraction``. A NaN delta stays NaN (under
    ``nan_strategy="propagate"``) instead of counting as "not improved".
    """
    delta = torch.where(keep, delta, 0.0)
    improved = torch.where(delta.isnan(), delta, (delta < 0).to(torch.float64))
    return mean_stats(delta, keep), mean_stats(improved, keep)


# ---------------------------------------------------------------------------------------------- bridge
def _next_values_check(next_values: Tensor, batch: int | None = None) -> None:
    check_float("next_values", next_values)
    check_shape("next_values", next_values, (batch, None))
    if next_values.shape[1] == 0:
        raise ValueError(
            f"`next_values` must hold at least one next value per item, got {shape_str(next_values.shape)}"
        )


def _bridge_check(value: Tensor, next_values: Tensor) -> None:
    check_float("value", value)
    check_ndim("value", value, 1)
    _next_values_check(next_values, value.shape[0])


def bridge_target(next_values: Tensor, lam: float = 0.1) -> Tensor:
    r"""Soft-min target of a value function over $K$ sampled next states.

    $$
    V^{target} = -\lambda \log \frac{1}{K}\sum_{k=1}^K e^{-V^{next}_k/\lambda}
    = -\lambda \operatorname{logsumexp}_k(-V^{next}_k/\lambda) + \lambda \log K,
    $$

    which lies between $\min_k V^{next}_k$ (as $\lambda \to 0$) and their mean
    (as $\lambda \to \infty$).

    Args:
        next_values: ``[B, K]`` values of the sampled next states.
        lam: temperature $\lambda > 0$.

    Returns:
        float64 ``[B]``.

    Examples:
        >>> import torch
        >>> bridge_target(torch.tensor([[0.0, 1.0]]), lam=1.0)  # -log((1 + e^-1) / 2)
        tensor([0.3799], dtype=torch.float64)
    """
    _next_values_check(next_values)
    _check_positive("lam", lam)
    return _bridge_target(next_values, lam)


def _bridge_target(next_values: Tensor, lam: float) -> Tensor:
    """[`bridge_target`][metrics_suite.functional.credit.bridge_target] without the input checks."""
    v = next_values.to(torch.float64)
    return -lam * torch.logsumexp(-v / lam, dim=1) + lam * math.log(v.shape[1])


def _bridge_residuals(value: Tensor, next_values: Tensor, lam: float) -> Tensor:
    """Float64 ``[B]`` absolute residuals $|V_b - V^{target}_b|$ (inputs already checked)."""
    return (value.to(torch.float64) - _bridge_target(next_values, lam).to(value.device)).abs()


def bridge_residual(value: Tensor, next_values: Tensor, lam: float = 0.1) -> Tensor:
    r"""Mean absolute residual of the soft Bellman (bridge) equation, $\operatorname{mean}_b |V_b - V^{target}_b|$.

    See [`bridge_target`][metrics_suite.functional.credit.bridge_target] for $V^{target}$.

    Args:
        value: ``[B]`` values of the current states.
        next_values: ``[B, K]`` (target-network) values of $K$ sampled next states.
        lam: temperature $\lambda > 0$.

    Returns:
        A float64 scalar (NaN for ``B = 0``).

    Examples:
        >>> import torch
        >>> value = torch.tensor([0.5, 0.0])
        >>> next_values = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
        >>> round(bridge_residual(value, next_values, lam=1.0).item(), 4)  # (|0.5 - 0.3799| + |0 - 2|) / 2
        1.0601
    """
    _bridge_check(value, next_values)
    _check_positive("lam", lam)
    residual = _bridge_residuals(value, next_values, lam)
    return safe_div(residual.sum(), torch.tensor(float(residual.numel()), dtype=torch.float64))


def _network_values(net: Callable[[Tensor], Tensor], inputs: Tensor, name: str) -> Tensor:
    out = net(inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"`{name}` must return a tensor, got {type(out).__name__}")
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (inputs.shape[0],):
        raise ValueError(
            f"`{name}` must map [N, ...] states to values [N] or [N, 1]; for {shape_str(inputs.shape)} "
            f"states it returned {shape_str(out.shape)}"
        )
    return out


def bridge_values(
    value_net: Callable[[Tensor], Tensor],
    target_net: Callable[[Tensor], Tensor],
    states: Tensor,
    next_states: Tensor,
) -> tuple[Tensor, Tensor]:
    """Evaluate a value network and a target network into the inputs of [`BridgeResidual`][metrics_suite.credit.BridgeResidual].

    Runs under ``torch.no_grad()``; the target network sees all ``B·K`` next states in one call.

    Args:
        value_net: maps states ``[N, *S]`` to values ``[N]`` (or ``[N, 1]``).
        target_net: the same for the (target) value of next states.
        states: ``[B, *S]`` current states.
        next_states: ``[B, K, *S]`` sampled (e.g. noisy) next states of each current state.

    Returns:
        ``(value [B], next_values [B, K])``.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> states = torch.randn(4, 3)
        >>> next_states = states[:, None] + 0.1 * torch.randn(4, 5, 3)
        >>> value, next_values = bridge_values(net, net, states, next_states)
        >>> value.shape, next_values.shape
        (torch.Size([4]), torch.Size([4, 5]))
    """
    check_float("states", states)
    check_ndim("states", states, tuple(range(1, 8)))
    check_float("next_states", next_states)
    check_shape("next_states", next_states, (states.shape[0], None, *states.shape[1:]))
    batch, k = next_states.shape[:2]
    with torch.no_grad():
        value = _network_values(value_net, states, "value_net")
        flat_next = next_states.reshape(batch * k, *states.shape[1:])
        next_values = _network_values(target_net, flat_next, "target_net").reshape(batch, k)
    return value, next_values


# ---------------------------------------------------------------------------------------------- drift
def _named_tensors(name: str, params: object) -> dict[str, Tensor]:
    """``{name: tensor}`` of a module's parameters or of a name→tensor mapping (checked)."""
    if isinstance(params, nn.Module):
        return {k: p.detach() for k, p in params.named_parameters()}
    if not isinstance(params, Mapping):
        raise TypeError(
            f"`{name}` must be an nn.Module or a mapping of names to tensors, got {type(params).__name__}"
        )
    out: dict[str, Tensor] = {}
    for key, value in params.items():
        if not isinstance(key, str):
            raise TypeError(f"`{name}` keys must be parameter names (str), got {type(key).__name__}")
        out[key] = check_float(f"{name}[{key!r}]", value).detach()
    return out


def _module_name(param_name: str) -> str:
    """The module owning ``param_name`` (``"layer1.weight"`` → ``"layer1"``; top-level → ``"root"``)."""
    owner = param_name.rpartition(".")[0]
    return owner if owner else "root"


def _drift_sq(params: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Tensor:
    """Float64 ``[P]``: ``‖W − W_0‖²`` per reference parameter (``params`` already checked)."""
    return torch.stack(
        [
            (params[k].to(device=w0.device, dtype=torch.float64) - w0.to(torch.float64)).square().sum()
            for k, w0 in reference.items()
        ]
    )


def _reference_sq_norms(reference: Mapping[str, Tensor]) -> Tensor:
    """Float64 ``[P]`` (on the CPU): ``‖W_0‖²`` per reference parameter."""
    return torch.stack([w.to(torch.float64).square().sum().cpu() for w in reference.values()])


def _drift_check(params: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
    missing = [k for k in reference if k not in params]
    if missing:
        raise ValueError(f"`params` lacks reference parameter(s) {missing}; it has {sorted(params)}")
    for k, w0 in reference.items():
        if params[k].shape != w0.shape:
            raise ValueError(
                f"`params[{k!r}]` must have the reference shape {shape_str(w0.shape)}, got {shape_str(params[k].shape)}"
            )


def _drift_groups(names: Sequence[str], group_by_module: bool) -> tuple[list[str], Tensor]:
    """Output names, and the output index ``[P]`` (int64) of each parameter."""
    keys = [_module_name(k) for k in names] if group_by_module else list(names)
    if group_by_module and any("." not in k for k in names) and any(k.startswith("root.") for k in names):
        raise ValueError(
            "group_by_module=True reports top-level parameters as 'root', but a submodule is also "
            "named 'root'; rename it or pass the parameters as a mapping with other names"
        )
    groups = list(dict.fromkeys(keys))
    position = {g: i for i, g in enumerate(groups)}
    return groups, torch.tensor([position[k] for k in keys], dtype=torch.int64)


def _drift_compute(drift_sq: Tensor, ref_sq: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """Relative drift per group, ``sqrt(Σ_group ‖ΔW‖² / Σ_group ‖W_0‖²)``; a NaN member makes its group NaN."""
    index = group_index.to(drift_sq.device)
    num = torch.zeros(num_groups, dtype=torch.float64, device=drift_sq.device).index_add_(0, index, drift_sq)
    den = torch.zeros_like(num).index_add_(0, index, ref_sq.to(num))
    return torch.sqrt(safe_div(num, den))


def feature_drift(
    params: nn.Module | Mapping[str, Tensor],
    reference: nn.Module | Mapping[str, Tensor],
    group_by_module: bool = False,
) -> dict[str, Tensor]:
    r"""Relative distance of parameters from their reference (initial) values.

    $$
    \text{drift}(W) = \frac{\lVert W - W_{init}\rVert_F}{\lVert W_{init}\rVert_F},
    \qquad
    \text{drift}(\text{module}) = \sqrt{\frac{\sum_{W \in \text{module}} \lVert W - W_{init}\rVert_F^2}
    {\sum_{W \in \text{module}} \lVert W_{init}\rVert_F^2}}.
    $$

    Args:
        params: an ``nn.Module`` (its ``named_parameters()``) or a mapping of names to tensors; it
            must hold every reference name with the reference shape (extra names are ignored).
        reference: the initial parameters, likewise.
        group_by_module: one value per owning module (the name up to the last dot; ``"root"`` for
            top-level parameters) instead of one per parameter.

    Returns:
        ``{name: float64 scalar}`` in reference order; NaN where the reference norm is zero
        (e.g. a zero-initialised bias on its own).

    Examples:
        >>> import torch
        >>> reference = {"layer.weight": torch.ones(2, 2), "layer.bias": torch.zeros(2)}
        >>> params = {"layer.weight": torch.tensor([[1.0, 1.0], [1.0, 3.0]]), "layer.bias": torch.ones(2)}
        >>> {k: round(v.item(), 4) for k, v in feature_drift(params, reference).items()}
        {'layer.weight': 1.0, 'layer.bias': nan}
        >>> {k: round(v.item(), 4) for k, v in feature_drift(params, reference, group_by_module=True).items()}
        {'layer': 1.2247}
    """
    ref = _named_tensors("reference", reference)
    current = _named_tensors("params", params)
    _drift_check(current, ref)
    names, group_index = _drift_groups(list(ref), group_by_module)
    values = _drift_compute(_drift_sq(current, ref).cpu(), _reference_sq_norms(ref), group_index, len(names))
    return dict(zip(names, values.unbind(0)))
