r"""Functional forms of the utility suite: next-token divergences, masked cross-entropy, prediction change.

Next-token divergences and cross-entropy read the logits ``[..., V]`` one chunk of attended positions
at a time: the rows of a chunk are gathered into preallocated ``[chunk, V]`` buffers, so the extra
memory is ``O(chunk × V)`` whatever the batch and sequence sizes, and masked positions cost nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import torch
from torch import Tensor

from metrics_suite.functional._chunks import LOGIT_CHUNK_BYTES, row_slices
from metrics_suite.functional._masks import attended_positions, counted_targets, position_mask
from metrics_suite.functional._rows import RowGather
from metrics_suite.functional._sketch import SketchSpec, sketch_update
from metrics_suite.functional._stats import mean_output, mean_stats, safe_div
from metrics_suite.validation import (
    check_float,
    check_ids_in_range,
    check_integer,
    check_mask,
    check_ndim,
    check_same_shape,
    compute_dtype,
    ids_out_of_range,
    shape_str,
)

__all__ = [
    "argmax_logits",
    "masked_cross_entropy",
    "next_token_divergence",
    "patch_label_mask",
    "patch_majority_label",
    "prediction_change",
    "token_divergences",
    "top_k_support_mask",
]

#: Names of the next-token divergences, in the order of the ``[..., 6]`` value tensors.
DIVERGENCES = (
    "jeffreys",
    "jensen_shannon",
    "total_variation",
    "squared_hellinger",
    "kl_clean_noisy",
    "kl_noisy_clean",
)
#: Per-token values of the next-token pass: the divergences, then top-1 agreement (0 or 1).
TOKEN_VALUES = (*DIVERGENCES, "top1_agreement")
#: How per-token values are averaged: per sequence first, or over all tokens.
DivergenceReduction = Literal["sequence", "token"]

_LN2 = math.log(2.0)


@functools.cache
def _ln2_below(dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` not above ln 2 (float32 rounds ln 2 up: JS would exceed it)."""
    ln2 = torch.tensor(_LN2, dtype=dtype)
    return float(torch.nextafter(ln2, torch.zeros_like(ln2)) if float(ln2) > _LN2 else ln2)


# ---------------------------------------------------------------------------------------------- chunking
def chunk_rows(
    vocab_size: int,
    dtype: torch.dtype,
    batch_size: int,
    sequence_length: int,
    max_batch_size: int | None = None,
    max_sequence_length: int | None = None,
) -> int:
    """Number of positions (rows of ``V`` logits) processed at once.

    With neither limit set, a chunk is sized so that one ``[chunk, V]`` buffer of ``dtype`` takes
    about ``LOGIT_CHUNK_BYTES`` (2 MiB), which keeps the working set in cache. With both set, a chunk
    holds at most ``max_batch_size × max_sequence_length`` positions. With one set, the missing one
    means the full batch or sequence, but the chunk stays within the default size: ``max_batch_size=1``
    alone must not make a chunk of a whole 4096-token sequence at a 128k vocabulary (2 GiB per buffer).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    default = max(1, LOGIT_CHUNK_BYTES // max(1, vocab_size * itemsize))
    if max_batch_size is None and max_sequence_length is None:
        return default
    batch = min(max_batch_size or batch_size, batch_size)
    seq = min(max_sequence_length or sequence_length, sequence_length)
    if max_batch_size is None or max_sequence_length is None:
        return max(1, min(batch * seq, default))
    return max(1, batch * seq)


def _row_finite(x: Tensor) -> Tensor:
    """True per row of logits that define a distribution: no NaN, no +inf, not all −inf.

    A −inf logit (a banned token) is valid. The row maximum is NaN, +inf or −inf exactly in the
    three bad cases, and unlike a row sum it cannot overflow.
    """
    return torch.isfinite(x.amax(-1))


# ---------------------------------------------------------------------------------------------- divergences
def _divergences_from_logits(
    clean: Tensor, noisy: Tensor, p: Tensor, q: Tensor, s1: Tensor, s2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The divergences ``[n, 6]`` (in `DIVERGENCES` order) of the softmax distributions of logit rows ``[n, W]``.

    Also returns, from the row maxima it needs anyway, the finiteness of each row pair ``[n]`` (as
    `_row_finite`; values of non-finite rows are meaningless) and whether the two rows have
    their (first) largest logit at the same index ``[n]``.

    Per entry, with $M = \max(p, q)$ and $\delta = |\log p - \log q|$, every term is
    $M$ times a function of $\delta$ (take $p \ge q$, so $q = M e^{-\delta}$):

    $$
    (p - q)(\log p - \log q) = -M e \delta, \quad |p - q| = -M e, \quad
    \tfrac12(\sqrt p - \sqrt q)^2 = \tfrac12 M e_2^2, \quad
    \tfrac12\Big(p \log\frac{p}{m} + q \log\frac{q}{m}\Big) = -\tfrac12 M \big(u + \rho(u + \delta)\big),
    $$

    where $e_2 = \mathrm{expm1}(-\delta/2)$, $e = e^{-\delta} - 1 = e_2(e_2 + 2)$,
    $\rho = e^{-\delta} = 1 + e$ and $u = \mathrm{log1p}(e/2)$. $\log p - \log q$ comes straight
    from the logit difference, ``(clean − noisy) − Δlogsumexp``, so near-identical rows keep their
    relative precision (no ``p − q`` of rounded probabilities, no ``1 − Σ√(pq)``), identical rows give
    exactly 0, and rows with disjoint mass (logits of ±1e4) give finite values.

    The two KL directions use the Bregman form $\mathrm{KL}(p\,\|\,q) = \sum_v
    \big(p_v \log\frac{p_v}{q_v} - p_v + q_v\big)$ (the added $\sum (q - p)$ is 0), whose terms are
    all $\ge 0$, so nothing cancels in the sum: the entry with the larger probability contributes
    $M f(\delta)$, $f(\delta) = \delta + e \approx \delta^2/2$, the other $M g(\delta)$,
    $g(\delta) = -(e + \rho\delta) \approx \delta^2/2$; $f + g = -e\delta$ is the Jeffreys term,
    so the two directions add up to Jeffreys. A rounding error $\varepsilon$ of ``Δlogsumexp`` changes
    them only at second order (its first-order effects on the two kinds of entries cancel).

    Total variation is first order in $\delta$: an absolute rounding error $\varepsilon$ of
    ``Δlogsumexp`` (about one ulp of $\log \max p$) shifts every $\delta$ and would dominate the
    most probable entry of a peaked row. With the signed $\hat d_v = p_v - q_v$ computed as
    $-\operatorname{sign}(\log p_v - \log q_v)\, M_v e_v$, $\hat d_v \approx d_v - p_v \varepsilon$
    and $\sum_v d_v = 0$, so $\hat\varepsilon = -\sum_v \hat d_v$ measures the error and
    $\mathrm{TV} = \tfrac12 \sum_v |\hat d_v + M_v \hat\varepsilon|$ removes it (to first order).
    The other three are quadratic in $\delta$ for small $\delta$: there $\varepsilon$ only changes
    them by a relative $O(\varepsilon)$.

    An entry where both logits are −inf ($p = q = 0$) contributes 0. Where only one is, Jeffreys is
    +inf, and so is the KL direction whose second distribution is 0 there; the other KL and JS, TV,
    $H^2$ stay finite. Every input is used as scratch.
    """
    torch.softmax(clean, -1, out=p)
    torch.softmax(noisy, -1, out=q)
    (clean_max, clean_top), (noisy_max, noisy_top) = clean.max(-1, keepdim=True), noisy.max(-1, keepdim=True)
    finite = (torch.isfinite(clean_max) & torch.isfinite(noisy_max)).squeeze(-1)
    same_top = (clean_top == noisy_top).squeeze(-1)
    # logsumexp(x) = max(x) − log(max(softmax(x))): the largest probability is 1 / Σ exp(x − max)
    shift = (clean_max - noisy_max).sub_(p.amax(-1, keepdim=True).log_() - q.amax(-1, keepdim=True).log_())
    # log p − log q; NaN only where both logits are −inf: δ = 0 there, and M = 0 zeroes the terms
    log_ratio = torch.sub(clean, noisy, out=s1).sub_(shift).nan_to_num_(0.0, math.inf, -math.inf)
    delta = torch.abs(log_ratio, out=s2)
    big = torch.maximum(p, q, out=p)
    e2 = torch.mul(delta, -0.5, out=q).expm1_()
    e = torch.add(e2, 2.0, out=clean).mul_(e2)
    squared_hellinger = e2.square_().mul_(big).sum(-1).mul_(0.5)
    neg_abs_diff = torch.mul(big, e, out=noisy)  # −|p − q|
    # M = 0 with δ = inf (one −inf logit, the other underflowing) is still an infinite term
    jeffreys = torch.mul(neg_abs_diff, delta, out=q).sum(-1).neg_().nan_to_num_(math.inf, math.inf)
    # signed p − q, corrected by M·ε̂ with ε̂ = −Σ(p − q)
    diff = torch.copysign(neg_abs_diff, log_ratio, out=q)
    total_variation = diff.addcmul_(big, diff.sum(-1, keepdim=True), value=-1.0).abs_().sum(-1).mul_(0.5)
    kl_clean_noisy, kl_noisy_clean = _kl_pair(log_ratio, delta, big, e, q, noisy)
    u = torch.mul(e, 0.5, out=noisy).log1p_()
    rho = e.add_(1.0)
    # ρ = 0 where δ = inf: δ was clamped to a finite value, so ρ·(u + δ) stays 0 instead of 0·inf
    js_terms = u.addcmul_(rho, delta.add_(u)).mul_(big)
    jensen_shannon = js_terms.sum(-1).mul_(-0.5)
    values = torch.stack(
        [jeffreys, jensen_shannon, total_variation, squared_hellinger, kl_clean_noisy, kl_noisy_clean], dim=-1
    )
    upper = values.new_tensor([math.inf, _ln2_below(values.dtype), 1.0, 1.0, math.inf, math.inf])
    # rounding only (NaN stays NaN); adding 0.0 turns -0.0 into 0.0
    return torch.minimum(values.clamp_min_(0.0), upper).add_(0.0), finite, same_top


def _kl_pair(
    log_ratio: Tensor, delta: Tensor, big: Tensor, e: Tensor, f_out: Tensor, g_out: Tensor
) -> tuple[Tensor, Tensor]:
    """KL(p‖q) and KL(q‖p) ``[n]`` from the per-entry terms of `_divergences_from_logits`.

    ``f_out`` and ``g_out`` are scratch; ``delta`` is clamped to the largest finite value in place
    (so that ``ρ·δ`` is 0, not NaN, where δ = inf) and ``log_ratio`` is overwritten.

    Each entry takes ``f`` in one direction and ``g`` in the other, chosen by the sign of
    ``log p − log q``. ``lerp`` with a 0/1 weight returns either end exactly, like ``torch.where``,
    at a fraction of its cost on the CPU (``where`` is not vectorised there: about 20x a ``mul``).
    With δ clamped every term is finite; a row is infinite in the direction whose second
    distribution is 0 where the first is not (``log p − log q`` = +inf for KL(p‖q), −inf for
    KL(q‖p)), including where that first probability underflows to 0.
    """
    clean_larger = f_out.copy_(log_ratio >= 0)
    pq_infinite, qp_infinite = log_ratio.amax(-1) == math.inf, log_ratio.amin(-1) == -math.inf
    delta.clamp_max_(torch.finfo(delta.dtype).max)
    f = torch.add(delta, e, out=log_ratio)  # δ + e
    g = torch.add(e, 1.0, out=g_out).mul_(delta).add_(e).neg_()  # −(ρδ + e); 1 where δ was inf
    kl_pq = torch.lerp(g, f, clean_larger).mul_(big).sum(-1)
    kl_qp = torch.lerp(f, g, clean_larger, out=f_out).mul_(big).sum(-1)
    return kl_pq.masked_fill_(pq_infinite, math.inf), kl_qp.masked_fill_(qp_infinite, math.inf)


def _top_k_mask(x: Tensor, k: int) -> Tensor:
    """Bool mask ``[..., V]`` of the top-k set of each row of ``x`` (``k <= V``).

    The top-k set is every entry at least the k-th largest value, ties included, except −inf
    entries: it does not depend on the order of the vocabulary.
    """
    kth = x.topk(k, -1).values[..., -1:]
    return (x >= kth) & (x > -math.inf)


def _top_k_set(x: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """Indices ``[n, w]`` that cover the top-k set of each row (``k < V``), and a mask of those outside it.

    The set is that of `_top_k_mask`. When ties make a set wider than a quarter of the
    vocabulary (e.g. a row of equal logits), gathering would cost more than the whole row: then
    None, and the caller masks whole rows with `_top_k_mask` instead.
    """
    values, index = x.topk(k + 1, -1)
    kth = values[:, k - 1 : k]
    if bool(((values[:, k:] == kth) & (kth > -math.inf)).any()):  # a tie crosses the k-th place
        width = int((x >= kth).sum(-1).max())
        if 4 * width > x.shape[-1]:
            return None
        values, index = x.topk(width, -1, sorted=False)
    return index, (values < kth) | (values == -math.inf)


def _top_k_union(
    clean_set: tuple[Tensor, Tensor], noisy_set: tuple[Tensor, Tensor], vocab: int
) -> tuple[Tensor, Tensor]:
    """Sorted indices ``[n, w]`` of the union of both top-k sets, and a mask of entries to leave out.

    Left out: repeats, and padding (rows whose union is narrower than ``w``).
    """
    # entries outside their set get index V: sorted last, then dropped
    index = torch.cat([i.masked_fill_(out, vocab) for i, out in (clean_set, noisy_set)], -1)
    index = index.sort(-1).values
    drop = index == vocab
    drop[:, 1:] |= index[:, 1:] == index[:, :-1]
    return index.clamp_max_(vocab - 1), drop


def _top_k_chunk(clean: Tensor, noisy: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Divergences of rows restricted to (and renormalised on) the union of both top-k sets, and top-1 agreement.

    The union holds every largest logit of both rows, in vocabulary order: the first largest on the
    support is the first largest of the whole row.
    """
    clean_set, noisy_set = _top_k_set(clean, k), _top_k_set(noisy, k)
    if clean_set is None or noisy_set is None:
        # a very wide set: mask the whole rows instead of gathering (−inf outside the union)
        outside = ~(_top_k_mask(clean, k) | _top_k_mask(noisy, k))
        p, q, s1, s2 = (torch.empty_like(clean) for _ in range(4))
        values, _, same_top = _divergences_from_logits(
            clean.masked_fill_(outside, -math.inf), noisy.masked_fill_(outside, -math.inf), p, q, s1, s2
        )
        return values, same_top
    index, drop = _top_k_union(clean_set, noisy_set, clean.shape[-1])
    # −inf in both: a dropped entry contributes exactly 0
    support_clean = clean.gather(-1, index).masked_fill_(drop, -math.inf)
    support_noisy = noisy.gather(-1, index).masked_fill_(drop, -math.inf)
    p, q, s1, s2 = (torch.empty_like(support_clean) for _ in range(4))
    values, _, same_top = _divergences_from_logits(support_clean, support_noisy, p, q, s1, s2)
    return values, same_top


def _divergence_rows(
    clean_logits: Tensor,
    noisy_logits: Tensor,
    positions: Tensor,
    num_logits: int | None,
    rows: int,
) -> tuple[Tensor, Tensor]:
    """Per-token values ``[n, 7]`` (compute dtype) and row finiteness ``[n]``.

    The values are the divergences in `DIVERGENCES` order (NaN for non-finite rows), then the
    top-1 agreement (1.0 where both rows have their first largest logit at the same index, else 0.0).
    """
    vocab = clean_logits.shape[-1]
    dtype = torch.promote_types(compute_dtype(clean_logits), compute_dtype(noisy_logits))
    device = clean_logits.device
    n_rows = positions.numel()
    values = torch.empty(n_rows, len(TOKEN_VALUES), dtype=dtype, device=device)
    finite = torch.empty(n_rows, dtype=torch.bool, device=device)
    if n_rows == 0:
        return values, finite
    rows = min(rows, n_rows)
    top_k = num_logits if num_logits is not None and num_logits < vocab else None
    workspace = [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(2 if top_k else 6)]
    gather_clean = RowGather(clean_logits, dtype, rows)
    gather_noisy = RowGather(noisy_logits, dtype, rows)
    for part in row_slices(positions.numel(), rows):
        start, chunk = part.start, positions[part]
        n = chunk.numel()
        clean = gather_clean(chunk, workspace[0][:n])
        noisy = gather_noisy(chunk, workspace[1][:n])
        if top_k is None:
            p, q, s1, s2 = (b[:n] for b in workspace[2:])
            out, ok, same_top = _divergences_from_logits(clean, noisy, p, q, s1, s2)
        else:
            ok = _row_finite(clean) & _row_finite(noisy)
            out, same_top = _top_k_chunk(clean, noisy, top_k)
        finite[start : start + n] = ok
        values[start : start + n, :-1] = out.masked_fill_(~ok[:, None], math.nan)
        values[start : start + n, -1] = same_top
    return values, finite


def _check_vocabulary(name: str, logits: Tensor) -> None:
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"`{name}` must be [..., V] with V >= 1, got {shape_str(logits.shape)}")


def _check_logits_pair(clean_logits: Tensor, noisy_logits: Tensor) -> None:
    check_float("clean_logits", clean_logits)
    check_float("noisy_logits", noisy_logits)
    check_ndim("clean_logits", clean_logits, 3)
    check_same_shape("noisy_logits", noisy_logits, "clean_logits", clean_logits)
    _check_vocabulary("clean_logits", clean_logits)


def _check_num_logits(num_logits: int | None) -> None:
    if num_logits is not None and (
        isinstance(num_logits, bool) or not isinstance(num_logits, int) or num_logits < 1
    ):
        raise ValueError(f"`num_logits` must be a positive int or None, got {num_logits!r}")


@dataclasses.dataclass(frozen=True)
class TokenValues:
    """Per-token values of one batch of next-token logits, before ``nan_strategy`` is applied.

    Attributes:
        values: ``[n, 7]`` for the ``n`` attended tokens (`TOKEN_VALUES` order, compute dtype).
        finite: ``[n]`` bool, False where a token's logits hold NaN or +inf, or are all −inf.
        sequence: ``[n]`` int64, the sequence (batch row) of each token.
        batch: number of sequences ``B``.
    """

    values: Tensor
    finite: Tensor
    sequence: Tensor
    batch: int


def _next_token_update(
    clean_logits: Tensor,
    noisy_logits: Tensor,
    attention_mask: Tensor | None = None,
    num_logits: int | None = None,
    max_batch_size: int | None = None,
    max_sequence_length: int | None = None,
    validate: bool = True,
) -> TokenValues:
    """Per-token divergences and top-1 agreement of one batch of ``[B, T, V]`` logits."""
    if validate:
        _check_logits_pair(clean_logits, noisy_logits)
        _check_num_logits(num_logits)
    batch, seq, vocab = clean_logits.shape
    if validate and attention_mask is not None:
        check_mask("attention_mask", attention_mask, (batch, seq))
    positions = attended_positions(attention_mask, (batch, seq), clean_logits.device)
    dtype = torch.promote_types(compute_dtype(clean_logits), compute_dtype(noisy_logits))
    rows = chunk_rows(vocab, dtype, batch, seq, max_batch_size, max_sequence_length)
    values, finite = _divergence_rows(clean_logits, noisy_logits, positions, num_logits, rows)
    sequence = torch.div(positions, max(seq, 1), rounding_mode="floor")
    return TokenValues(values, finite, sequence, batch)


def _kept_float64(values: Tensor, keep: Tensor) -> Tensor:
    """``values`` in float64 with the rows not in ``keep`` set to 0 (so a skipped NaN adds nothing)."""
    keep = keep.reshape(-1, *([1] * (values.ndim - 1)))
    return torch.where(keep, values.to(torch.float64), 0.0)


def _next_token_stats(tokens: TokenValues, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Sequence-level ``[6, 3]`` and token-level ``[7, 3]`` mean statistics of the tokens in ``keep``.

    Sequence level: (n, Σx, Σx²) of the per-sequence means x of each divergence, over sequences with
    at least one kept token. Token level: (n, Σx, Σx²) over kept tokens of every per-token value.
    """
    values = _kept_float64(tokens.values, keep)
    weights = keep.to(torch.float64)
    token_stats = mean_stats(values, weights[:, None])
    zeros = torch.zeros(tokens.batch, len(DIVERGENCES), dtype=torch.float64, device=values.device)
    sums = zeros.index_add(0, tokens.sequence, values[:, : len(DIVERGENCES)])
    counts = torch.zeros(tokens.batch, dtype=torch.float64, device=values.device)
    counts = counts.index_add(0, tokens.sequence, weights)
    valid = counts > 0
    means = torch.where(valid[:, None], sums / counts.clamp_min(1.0)[:, None], 0.0)
    sequence_stats = mean_stats(means, valid.to(torch.float64)[:, None])
    return sequence_stats, token_stats


def _next_token_sketch(tokens: TokenValues, keep: Tensor, spec: SketchSpec) -> Tensor:
    """Sketch counts ``[6, spec.num_buckets]`` of each divergence over the tokens in ``keep``."""
    divergences = tokens.values[:, : len(DIVERGENCES)].T
    return sketch_update(divergences, spec, weights=keep, batch_dims=1, validate=False)


def _next_token_compute(stats: Tensor, token_stats: Tensor, with_stderr: bool = False) -> dict[str, Tensor]:
    """``{divergence: mean}`` from ``[6, 3]`` mean statistics, then ``top1_agreement`` from the token level.

    NaN where nothing was counted. With ``with_stderr`` each mean is followed by its ``{name}_stderr``.
    """
    out: dict[str, Tensor] = {}
    for name, divergence_stats in zip(DIVERGENCES, stats.unbind(0)):
        out.update(mean_output(divergence_stats, name, with_stderr))
    out.update(mean_output(token_stats[-1], "top1_agreement", with_stderr))
    return out


def token_divergences(
    clean_logits: Tensor,
    noisy_logits: Tensor,
    attention_mask: Tensor | None = None,
    num_logits: int | None = None,
) -> dict[str, Tensor]:
    r"""The next-token divergences at every position of ``[..., V]`` logits.

    With $p = \mathrm{softmax}(\text{clean})$, $q = \mathrm{softmax}(\text{noisy})$ and
    $m = (p + q)/2$, per position (natural log):

    $$
    J = \sum_v (p_v - q_v)(\log p_v - \log q_v), \qquad
    JS = \tfrac12 \mathrm{KL}(p\,\|\,m) + \tfrac12 \mathrm{KL}(q\,\|\,m),
    $$

    $$
    TV = \tfrac12 \sum_v |p_v - q_v|, \qquad
    H^2 = \tfrac12 \sum_v (\sqrt{p_v} - \sqrt{q_v})^2 = 1 - \sum_v \sqrt{p_v q_v},
    $$

    and the two KL directions, ``kl_clean_noisy`` $= \mathrm{KL}(p\,\|\,q) = \sum_v p_v \log(p_v/q_v)$
    and ``kl_noisy_clean`` $= \mathrm{KL}(q\,\|\,p)$, whose sum is $J$.

    With ``num_logits=k`` both distributions are restricted to the union of the top-k sets of
    both inputs at that position ([`top_k_support_mask`][metrics_suite.functional.utility.top_k_support_mask]: ties at the k-th place included) and
    renormalised on it. Computed in log space in at least float32, one chunk of positions at a time.

    A −inf logit (a banned token) is valid: a token that is −inf in both inputs contributes 0, one
    that is −inf in only one makes Jeffreys +inf and the KL direction whose second distribution is 0
    there (JS, TV, H² and the other KL stay finite). A position whose
    logits hold NaN or +inf, or are all −inf, gives NaN. The inputs are detached: the result is
    not differentiable. Known limit: the log-ratio is formed from the logit difference, so when the
    largest clean and noisy logits of a position are far apart (about 1e4 in float32, where the
    distributions are nearly disjoint) its rounding costs relative precision (about 1e-4 there,
    growing with the gap); float64 inputs push the limit out.

    Args:
        clean_logits: logits ``[..., V]`` of the clean model.
        noisy_logits: logits of the transformed model, same shape.
        attention_mask: bool ``[...]``; positions where it is False are not computed (NaN).
        num_logits: k of the top-k sets, or None for the full vocabulary.

    Returns:
        ``{"jeffreys", "jensen_shannon", "total_variation", "squared_hellinger", "kl_clean_noisy",
        "kl_noisy_clean"}``, each ``[...]`` (float32, float64 for float64 inputs).

    Examples:
        >>> import math, torch
        >>> clean = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, -math.inf]])
        >>> noisy = torch.tensor([[0.0, 2.0, 1.0], [1.0, 2.0, -math.inf]])
        >>> out = token_divergences(clean, noisy)
        >>> tuple(round(v, 4) for v in out["total_variation"].tolist())
        (0.4205, 0.2311)
        >>> tuple(round(v, 4) for v in out["jensen_shannon"].tolist())
        (0.101, 0.0285)
        >>> tuple(round(v, 4) for v in out["squared_hellinger"].tolist())
        (0.103, 0.0287)
    """
    check_float("clean_logits", clean_logits)
    check_float("noisy_logits", noisy_logits)
    check_same_shape("noisy_logits", noisy_logits, "clean_logits", clean_logits)
    _check_vocabulary("clean_logits", clean_logits)
    _check_num_logits(num_logits)
    lead = clean_logits.shape[:-1]
    if attention_mask is not None:
        check_mask("attention_mask", attention_mask, lead)
    positions = attended_positions(attention_mask, lead, clean_logits.device)
    dtype = torch.promote_types(compute_dtype(clean_logits), compute_dtype(noisy_logits))
    rows = chunk_rows(clean_logits.shape[-1], dtype, 1, 1)
    values, _ = _divergence_rows(clean_logits, noisy_logits, positions, num_logits, rows)
    full = torch.full((math.prod(lead), len(DIVERGENCES)), math.nan, dtype=dtype, device=values.device)
    full[positions] = values[:, : len(DIVERGENCES)]
    return {name: full[:, i].reshape(lead) for i, name in enumerate(DIVERGENCES)}


def top_k_support_mask(noisy_logits: Tensor, clean_logits: Tensor, num_logits: int) -> Tensor:
    """Bool mask ``[..., V]`` of the union of the top-``num_logits`` sets of both inputs per position.

    The top-k set of a position holds every entry at least its k-th largest logit, so ties at the
    k-th place are all included (the set may exceed k), and no −inf entry (probability 0). It does
    not depend on the order of the vocabulary.

    The only function here with the noisy logits first: it keeps the signature of the seed code it
    replaces, so existing calls (positional ones included) keep working. The union is symmetric, so
    swapping the arguments gives the same mask.

    Args:
        noisy_logits: logits ``[..., V]``.
        clean_logits: logits of the same shape.
        num_logits: k (``>= V`` selects every entry above −inf).

    Examples:
        >>> import torch
        >>> top_k_support_mask(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 2.0, 3.0]), 1)
        tensor([ True, False, False,  True])
        >>> top_k_support_mask(torch.tensor([3.0, 2.0, 2.0, 0.0]), torch.tensor([3.0, 1.0, 0.0, 0.0]), 2)  # a tie
        tensor([ True,  True,  True, False])
    """
    check_float("noisy_logits", noisy_logits)
    check_float("clean_logits", clean_logits)
    check_same_shape("clean_logits", clean_logits, "noisy_logits", noisy_logits)
    _check_num_logits(num_logits)
    _check_vocabulary("noisy_logits", noisy_logits)
    k = min(num_logits, noisy_logits.shape[-1])
    return _top_k_mask(noisy_logits, k) | _top_k_mask(clean_logits, k)


def next_token_divergence(
    clean_logits: Tensor,
    noisy_logits: Tensor,
    attention_mask: Tensor | None = None,
    num_logits: int | None = None,
    reduction: DivergenceReduction = "sequence",
    max_batch_size: int | None = None,
    max_sequence_length: int | None = None,
) -> dict[str, Tensor]:
    r"""Mean next-token divergences between clean and noisy logits ``[B, T, V]``.

    Per-token values as in [`token_divergences`][metrics_suite.functional.utility.token_divergences]. ``reduction="sequence"`` averages over the
    attended tokens of each sequence, then over sequences (a sequence without attended tokens does
    not count); ``"token"`` averages over all attended tokens. ``top1_agreement`` is the share of
    attended tokens whose clean and noisy argmax agree, a token share for either reduction. No attended
    token gives NaN, and so does a non-finite position ([`NextTokenDivergence`][metrics_suite.utility.NextTokenDivergence]
    can skip such tokens instead). Not differentiable (the inputs are detached).

    Examples:
        >>> import torch
        >>> clean = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
        >>> noisy = torch.tensor([[[0.5, 0.5, 2.0], [1.0, 1.0, 1.0]], [[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> out = next_token_divergence(clean, noisy, mask)
        >>> round(out["total_variation"].item(), 4)  # mean of (0.0904 + 0)/2 and 0.6805
        0.3629
        >>> round(next_token_divergence(clean, noisy, mask, reduction="token")["total_variation"].item(), 4)
        0.257
    """
    if reduction not in ("sequence", "token"):
        raise ValueError(f"`reduction` must be 'sequence' or 'token', got {reduction!r}")
    tokens = _next_token_update(
        clean_logits, noisy_logits, attention_mask, num_logits, max_batch_size, max_sequence_length
    )
    sequence_stats, token_stats = _next_token_stats(tokens, torch.ones_like(tokens.finite))
    stats = sequence_stats if reduction == "sequence" else token_stats[: len(DIVERGENCES)]
    return _next_token_compute(stats, token_stats)


# ---------------------------------------------------------------------------------------------- cross-entropy
def _cross_entropy_check(
    logits: Tensor, target_ids: Tensor, attention_mask: Tensor | None, ignore_index: int | None
) -> Tensor:
    """Validate the inputs; return the bool mask of tokens that count (attended, not ignored)."""
    check_float("logits", logits)
    check_ndim("logits", logits, 3)
    _check_vocabulary("logits", logits)
    check_integer("target_ids", target_ids)
    batch, seq, vocab = logits.shape
    if tuple(target_ids.shape) != (batch, seq):
        raise ValueError(
            f"`target_ids` must have shape {shape_str((batch, seq))} (the [B, T] of `logits` "
            f"{shape_str(logits.shape)}), got {shape_str(target_ids.shape)}"
        )
    if attention_mask is not None:
        check_mask("attention_mask", attention_mask, (batch, seq))
    selected = counted_targets(target_ids, attention_mask, ignore_index)
    check_ids_in_range(
        "target_ids",
        target_ids,
        vocab,
        "token ids",
        "the vocabulary of `logits`) at attended, non-ignored positions",
        selected=selected,
    )
    return selected


def _cross_entropy_update(
    logits: Tensor,
    target_ids: Tensor,
    attention_mask: Tensor | None = None,
    ignore_index: int | None = None,
    max_batch_size: int | None = None,
    max_sequence_length: int | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Token cross-entropies of one batch.

    Returns:
        ``nats`` ``[n]`` of the ``n`` counted tokens (compute dtype) and ``finite`` ``[n]`` (False
        where a token's logits hold NaN or +inf, or are all −inf).
    """
    if validate:
        selected = _cross_entropy_check(logits, target_ids, attention_mask, ignore_index)
    else:
        selected = counted_targets(target_ids, attention_mask, ignore_index)
    batch, seq, vocab = logits.shape
    positions = attended_positions(selected, (batch, seq), selected.device)
    dtype = compute_dtype(logits)
    rows = min(
        chunk_rows(vocab, dtype, batch, seq, max_batch_size, max_sequence_length), max(1, positions.numel())
    )
    targets = target_ids.reshape(-1)[positions].to(torch.long)
    nats = torch.empty(positions.numel(), dtype=dtype, device=logits.device)
    finite = torch.empty(positions.numel(), dtype=torch.bool, device=logits.device)
    if positions.numel():
        x_buffer = torch.empty(rows, vocab, dtype=dtype, device=logits.device)
        log_probs = torch.empty_like(x_buffer)
        gather = RowGather(logits, dtype, rows)
        for part in row_slices(positions.numel(), rows):
            start, chunk = part.start, positions[part]
            n = chunk.numel()
            x = gather(chunk, x_buffer[:n])
            finite[start : start + n] = _row_finite(x)
            lp = torch.log_softmax(x, -1, out=log_probs[:n])
            nats[start : start + n] = lp.gather(-1, targets[start : start + n, None]).squeeze(-1).neg_()
    return nats, finite


def _cross_entropy_stats(nats: Tensor, keep: Tensor) -> Tensor:
    """Token mean statistics ``[3]`` = (n, Σ nats, Σ nats²) of the tokens in ``keep``."""
    return mean_stats(_kept_float64(nats, keep), keep.to(torch.float64))


def _cross_entropy_compute(stats: Tensor, with_stderr: bool = False) -> dict[str, Tensor]:
    """``cross_entropy`` (plus ``cross_entropy_stderr``) and ``perplexity`` from ``[3]`` mean statistics."""
    out = mean_output(stats, "cross_entropy", with_stderr)
    out["perplexity"] = out["cross_entropy"].exp()
    return out


def masked_cross_entropy(
    logits: Tensor,
    target_ids: Tensor,
    attention_mask: Tensor | None = None,
    ignore_index: int | None = None,
) -> dict[str, Tensor]:
    r"""Token-mean cross-entropy (nats) and perplexity of ``[B, T, V]`` logits against ``[B, T]`` targets.

    $$
    \mathrm{CE} = \frac{1}{|S|}\sum_{(b,t) \in S} -\log \mathrm{softmax}(z_{b,t})_{y_{b,t}},
    \qquad \mathrm{PPL} = e^{\mathrm{CE}},
    $$

    over the set $S$ of attended positions whose target is not ``ignore_index``.
    ``target_ids[b, t]`` is the token that ``logits[b, t]`` predicts (shift labels yourself).

    As in [`torch.nn.functional.cross_entropy`](https://docs.pytorch.org/docs/stable/generated/torch.nn.functional.cross_entropy.html), −inf logits are valid and a target whose logit
    is −inf has an infinite loss (so the mean is +inf); a position whose logits hold NaN or +inf, or
    are all −inf, makes the result NaN. Not differentiable (the inputs are detached).

    Examples:
        >>> import torch
        >>> logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        >>> out = masked_cross_entropy(logits, torch.tensor([[0, 2]]))
        >>> round(out["cross_entropy"].item(), 4), round(out["perplexity"].item(), 4)
        (0.8955, 2.4485)
        >>> round(masked_cross_entropy(logits, torch.tensor([[0, -100]]), ignore_index=-100)["cross_entropy"].item(), 4)
        0.2395
    """
    nats, finite = _cross_entropy_update(logits, target_ids, attention_mask, ignore_index)
    return _cross_entropy_compute(_cross_entropy_stats(nats, torch.ones_like(finite)))


# ---------------------------------------------------------------------------------------------- prediction change
def _prediction_change_check(
    original_preds: Tensor, modified_preds: Tensor, num_classes: int, mask: Tensor | None
) -> Tensor:
    """Validate the inputs; return the bool selection mask."""
    check_integer("original_preds", original_preds)
    check_integer("modified_preds", modified_preds)
    check_same_shape("modified_preds", modified_preds, "original_preds", original_preds)
    if mask is not None:
        check_mask("mask", mask, original_preds.shape)
    selected = position_mask(mask, original_preds.shape, original_preds.device)
    out = ids_out_of_range(original_preds, num_classes, selected) | ids_out_of_range(
        modified_preds, num_classes, selected
    )
    if not bool(out.any()):
        return selected  # one read-back for both arguments; the messages below only on failure
    for name, preds in (("original_preds", original_preds), ("modified_preds", modified_preds)):
        check_ids_in_range(
            name,
            preds,
            num_classes,
            "class ids",
            f"num_classes={num_classes}) at selected items",
            selected=selected,
        )
    return selected


def _prediction_change_update(
    original_preds: Tensor,
    modified_preds: Tensor,
    num_classes: int,
    mask: Tensor | None = None,
    validate: bool = True,
) -> Tensor:
    """Count matrix ``[C, C]`` (int64): entry ``[i, j]`` counts selected items that went from class i to j."""
    selected = (
        _prediction_change_check(original_preds, modified_preds, num_classes, mask)
        if validate
        else position_mask(mask, original_preds.shape, original_preds.device)
    )
    # counted with weights 0/1 into a fixed size: a boolean-mask gather or bincount would read a
    # size back from the device; unselected items point at pair 0 with weight 0
    pairs = original_preds.to(torch.long) * num_classes + modified_preds.to(torch.long)
    pairs = torch.where(selected, pairs, 0).reshape(-1)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=pairs.device)
    return counts.index_add(0, pairs, selected.reshape(-1).to(torch.int64)).view(num_classes, num_classes)


def _prediction_change_per_class(counts: Tensor) -> dict[str, Tensor]:
    """Per-class counts and ratios ``[C]`` from the count matrix (ratios are 0.0 without support)."""
    counts = counts.to(torch.int64)
    n_orig = counts.sum(1)
    n_changed = n_orig - counts.diagonal()
    total, total_changed = n_orig.sum(), n_changed.sum()
    n_other = total - n_orig
    n_other_changed = total_changed - n_changed
    f64 = torch.float64
    target_ratio = torch.where(n_orig > 0, n_changed.to(f64) / n_orig.clamp_min(1).to(f64), 0.0)
    other_ratio = torch.where(n_other > 0, n_other_changed.to(f64) / n_other.clamp_min(1).to(f64), 0.0)
    return {
        "n_orig": n_orig,
        "n_changed": n_changed,
        "n_other": n_other,
        "n_other_changed": n_other_changed,
        "target_ratio": target_ratio,
        "other_ratio": other_ratio,
    }


def _prediction_change_compute(counts: Tensor) -> dict[str, Tensor]:
    per_class = _prediction_change_per_class(counts)
    f64 = {k: v.to(torch.float64) for k, v in per_class.items()}
    empty = f64["n_orig"].sum() == 0
    nan = torch.tensor(math.nan, dtype=torch.float64, device=counts.device)
    return {
        "target_change": safe_div(f64["n_changed"].sum(), f64["n_orig"].sum()),
        "other_change": safe_div(f64["n_other_changed"].sum(), f64["n_other"].sum()),
        "target_change_std": torch.where(empty, nan, f64["target_ratio"].std(correction=0)),
        "other_change_std": torch.where(empty, nan, f64["other_ratio"].std(correction=0)),
    }


def prediction_change(
    original_preds: Tensor, modified_preds: Tensor, num_classes: int, mask: Tensor | None = None
) -> dict[str, Tensor]:
    r"""How often predictions change class after an intervention, overall and per original class.

    For class $c$: $n^{orig}_c$ items originally predicted $c$, of which
    $n^{chg}_c$ are no longer $c$; $n^{oth}_c$ items originally not $c$, of
    which $n^{oth,chg}_c$ changed class. Then

    $$
    \text{target\_change} = \frac{\sum_c n^{chg}_c}{\sum_c n^{orig}_c}, \qquad
    \text{other\_change} = \frac{\sum_c n^{oth,chg}_c}{\sum_c n^{oth}_c},
    $$

    and ``*_std`` is the population standard deviation over classes of the per-class ratios
    $n^{chg}_c / n^{orig}_c$ and $n^{oth,chg}_c / n^{oth}_c$ (0.0 for a class without
    support). Both aggregate ratios equal the overall share of changed items when
    ``num_classes > 1``; the standard deviations tell whether some classes move more than others.

    Examples:
        >>> import torch
        >>> before = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> after = torch.tensor([0, 1, 1, 1, 0, 1])
        >>> out = prediction_change(before, after, num_classes=3)
        >>> {k: round(v.item(), 4) for k, v in out.items()}
        {'target_change': 0.5, 'other_change': 0.5, 'target_change_std': 0.4082, 'other_change_std': 0.2041}
    """
    return _prediction_change_compute(
        _prediction_change_update(original_preds, modified_preds, num_classes, mask)
    )


def argmax_logits(logits: Tensor, dim: int = -1) -> Tensor:
    """Predicted class ids (int64): the argmax of ``logits`` along ``dim``.

    Examples:
        >>> import torch
        >>> argmax_logits(torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]]))
        tensor([1, 0])
    """
    check_float("logits", logits)
    return logits.argmax(dim=dim)


def patch_majority_label(pixel_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Most frequent label of each patch ``[..., P]`` and the fraction of pixels holding it.

    Ties go to the smallest label.

    Examples:
        >>> import torch
        >>> label, share = patch_majority_label(torch.tensor([[3, 3, 1, 3], [2, 5, 5, 2]]))
        >>> label, share
        (tensor([3, 2]), tensor([0.7500, 0.5000]))
    """
    check_integer("pixel_labels", pixel_labels)
    label, count = _patch_majority_count(pixel_labels)
    return label, count.to(torch.float32) / pixel_labels.shape[-1]


def _patch_majority_count(pixel_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Majority label of each patch ``[..., P]`` and the number of its pixels."""
    if pixel_labels.ndim == 0 or pixel_labels.shape[-1] == 0:
        raise ValueError(
            f"`pixel_labels` must be [..., P] with P >= 1 pixels, got {shape_str(pixel_labels.shape)}"
        )
    ordered = pixel_labels.reshape(-1, pixel_labels.shape[-1]).to(torch.long).sort(-1).values
    # count of each pixel's label = size of its run in the sorted patch
    run = torch.searchsorted(ordered, ordered, right=True) - torch.searchsorted(ordered, ordered)
    best = run.argmax(-1, keepdim=True)  # first maximum: the smallest label among ties
    label = ordered.gather(-1, best).squeeze(-1).reshape(pixel_labels.shape[:-1])
    count = run.gather(-1, best).squeeze(-1).reshape(pixel_labels.shape[:-1])
    return label, count


def patch_label_mask(pixel_labels: Tensor, threshold: float) -> Tensor:
    """Bool ``[...]``: patches ``[..., P]`` where at least ``threshold`` of the pixels share one label.

    Use it as the ``mask`` of [`PredictionChange`][metrics_suite.utility.PredictionChange] to count only patches
    with a clear label; [`patch_majority_label`][metrics_suite.functional.utility.patch_majority_label] gives that label.

    Examples:
        >>> import torch
        >>> patch_label_mask(torch.tensor([[3, 3, 1, 3], [2, 5, 5, 2]]), threshold=0.75)
        tensor([ True, False])
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"`threshold` must be a number in (0, 1], got {threshold!r}")
    check_integer("pixel_labels", pixel_labels)
    _, count = _patch_majority_count(pixel_labels)
    # float64 count / P is the double nearest the exact share, so a share of exactly `threshold` passes
    return count.to(torch.float64) / pixel_labels.shape[-1] >= threshold
