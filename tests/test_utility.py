"""Utility suite against independent references: float64 numpy/scipy per token, slow Python loops."""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections import Counter
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax as np_log_softmax

import metrics_suite as ms
from metrics_suite import (
    MaskedCrossEntropy,
    NextTokenDivergence,
    PredictionChange,
    PredictionChangeReport,
    argmax_logits,
    patch_label_mask,
    patch_majority_label,
)
from metrics_suite.functional.utility import (
    DivergenceReduction,
    chunk_rows,
    masked_cross_entropy,
    next_token_divergence,
    prediction_change,
    token_divergences,
    top_k_support_mask,
)
from metrics_suite.registry import registered
from tests.helpers import (
    bad_inputs_and_arguments,
    inverted_cdf_quantile,
    names_the_argument,
    on_cpu,
    state_snapshot,
    states_equal,
    to_device,
)

# written out here (not imported) so that a change of the output keys or their order fails a test
FIRST_FOUR = ("jeffreys", "jensen_shannon", "total_variation", "squared_hellinger")
NAMES = (*FIRST_FOUR, "kl_clean_noisy", "kl_noisy_clean")
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- references
def ref_token(clean: Any, noisy: Any, support: Any = None) -> dict[str, float]:
    """Float64 divergences of one position (optionally restricted to the index set ``support``).

    Entries that are -inf in both inputs (probability 0 in both) are left out.
    """
    c, n = np.asarray(clean, dtype=np.float64), np.asarray(noisy, dtype=np.float64)
    keep = ~(np.isneginf(c) & np.isneginf(n))
    if support is not None:
        keep &= np.isin(np.arange(len(c)), sorted(support))
    c, n = c[keep], n[keep]
    lp, lq = np_log_softmax(c), np_log_softmax(n)
    p, q = np.exp(lp), np.exp(lq)
    return {
        "jeffreys": float(np.sum((p - q) * (lp - lq))),
        "jensen_shannon": float(jensenshannon(p, q) ** 2),  # natural log: squared JS distance
        "total_variation": float(0.5 * np.abs(p - q).sum()),
        "squared_hellinger": float(0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2)),
        "kl_clean_noisy": ref_kl(lp, lq),
        "kl_noisy_clean": ref_kl(lq, lp),
    }


def ref_kl(lp: np.ndarray, lq: np.ndarray) -> float:
    """KL(p‖q) = Σ p (log p − log q) from float64 log-probabilities (exp(lp) may underflow to 0 where
    the log-ratio is finite, so the logs, not ``rel_entr`` of rounded probabilities, decide)."""
    with np.errstate(invalid="ignore"):
        terms = np.where(np.isneginf(lp), 0.0, np.exp(lp) * (lp - lq))
    return float(np.nan_to_num(terms, nan=math.inf, posinf=math.inf).sum())


def hand_top_k(row: np.ndarray, k: int) -> set[int]:
    """The documented top-k set: every entry at least the k-th largest value (ties included), but not -inf."""
    kth = sorted(row.tolist(), reverse=True)[min(k, len(row)) - 1]
    return {i for i, v in enumerate(row.tolist()) if v >= kth and v > -math.inf}


def ref_metric(
    clean: torch.Tensor, noisy: torch.Tensor, mask: torch.Tensor | None, num_logits: int | None = None
) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]], dict[str, list[float]]]:
    """Slow loop: (sequence means, token means, per-sequence means, per-token values).

    ``top1_agreement`` (first argmax of clean == first argmax of noisy) is a token mean in both means.
    """
    c, n = clean.double().numpy(), noisy.double().numpy()
    batch, seq, _ = c.shape
    m = np.ones((batch, seq), dtype=bool) if mask is None else mask.numpy()
    per_seq: dict[str, list[float]] = {k: [] for k in NAMES}
    per_tok: dict[str, list[float]] = {k: [] for k in (*NAMES, "top1_agreement")}
    for b in range(batch):
        values: dict[str, list[float]] = {k: [] for k in NAMES}
        for t in range(seq):
            if not m[b, t]:
                continue
            support = None
            if num_logits is not None:
                support = hand_top_k(c[b, t], num_logits) | hand_top_k(n[b, t], num_logits)
            for k, v in ref_token(c[b, t], n[b, t], support).items():
                values[k].append(v)
                per_tok[k].append(v)
            per_tok["top1_agreement"].append(float(np.argmax(c[b, t]) == np.argmax(n[b, t])))
        if values[NAMES[0]]:
            for k in NAMES:
                per_seq[k].append(float(np.mean(values[k])))
    tok_mean = {k: float(np.mean(v)) if v else math.nan for k, v in per_tok.items()}
    seq_mean = {k: float(np.mean(v)) if v else math.nan for k, v in per_seq.items()}
    seq_mean["top1_agreement"] = tok_mean["top1_agreement"]
    return seq_mean, tok_mean, per_seq, per_tok


def as_floats(out: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in out.items()}


def assert_close(
    actual: dict[str, float], expected: dict[str, float], rtol: float, atol: float = 0.0
) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        if math.isnan(expected[k]):
            assert math.isnan(actual[k]), k
        else:
            assert actual[k] == pytest.approx(expected[k], rel=rtol, abs=atol), k


def logits(shape: tuple[int, ...], seed: int, scale: float = 2.0, noise: float = 0.8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    clean = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    noisy = clean + noise * torch.randn(*shape, generator=g, dtype=torch.float64)
    return clean.to(dtype), noisy.to(dtype)


def attention(batch: int, seq: int, seed: int, fully_masked: tuple[int, ...] = (1,)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, seq, generator=g) > 0.3
    mask[:, 0] = True
    for b in fully_masked:
        mask[b] = False
    return mask


# ---------------------------------------------------------------------------------------------- divergences
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_divergences_match_float64_reference(dtype: torch.dtype, device: torch.device) -> None:
    clean, noisy = logits((3, 7, 41), seed=0, dtype=dtype)
    out = on_cpu(token_divergences(*to_device((clean, noisy), device)))
    rtol, atol = (1e-10, 1e-14) if dtype == torch.float64 else (1e-4, 1e-7)
    for b in range(3):
        for t in range(7):
            expected = ref_token(clean[b, t].numpy(), noisy[b, t].numpy())
            assert_close({k: float(out[k][b, t]) for k in NAMES}, expected, rtol, atol)


def test_token_divergences_mask_leaves_nan_and_any_leading_shape() -> None:
    clean, noisy = logits((10, 13), seed=1)
    mask = torch.arange(10) % 3 != 0
    out = token_divergences(clean, noisy, attention_mask=mask)
    for i in range(10):
        for k in NAMES:
            if mask[i]:
                assert float(out[k][i]) == pytest.approx(ref_token(clean[i], noisy[i])[k], rel=1e-4, abs=1e-7)
            else:
                assert math.isnan(float(out[k][i]))


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_metric_reductions_match_slow_loop(reduction: DivergenceReduction, device: torch.device) -> None:
    clean, noisy = logits((5, 6, 29), seed=2)
    mask = attention(5, 6, seed=2, fully_masked=(1, 3))
    seq_mean, tok_mean, per_seq, per_tok = ref_metric(clean, noisy, mask)
    clean, noisy, mask = to_device((clean, noisy, mask), device)
    metric = NextTokenDivergence(reduction=reduction, with_stderr=True).to(device)
    metric.update(clean, noisy, mask)
    out = as_floats(metric.compute())
    expected = seq_mean if reduction == "sequence" else tok_mean
    samples = per_seq if reduction == "sequence" else per_tok
    for k in NAMES:
        expected[f"{k}_stderr"] = float(np.std(samples[k], ddof=1) / math.sqrt(len(samples[k])))
    # top-1 agreement is a token share whatever the reduction
    top1 = per_tok["top1_agreement"]
    expected["top1_agreement_stderr"] = float(np.std(top1, ddof=1) / math.sqrt(len(top1)))
    assert 0.0 < expected["top1_agreement"] < 1.0  # the data tells a token share from other shares
    assert_close(out, {k: expected[k] for k in out}, rtol=1e-4, atol=1e-8)
    assert len(out) == 2 * (len(NAMES) + 1)
    assert len(per_seq[NAMES[0]]) == 3  # the fully masked sequences do not count
    functional = as_floats(next_token_divergence(clean, noisy, mask, reduction=reduction))
    assert_close(functional, {k: expected[k] for k in (*NAMES, "top1_agreement")}, rtol=1e-4, atol=1e-8)


def test_top_k_matches_hand_built_support(device: torch.device) -> None:
    clean, noisy = logits((3, 4, 30), seed=3)
    mask = attention(3, 4, seed=3, fully_masked=())
    k = 4
    seq_mean, tok_mean, _, _ = ref_metric(clean, noisy, mask, num_logits=k)
    reductions: tuple[tuple[DivergenceReduction, dict[str, float]], ...] = (
        ("sequence", seq_mean),
        ("token", tok_mean),
    )
    on_device = to_device((clean, noisy, mask), device)
    for reduction, expected in reductions:
        metric = NextTokenDivergence(num_logits=k, reduction=reduction).to(device)
        metric.update(*on_device)
        assert_close(as_floats(metric.compute()), expected, rtol=1e-4, atol=1e-8)
    support = top_k_support_mask(on_device[1], on_device[0], k).cpu()
    per_token = on_cpu(token_divergences(on_device[0], on_device[1], num_logits=k))
    for b in range(3):
        for t in range(4):
            hand = hand_top_k(clean[b, t].numpy(), k) | hand_top_k(noisy[b, t].numpy(), k)
            assert set(support[b, t].nonzero().flatten().tolist()) == hand
            expected = ref_token(clean[b, t], noisy[b, t], hand)
            assert_close({n: float(per_token[n][b, t]) for n in NAMES}, expected, rtol=1e-4, atol=1e-8)


def test_top_k_with_a_row_of_equal_logits_matches_the_slow_loop() -> None:
    """A constant row makes its top-k set the whole vocabulary: the chunk then masks instead of gathering."""
    clean, noisy = logits((2, 5, 300), seed=22)
    clean[0, 1] = 0.5  # every token ties at the k-th place
    noisy[1, 3, :200] = 10.0  # 200 tokens tie at the top of the noisy row
    mask = attention(2, 5, seed=22, fully_masked=())
    for rows in (None, 1):  # one chunk holding normal and tied rows, and one row per chunk
        metric = NextTokenDivergence(
            num_logits=8, reduction="token", max_batch_size=rows, max_sequence_length=rows
        )
        metric.update(clean, noisy, mask)
        assert_close(as_floats(metric.compute()), ref_metric(clean, noisy, mask, 8)[1], rtol=1e-5)


def test_top_k_ties_are_all_included_whatever_the_vocabulary_order() -> None:
    # hand-built: the 2nd largest clean logit (3) is shared by 4 tokens, the noisy one by 0 and 4
    clean = torch.tensor([[3.0, 3.0, 3.0, 3.0, 0.0, 0.0]])
    noisy = torch.tensor([[3.0, 2.0, 1.0, 0.0, 3.0, 0.0]])
    assert top_k_support_mask(noisy, clean, 2).tolist() == [[True, True, True, True, True, False]]
    for order in ([0, 1, 2, 3, 4, 5], [1, 0, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]):
        out = token_divergences(clean[:, order], noisy[:, order], num_logits=2)
        expected = ref_token(clean[0], noisy[0], {0, 1, 2, 3, 4})
        assert_close({k: float(out[k][0]) for k in NAMES}, expected, rtol=1e-5)
    # bfloat16 logits tie often at the k-th place
    g = torch.Generator().manual_seed(21)
    clean32 = 2.0 * torch.randn(3, 6, 4000, generator=g)
    clean = clean32.bfloat16()
    noisy = (clean32 + 0.3 * torch.randn(3, 6, 4000, generator=g)).bfloat16()
    k = 64
    kth = clean.float().topk(k, -1).values[..., -1:]
    assert int(((clean.float() >= kth).sum(-1) > k).sum()) >= 10  # most positions have ties
    mask = attention(3, 6, seed=21, fully_masked=())
    metric = NextTokenDivergence(num_logits=k, reduction="token", max_sequence_length=4)
    metric.update(clean, noisy, mask)
    assert_close(as_floats(metric.compute()), ref_metric(clean.float(), noisy.float(), mask, k)[1], rtol=1e-4)
    perm = torch.randperm(4000, generator=g)
    per_token = token_divergences(clean, noisy, num_logits=k)
    permuted = token_divergences(clean[..., perm], noisy[..., perm], num_logits=k)
    support = top_k_support_mask(noisy, clean, k)
    assert torch.equal(top_k_support_mask(noisy[..., perm], clean[..., perm], k), support[..., perm])
    for name in NAMES:
        assert torch.allclose(permuted[name], per_token[name], rtol=1e-5, atol=0), name
    for b, t in ((0, 0), (1, 3), (2, 5)):
        hand = hand_top_k(clean[b, t].float().numpy(), k) | hand_top_k(noisy[b, t].float().numpy(), k)
        assert set(support[b, t].nonzero().flatten().tolist()) == hand
        expected = ref_token(clean[b, t].double(), noisy[b, t].double(), hand)
        assert_close({n: float(per_token[n][b, t]) for n in NAMES}, expected, rtol=1e-4)


def test_top_k_covering_the_vocabulary_is_the_full_distribution() -> None:
    clean, noisy = logits((2, 3, 11), seed=4)
    full = as_floats(next_token_divergence(clean, noisy))
    assert_close(as_floats(next_token_divergence(clean, noisy, num_logits=11)), full, rtol=1e-6)
    assert_close(as_floats(next_token_divergence(clean, noisy, num_logits=50)), full, rtol=1e-6)


@pytest.mark.parametrize("num_logits", [None, 5])
@pytest.mark.parametrize("limits", [(1, 1), (2, None), (None, 3), (3, 2), (1, 7)])
def test_chunking_does_not_change_results(
    num_logits: int | None, limits: tuple[int | None, int | None]
) -> None:
    clean, noisy = logits((4, 7, 23), seed=5)
    mask = attention(4, 7, seed=5)
    default = NextTokenDivergence(num_logits=num_logits, reduction="token")
    default.update(clean, noisy, mask)
    chunked = NextTokenDivergence(
        num_logits=num_logits, max_batch_size=limits[0], max_sequence_length=limits[1], reduction="token"
    )
    chunked.update(clean, noisy, mask)
    assert_close(as_floats(chunked.compute()), as_floats(default.compute()), rtol=1e-6)
    for a, b in zip(chunked.state_items(), default.state_items()):
        assert torch.allclose(a[1].double(), b[1].double(), rtol=1e-6, atol=0), a[0]


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ((None, None), 16),  # 2 MiB / (128 KiB per row)
        ((1, None), 16),  # one limit: the missing one is the full sequence, but within 2 MiB
        ((None, 2), 6),  # 3 sequences of 2 tokens: below the default, kept
        ((1, 4096), 4096),  # both limits: exactly what was asked
    ],
)
def test_chunk_rows_stays_bounded_when_one_limit_is_set(
    limits: tuple[int | None, int | None], expected: int
) -> None:
    # V = 32768 float32: one row is 128 KiB; B = 3 sequences of T = 4096 tokens
    assert chunk_rows(32768, torch.float32, 3, 4096, *limits) == expected


def test_batches_and_shards_give_one_pass_result() -> None:
    clean, noisy = logits((6, 5, 17), seed=6, dtype=torch.float64)
    mask = attention(6, 5, seed=6)
    for num_logits in (None, 3):
        whole = NextTokenDivergence(num_logits=num_logits)
        whole.update(clean, noisy, mask)
        parts = NextTokenDivergence(num_logits=num_logits)
        for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
            parts.update(clean[rows], noisy[rows], mask[rows])
        assert_close(as_floats(parts.compute()), as_floats(whole.compute()), rtol=1e-12)


def test_near_bounds_and_identical_logits() -> None:
    # nearly disjoint distributions: JS, TV and H^2 close to their upper bounds ln 2, 1, 1
    clean, noisy = logits((4, 16, 64), seed=7, scale=15.0, noise=20.0)
    out = token_divergences(clean, noisy)
    assert float(out["total_variation"].max()) > 0.999  # the data does reach the bounds
    for b in range(4):
        for t in range(16):
            expected = ref_token(clean[b, t], noisy[b, t])
            assert_close({k: float(out[k][b, t]) for k in NAMES}, expected, rtol=1e-5, atol=1e-7)
    same = token_divergences(clean, clean.clone())
    for k in NAMES:
        assert bool((same[k] == 0).all()), k  # exactly zero, not rounding noise
    for k in NAMES:  # top-k as well
        assert bool((token_divergences(clean, clean.clone(), num_logits=5)[k] == 0).all()), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("peak", [0.0, 20.0])  # 20: the top token holds ~0.9999 of the mass
@pytest.mark.parametrize("noise", [1e-2, 1e-3])
def test_near_identical_distributions_keep_relative_precision(
    noise: float, peak: float, dtype: torch.dtype
) -> None:
    clean, noisy = logits((4, 1000), seed=8, scale=2.0, noise=noise, dtype=torch.float64)
    clean[:, 0] += peak
    noisy[:, 0] += peak
    clean, noisy = clean.to(dtype), noisy.to(dtype)
    out = token_divergences(clean, noisy)
    for i in range(4):
        # float64 reference from the same rounded inputs
        expected = ref_token(clean[i].double(), noisy[i].double())
        for k in NAMES:
            assert float(out[k][i]) == pytest.approx(expected[k], rel=2e-3), (k, expected[k])


def test_extreme_logits_are_finite_and_correct() -> None:
    g = torch.Generator().manual_seed(9)
    clean = 1e4 * torch.sign(torch.randn(3, 4, 20, generator=g))
    noisy = 1e4 * torch.sign(torch.randn(3, 4, 20, generator=g))
    noisy[0, 0] = clean[0, 0]  # one identical position
    out = token_divergences(clean, noisy)
    for b in range(3):
        for t in range(4):
            expected = ref_token(clean[b, t], noisy[b, t])
            assert_close({k: float(out[k][b, t]) for k in NAMES}, expected, rtol=1e-5, atol=1e-7)
    metric = NextTokenDivergence()
    metric.update(clean, noisy)
    assert all(math.isfinite(v) for v in as_floats(metric.compute()).values())
    assert int(metric.nonfinite_count) == 0


def test_fully_masked_batch_gives_nan_and_single_token_its_value() -> None:
    clean, noisy = logits((2, 3, 9), seed=10)
    metric = NextTokenDivergence(with_stderr=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric.update(clean, noisy, torch.zeros(2, 3, dtype=torch.bool))
        assert all(math.isnan(v) for v in as_floats(metric.compute()).values())
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 2] = True
    expected = ref_token(clean[1, 2], noisy[1, 2])
    expected["top1_agreement"] = float(clean[1, 2].argmax() == noisy[1, 2].argmax())
    for reduction in ("sequence", "token"):
        metric = NextTokenDivergence(reduction=reduction)
        metric.update(clean, noisy, one)
        assert_close(as_floats(metric.compute()), expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    clean, noisy = logits((2, 5, 300), seed=11, dtype=dtype)
    clean[0, 0, :3] = torch.tensor([60000.0 if dtype == torch.float16 else 1e4, -1e4, 0.0], dtype=dtype)
    mask = attention(2, 5, seed=11, fully_masked=())
    metric = NextTokenDivergence(reduction="token")
    metric.update(clean, noisy, mask)
    # reference from the same (rounded) half-precision values, in float64
    _, expected, _, _ = ref_metric(clean.float(), noisy.float(), mask)
    out = as_floats(metric.compute())
    # the KL directions carry the absolute float32 rounding of the logit difference at the 6e4 logit
    # (ulp 0.004) undamped, where Jeffreys' larger mean hides it
    kl = ("kl_clean_noisy", "kl_noisy_clean")
    assert_close({k: out.pop(k) for k in kl}, {k: expected.pop(k) for k in kl}, rtol=1e-3)
    assert_close(out, expected, rtol=1e-4, atol=1e-7)
    out = token_divergences(clean, noisy)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in out.values())


def test_non_contiguous_logits() -> None:
    clean_tbv, noisy_tbv = logits((6, 3, 19), seed=12)
    clean, noisy = clean_tbv.transpose(0, 1), noisy_tbv.transpose(0, 1)  # [B, T, V], not viewable as [B*T, V]
    mask = attention(3, 6, seed=12)
    a, b = NextTokenDivergence(), NextTokenDivergence()
    a.update(clean, noisy, mask)
    b.update(clean.contiguous(), noisy.contiguous(), mask)
    assert_close(as_floats(a.compute()), as_floats(b.compute()), rtol=1e-6)
    ce_a, ce_b = MaskedCrossEntropy(), MaskedCrossEntropy()
    targets = torch.randint(0, 19, (3, 6), generator=torch.Generator().manual_seed(0))
    ce_a.update(clean.half(), targets, mask)
    ce_b.update(clean.half().contiguous(), targets, mask)
    assert_close(as_floats(ce_a.compute()), as_floats(ce_b.compute()), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_nonfinite_tokens_are_skipped_and_counted(reduction: DivergenceReduction) -> None:
    """One non-finite position drops that token only: its sequence keeps its finite tokens (invariant 10)."""
    clean, noisy = logits((4, 5, 13), seed=13)
    mask = attention(4, 5, seed=13, fully_masked=())
    mask[3, 4] = False
    mask[2, :3] = True
    bad = clean.clone()
    bad[2, 0, 5] = math.nan  # attended: token (2, 0) is skipped, sequence 2 keeps (2, 1), (2, 2), ...
    noisy_bad = noisy.clone()
    noisy_bad[2, 2, 0] = math.inf  # a second bad token of the same sequence, in the other input
    bad[3, 4, 0] = math.inf  # masked out: no effect
    metric = NextTokenDivergence(reduction=reduction, quantiles=(0.5, 1.0))
    metric.update(bad, noisy_bad, mask)
    finite_mask = mask.clone()
    finite_mask[2, 0] = finite_mask[2, 2] = False
    reference = NextTokenDivergence(reduction=reduction, quantiles=(0.5, 1.0))
    reference.update(clean, noisy, finite_mask)
    with pytest.warns(UserWarning, match="skipped 2 item"):
        assert_close(as_floats(metric.compute()), as_floats(reference.compute()), rtol=1e-12)
    assert int(metric.nonfinite_count) == 2
    # a sequence whose every attended token is bad leaves the sequence mean (not only its tokens)
    only_bad = clean.clone()
    only_bad[1, mask[1]] = math.nan
    metric = NextTokenDivergence(reduction=reduction)
    metric.update(only_bad, noisy, mask)
    empty_mask = mask.clone()
    empty_mask[1] = False
    reference = NextTokenDivergence(reduction=reduction)
    reference.update(clean, noisy, empty_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(as_floats(metric.compute()), as_floats(reference.compute()), rtol=1e-12)
    assert int(metric.nonfinite_count) == int(mask[1].sum())
    # cross-entropy: the same token-sized items
    targets = torch.randint(0, 13, (4, 5), generator=torch.Generator().manual_seed(1))
    ce, ce_reference = MaskedCrossEntropy(), MaskedCrossEntropy()
    ce.update(bad, targets, mask)
    ce_reference.update(clean, targets, finite_mask | (mask & ~torch.isfinite(noisy_bad).all(-1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(as_floats(ce.compute()), as_floats(ce_reference.compute()), rtol=1e-12)
    assert int(ce.nonfinite_count) == 1


def test_nonfinite_inputs_error_and_odd_rows() -> None:
    clean, noisy = logits((4, 5, 13), seed=13)
    mask = attention(4, 5, seed=13, fully_masked=())
    mask[3, 4] = False
    bad = clean.clone()
    bad[2, 0, 5] = math.nan
    strict = NextTokenDivergence(nan_strategy="error")
    before = state_snapshot(strict)
    with pytest.raises(ValueError, match="NaN or inf"):
        strict.update(bad, noisy, mask)
    assert states_equal(before, state_snapshot(strict))
    all_neg_inf, pos_inf, one_neg_inf = clean.clone(), clean.clone(), clean.clone()
    all_neg_inf[0, 0] = -math.inf
    pos_inf[0, 0, 0] = math.inf
    one_neg_inf[0, 0, 0] = -math.inf  # a banned token is valid
    for odd, skipped in ((all_neg_inf, 1), (pos_inf, 1), (one_neg_inf, 0)):
        metric = NextTokenDivergence()
        metric.update(odd, noisy, mask)
        assert int(metric.nonfinite_count) == skipped
        per_token = token_divergences(odd, noisy)
        assert all(math.isnan(float(v[0, 0])) == bool(skipped) for v in per_token.values())


def test_huge_finite_logits_are_valid() -> None:
    clean = torch.full((1, 1, 100), 1e37)  # finite, but a float32 row sum overflows
    clean[0, 0, 0] = 1.1e37
    noisy = clean.clone()
    noisy[0, 0, 1] = 1.2e37
    metric = NextTokenDivergence(nan_strategy="error")
    metric.update(clean, noisy)
    expected = ref_token(clean[0, 0].double(), noisy[0, 0].double())
    expected["top1_agreement"] = 0.0
    assert_close(as_floats(metric.compute()), expected, rtol=1e-6)
    ce = MaskedCrossEntropy(nan_strategy="error")
    ce.update(clean, torch.tensor([[1]]))
    reference = float(F.cross_entropy(clean[0].double(), torch.tensor([1])))
    assert float(ce.compute()["cross_entropy"]) == pytest.approx(reference, rel=1e-6)


def test_negative_inf_logits_are_valid() -> None:
    clean, noisy = logits((3, 4, 10), seed=22, dtype=torch.float64)
    clean[..., 9] = noisy[..., 9] = -math.inf  # banned in both: contributes 0
    clean[..., 7] = -math.inf  # banned in clean only: p = 0 < q
    clean[2, :, :6] = noisy[2, :, :6] = -math.inf  # fewer finite logits than k
    out = token_divergences(clean, noisy)
    top_k = token_divergences(clean, noisy, num_logits=5)
    for b in range(3):
        for t in range(4):
            expected = ref_token(clean[b, t], noisy[b, t])
            assert expected["jeffreys"] == math.inf and math.isfinite(expected["total_variation"])
            assert_close({k: float(out[k][b, t]) for k in NAMES}, expected, rtol=1e-10)
            support = hand_top_k(clean[b, t].numpy(), 5) | hand_top_k(noisy[b, t].numpy(), 5)
            expected = ref_token(clean[b, t], noisy[b, t], support)
            assert_close({k: float(top_k[k][b, t]) for k in NAMES}, expected, rtol=1e-10)
    # banned in one, underflowing in the other: p = q = 0 in floating point, yet KL(q || p) = inf
    hand = token_divergences(torch.tensor([0.0, -math.inf]), torch.tensor([0.0, -1e4]))
    assert {k: float(v) for k, v in hand.items()} == {
        "jeffreys": math.inf,
        "jensen_shannon": 0.0,
        "total_variation": 0.0,
        "squared_hellinger": 0.0,
        "kl_clean_noisy": 0.0,
        "kl_noisy_clean": math.inf,
    }
    clean[..., 7] = 0.0  # shared banned tokens only: every value finite
    metric = NextTokenDivergence(reduction="token", nan_strategy="error")
    metric.update(clean, noisy)
    assert_close(as_floats(metric.compute()), ref_metric(clean, noisy, None)[1], rtol=1e-10)


def test_update_from_super_batch_equals_update() -> None:
    clean, noisy = logits((3, 4, 15), seed=14)
    mask = attention(3, 4, seed=14)
    direct = NextTokenDivergence()
    direct.update(clean, noisy, mask)
    for super_mask in (mask, torch.cat([mask, mask])):
        metric = NextTokenDivergence()
        metric.update_from_super_batch(torch.cat([clean, noisy]), super_mask)
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(metric.state_items(), direct.state_items()))
    other = mask.clone()
    other[0] = False
    metric = NextTokenDivergence()
    metric.update_from_super_batch(
        torch.cat([clean, noisy]), torch.cat([mask, other])
    )  # attended in both halves
    both = NextTokenDivergence()
    both.update(clean, noisy, mask & other)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(metric.state_items(), both.state_items()))
    before = state_snapshot(metric)
    with pytest.raises(ValueError, match="even"):
        metric.update_from_super_batch(torch.cat([clean, noisy[:2]]), None)
    with pytest.raises(ValueError, match="attention_mask"):
        metric.update_from_super_batch(torch.cat([clean, noisy]), mask[:, :2])
    with pytest.raises(TypeError, match=r"`attention_mask` must be a torch\.Tensor, got list"):
        metric.update_from_super_batch(torch.cat([clean, noisy]), mask.tolist())  # type: ignore[arg-type]
    assert states_equal(before, state_snapshot(metric))


def test_constructor_arguments_are_validated() -> None:
    bad_divergence: tuple[dict[str, Any], ...] = (
        {"num_logits": 0},
        {"num_logits": True},  # bools and floats are not silently converted
        {"num_logits": 2.0},
        {"max_batch_size": -1},
        {"max_sequence_length": 1.5},
        {"reduction": "mean"},
    )
    for kwargs in bad_divergence:
        with pytest.raises(ValueError):
            NextTokenDivergence(**kwargs)
    for kwargs in ({"ignore_index": True}, {"ignore_index": -100.0}, {"max_batch_size": True}):
        with pytest.raises(ValueError):
            MaskedCrossEntropy(**kwargs)
    for kwargs in ({"num_classes": 3, "class_names": ["a", "b"]}, {"num_classes": 0}, {"num_classes": True}):
        with pytest.raises(ValueError):
            PredictionChange(**kwargs)
    with pytest.raises(ValueError, match=r"`class_names` must be distinct.*\['a'\]"):
        PredictionChange(num_classes=3, class_names=["a", "a", "b"])
    assert NextTokenDivergence(num_logits=4).num_logits == 4
    assert MaskedCrossEntropy(ignore_index=-100).ignore_index == -100


# ---------------------------------------------------------------------------------------------- cross-entropy
def ref_cross_entropy(logits_: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, ignore: int | None):
    x = logits_.double().numpy()
    values = [
        float(-np_log_softmax(x[b, t])[target[b, t]])
        for b in range(x.shape[0])
        for t in range(x.shape[1])
        if mask[b, t] and (ignore is None or int(target[b, t]) != ignore)
    ]
    return values


@pytest.mark.parametrize("ignore_index", [None, -100, 3])
def test_cross_entropy_matches_slow_loop(ignore_index: int | None, device: torch.device) -> None:
    x, _ = logits((4, 6, 21), seed=15, scale=3.0)
    g = torch.Generator().manual_seed(15)
    target = torch.randint(0, 21, (4, 6), generator=g)
    if ignore_index == -100:
        target[torch.rand(4, 6, generator=g) < 0.3] = -100
    mask = attention(4, 6, seed=15, fully_masked=(2,))
    values = ref_cross_entropy(x, target, mask, ignore_index)
    x, target, mask = to_device((x, target, mask), device)
    metric = MaskedCrossEntropy(ignore_index=ignore_index, with_stderr=True, max_sequence_length=2).to(device)
    metric.update(x, target, mask)
    out = as_floats(metric.compute())
    mean = float(np.mean(values))
    expected = {
        "cross_entropy": mean,
        "cross_entropy_stderr": float(np.std(values, ddof=1) / math.sqrt(len(values))),
        "perplexity": math.exp(mean),
    }
    assert_close(out, expected, rtol=1e-5)
    functional = as_floats(masked_cross_entropy(x, target, mask, ignore_index=ignore_index))
    assert_close(functional, {k: expected[k] for k in ("cross_entropy", "perplexity")}, rtol=1e-5)


def test_cross_entropy_extreme_and_empty() -> None:
    x = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]]])
    metric = MaskedCrossEntropy()
    metric.update(x, torch.tensor([[1, 2]]))
    assert float(metric.compute()["cross_entropy"]) == pytest.approx(2e4 / 2, rel=1e-6)
    empty = MaskedCrossEntropy(ignore_index=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        empty.update(x, torch.tensor([[0, 0]]))
        assert all(math.isnan(v) for v in as_floats(empty.compute()).values())


def test_cross_entropy_negative_inf_logits_follow_torch() -> None:
    x, _ = logits((3, 4, 7), seed=23, dtype=torch.float64)
    x[..., 6] = -math.inf  # banned token
    target = torch.randint(0, 6, (3, 4), generator=torch.Generator().manual_seed(23))
    metric = MaskedCrossEntropy(nan_strategy="error")
    metric.update(x, target)
    expected = float(F.cross_entropy(x.reshape(-1, 7), target.reshape(-1)))
    assert float(metric.compute()["cross_entropy"]) == pytest.approx(expected, rel=1e-12)
    target[1, 2] = 6  # a target the model rules out: infinite loss, counted like torch does
    assert float(F.cross_entropy(x.reshape(-1, 7), target.reshape(-1))) == math.inf
    metric = MaskedCrossEntropy(nan_strategy="error")
    metric.update(x, target)
    assert float(metric.compute()["cross_entropy"]) == math.inf
    assert float(masked_cross_entropy(x, target)["perplexity"]) == math.inf
    x[0, 0] = -math.inf  # no token possible: non-finite, skipped
    metric = MaskedCrossEntropy()
    metric.update(x, target)
    assert int(metric.nonfinite_count) == 1


def test_functional_forms_accept_logits_that_require_grad() -> None:
    clean, noisy = logits((2, 3, 11), seed=24)
    target = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(24))
    grad_clean, grad_noisy = clean.clone().requires_grad_(), noisy.clone().requires_grad_()
    pairs = (
        (token_divergences(grad_clean, grad_noisy), token_divergences(clean, noisy)),
        (
            next_token_divergence(grad_clean, grad_noisy, num_logits=3),
            next_token_divergence(clean, noisy, num_logits=3),
        ),
        (masked_cross_entropy(grad_clean, target), masked_cross_entropy(clean, target)),
    )
    for with_grad, plain in pairs:
        for k in plain:
            assert not with_grad[k].requires_grad  # documented: not differentiable
            assert torch.equal(with_grad[k], plain[k]), k
    expected = ref_token(clean[1, 2], noisy[1, 2])
    assert_close({k: float(pairs[0][0][k][1, 2]) for k in NAMES}, expected, rtol=1e-4, atol=1e-8)


def test_cross_entropy_ignores_out_of_range_ids_that_are_not_counted() -> None:
    x, _ = logits((2, 3, 5), seed=16)
    target = torch.tensor([[1, 7, -1], [2, 0, 4]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    metric = MaskedCrossEntropy()
    metric.update(x, target, mask)  # ids 7 and -1 sit at masked positions
    assert float(metric.compute()["cross_entropy"]) == pytest.approx(
        float(np.mean(ref_cross_entropy(x, target, mask, None))), rel=1e-5
    )


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("entry", [e for e in registered() if e.suite == "utility"], ids=lambda e: e.name)
def test_bad_inputs_raise_and_leave_state_unchanged(entry: Any) -> None:
    metric = entry.cls(**entry.example.init_kwargs)
    metric.update(**entry.example.make_batch(torch.Generator().manual_seed(0), 4))
    rejected = bad_inputs_and_arguments(entry)
    assert len(rejected) >= 4
    for changed, bad in rejected:
        before = state_snapshot(metric)
        with pytest.raises((ValueError, TypeError)) as err:
            metric.update(**bad)
        assert names_the_argument(str(err.value), changed, metric.update, bad), err.value
        assert states_equal(before, state_snapshot(metric))


def test_error_messages_name_argument_and_shapes() -> None:
    clean, noisy = logits((2, 3, 7), seed=17)
    metric = NextTokenDivergence()
    with pytest.raises(ValueError, match=r"`noisy_logits`.*\[2, 3, 7\].*\[2, 3, 8\]"):
        metric.update(clean, torch.cat([noisy, noisy[..., :1]], -1))
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \[2, 3\], got \[2, 4\]"):
        metric.update(clean, noisy, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`modified_preds` must hold class ids in \[0, 3\).*\[5\]"):
        PredictionChange(num_classes=3).update(torch.tensor([0, 1]), torch.tensor([5, 1]))
    with pytest.raises(TypeError, match="`original_preds` must be an integer tensor"):
        PredictionChange(num_classes=3).update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    for empty in (torch.zeros(2, 0), torch.zeros(2, 3, 0)):  # no vocabulary
        with pytest.raises(ValueError, match=r"`clean_logits` must be \[\.\.\., V\] with V >= 1, got \[2, "):
            token_divergences(empty, empty)
    with pytest.raises(ValueError, match=r"`clean_logits` .* got \[2, 3, 0\]"):
        metric.update(torch.zeros(2, 3, 0), torch.zeros(2, 3, 0))
    with pytest.raises(ValueError, match=r"`logits` .* got \[1, 2, 0\]"):
        MaskedCrossEntropy().update(torch.zeros(1, 2, 0), torch.zeros(1, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- prediction change
def slow_prediction_change(original: np.ndarray, modified: np.ndarray, num_classes: int):
    per_class = []
    for c in range(num_classes):
        orig_c = original == c
        n_orig = int(orig_c.sum())
        n_changed = int((orig_c & (modified != c)).sum())
        n_other = int((~orig_c).sum())
        n_other_changed = int((~orig_c & (modified != original)).sum())
        dist = {j: int((orig_c & (modified == j)).sum()) for j in range(num_classes) if j != c}
        per_class.append((n_orig, n_changed, n_other, n_other_changed, dist))
    target_ratios = [nc / no if no else 0.0 for no, nc, *_ in per_class]
    other_ratios = [noc / nt if nt else 0.0 for _, _, nt, noc, _ in per_class]
    totals = np.array([row[:4] for row in per_class]).sum(0)
    summary = {
        "target_change": totals[1] / totals[0],
        "other_change": totals[3] / totals[2],
        "target_change_std": float(np.std(target_ratios)),
        "other_change_std": float(np.std(other_ratios)),
    }
    return summary, per_class, target_ratios, other_ratios


def test_prediction_change_matches_slow_loop(device: torch.device) -> None:
    g = torch.Generator().manual_seed(18)
    original = torch.randint(0, 4, (6, 7), generator=g)  # class 4 never appears originally
    modified = torch.where(
        torch.rand(6, 7, generator=g) < 0.4, torch.randint(0, 5, (6, 7), generator=g), original
    )
    mask = torch.rand(6, 7, generator=g) > 0.2
    names = ["a", "b", "c", "d", "e"]
    metric = PredictionChange(num_classes=5, class_names=names).to(device)
    metric.update(*to_device((original[:2], modified[:2], mask[:2]), device))
    metric.update(
        original[2:].to(device, torch.int32),
        modified[2:].to(device, torch.uint8),
        mask[2:].to(device, torch.int64),
    )
    sel = mask.numpy()
    summary, per_class, target_ratios, other_ratios = slow_prediction_change(
        original.numpy()[sel], modified.numpy()[sel], 5
    )
    assert_close(as_floats(metric.compute()), summary, rtol=1e-12)
    functional = prediction_change(*to_device((original, modified), device), 5, mask.to(device))
    assert_close(as_floats(functional), summary, rtol=1e-12)
    for record, row, t_ratio, o_ratio in zip(metric.class_results(), per_class, target_ratios, other_ratios):
        assert (record.n_orig, record.n_changed, record.n_other, record.n_other_changed) == row[:4]
        assert record.change_distribution == {names[j]: n for j, n in row[4].items()}
        assert record.target_ratio == pytest.approx(t_ratio) and record.other_ratio == pytest.approx(o_ratio)
        assert record.class_name == names[record.class_id]
    assert metric.class_results()[4].n_orig == 0 and metric.class_results()[4].target_ratio == 0.0


def test_prediction_change_report_csv_row() -> None:
    metric = PredictionChange(num_classes=3)
    metric.update(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 0, 1]))
    report = metric.report("steer, v2", 0.5)
    rows = list(csv.reader(io.StringIO(PredictionChangeReport.csv_header() + "\n" + report.to_csv_row())))
    assert rows[0] == list(PredictionChangeReport.CSV_FIELDS)
    record = dict(zip(rows[0], rows[1]))
    assert record["method"] == "steer, v2"  # quoted, survives the comma
    assert float(record["intervention_scale"]) == 0.5 and int(record["num_items"]) == 6
    assert float(record["target_change"]) == pytest.approx(0.5)
    assert float(record["target_change_std"]) == pytest.approx(float(np.std([0.5, 0.0, 1.0])))
    assert float(record["other_change_std"]) == pytest.approx(float(np.std([2 / 4, 3 / 4, 1 / 4])))


def test_prediction_change_empty_is_nan() -> None:
    metric = PredictionChange(num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(math.isnan(v) for v in as_floats(metric.compute()).values())
        metric.update(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([False, False]))
        assert all(math.isnan(v) for v in as_floats(metric.compute()).values())


def test_argmax_and_patch_label_helpers() -> None:
    g = torch.Generator().manual_seed(19)
    x = torch.randn(3, 4, 6, generator=g)
    assert torch.equal(argmax_logits(x), torch.from_numpy(np.argmax(x.numpy(), -1)))
    assert torch.equal(argmax_logits(x, dim=1), torch.from_numpy(np.argmax(x.numpy(), 1)))
    labels = torch.randint(0, 3, (5, 7, 10), generator=g)
    labels[0, 0] = torch.tensor([2, 2, 2, 1, 1, 1, 0, 0, 0, 0])  # 4/10 of label 0
    labels[0, 1] = torch.tensor([2, 2, 2, 2, 2, 1, 1, 1, 1, 1])  # tie -> smallest label (1)
    label, share = patch_majority_label(labels)
    for idx in np.ndindex(5, 7):
        counts = Counter(labels[idx].tolist())
        best = max(counts.values())
        assert int(label[idx]) == min(k for k, v in counts.items() if v == best)
        assert float(share[idx]) == pytest.approx(best / 10)
    for threshold in (0.4, 0.5, 0.7):
        # exact rational comparison: a share of exactly `threshold` passes
        expected = np.array(
            [
                [
                    Fraction(max(Counter(labels[i, j].tolist()).values()), 10) >= Fraction(str(threshold))
                    for j in range(7)
                ]
                for i in range(5)
            ]
        )
        assert np.array_equal(patch_label_mask(labels, threshold).numpy(), expected)
    assert int(label[0, 1]) == 1 and bool(patch_label_mask(labels, 0.4)[0, 0])
    with pytest.raises(ValueError):
        patch_label_mask(labels, 1.5)


# ---------------------------------------------------------------------------------------------- collection
def test_utility_suite_routes_inputs() -> None:
    assert ms.available()["utility"] == ["next_token", "cross_entropy", "prediction_change"]
    col = ms.suite("utility", next_token={"num_logits": 4})
    assert "utility/prediction_change" not in col.keys(keep_base=True)
    clean, noisy = logits((2, 3, 9), seed=20)
    col.update(clean_logits=clean, noisy_logits=noisy, attention_mask=torch.ones(2, 3, dtype=torch.bool))
    col.update(logits=clean, target_ids=torch.zeros(2, 3, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = col.compute()
    expected = as_floats(next_token_divergence(clean, noisy, num_logits=4))
    for k in NAMES:
        assert float(out[f"utility/next_token/{k}"]) == pytest.approx(expected[k], rel=1e-6)
    assert float(out["utility/cross_entropy/cross_entropy"]) == pytest.approx(
        float(np.mean(ref_cross_entropy(clean, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), None))),
        rel=1e-6,
    )
    configured = ms.suite("utility", prediction_change={"num_classes": 3})
    configured.update(original_preds=torch.tensor([0, 1, 2]), modified_preds=torch.tensor([0, 2, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert float(configured.compute()["utility/prediction_change/target_change"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_jensen_shannon_of_disjoint_supports_stays_within_ln2(dtype: torch.dtype) -> None:
    clean = torch.tensor([[0.0, -math.inf]], dtype=dtype)
    noisy = torch.tensor([[-math.inf, 0.0]], dtype=dtype)
    js = token_divergences(clean, noisy)["jensen_shannon"].item()
    assert js <= LN2
    assert js == pytest.approx(LN2, rel=1e-6)


# ---------------------------------------------------------------------------------------------- KL, top-1, quantiles
def test_kl_directions_by_hand_and_their_sum_is_jeffreys() -> None:
    # p = (1/4, 3/4), q = (1/2, 1/2): KL(p‖q) = ¼ln½ + ¾ln(3/2), KL(q‖p) = ½ln2 + ½ln(2/3)
    clean = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    noisy = torch.zeros(1, 1, 2, dtype=torch.float64)
    metric = NextTokenDivergence()
    metric.update(clean, noisy)
    out = as_floats(metric.compute())
    assert out["kl_clean_noisy"] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-14)
    assert out["kl_noisy_clean"] == pytest.approx(0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0), rel=1e-14)
    assert out["top1_agreement"] == 0.0  # clean's top token is 1, noisy's first largest is 0
    # on random data, in float32, KL both ways add up to Jeffreys token by token
    clean, noisy = logits((3, 8, 57), seed=31, noise=1.5)
    per_token = token_divergences(clean, noisy)
    total = per_token["kl_clean_noisy"] + per_token["kl_noisy_clean"]
    torch.testing.assert_close(total, per_token["jeffreys"], rtol=1e-5, atol=0.0)
    assert not torch.allclose(per_token["kl_clean_noisy"], per_token["kl_noisy_clean"], rtol=1e-2)


def test_top1_agreement_is_a_token_share_for_both_reductions() -> None:
    """Sequence 0 has 1 of 1 attended token agreeing, sequence 1 has 1 of 3: token share 2/4, not (1 + 1/3)/2."""
    clean = torch.zeros(2, 3, 4)
    noisy = torch.zeros(2, 3, 4)
    clean[..., 2] = 1.0  # clean's top token is 2 everywhere
    noisy[..., 2] = 1.0
    noisy[1, 1:, 3] = 2.0  # noisy's top token moves at (1, 1) and (1, 2)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    for reduction in ("sequence", "token"):
        metric = NextTokenDivergence(reduction=reduction, with_stderr=True)
        metric.update(clean, noisy, mask)
        out = as_floats(metric.compute())
        assert out["top1_agreement"] == 0.5
        assert out["top1_agreement_stderr"] == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2.0, rel=1e-12)
    # ties: the first largest logit wins (torch.argmax), so a tie kept in both agrees
    tie = torch.tensor([[[1.0, 3.0, 3.0]]])
    metric = NextTokenDivergence()
    metric.update(tie, tie.flip(-1))  # [3, 3, 1]: first largest at 0, clean's at 1
    assert float(metric.compute()["top1_agreement"]) == 0.0


def _edge_case_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 logits [6, 40, 50] whose per-token divergences span zeros, ~1e-12, ordinary values,
    JS near ln 2 and Jeffreys near 1e3."""
    clean, noisy = logits((6, 40, 50), seed=41, noise=0.6, dtype=torch.float64)
    g = torch.Generator().manual_seed(42)
    scale = torch.exp(torch.empty(6, 40, 1, dtype=torch.float64).uniform_(-6.0, 1.0, generator=g))
    noisy = clean + (noisy - clean) * scale  # noise over 3 decades: divergences over 6
    noisy[0, :8] = clean[0, :8]  # exact zeros
    noisy[1, :8] = clean[1, :8] + 1e-6 * torch.randn(8, 50, generator=g, dtype=torch.float64)  # ~1e-12
    for t in range(8):  # nearly disjoint: JS → ln 2, TV and H² → 1, Jeffreys ≈ 2·gap ≤ 1e3
        gap = 100.0 + 50.0 * t
        clean[2, t] = 0.0
        noisy[2, t] = 0.0
        clean[2, t, 0] = noisy[2, t, 1] = gap
    mask = attention(6, 40, seed=43, fully_masked=(5,))
    mask[:3, :8] = True
    return clean, noisy, mask


def test_quantiles_match_numpy_within_relative_accuracy(device: torch.device) -> None:
    clean, noisy, mask = _edge_case_logits()
    on_device = to_device((clean, noisy, mask), device)
    levels = (0.0, 0.05, 0.1, 0.5, 0.9, 0.99, 1.0)
    alpha = 0.01
    metric = NextTokenDivergence(quantiles=levels, relative_accuracy=alpha, max_sequence_length=7).to(device)
    metric.update(*on_device)
    out = as_floats(metric.compute())
    per_token = on_cpu(token_divergences(*on_device[:2], attention_mask=on_device[2]))
    for name in NAMES:
        x = per_token[name][mask].numpy()
        assert x.size == int(mask.sum())
        exact = inverted_cdf_quantile(x, levels)
        keys = [f"{name}_p{100 * q:g}" for q in levels]
        for key, want in zip([*keys, f"{name}_max"], [*exact, x.max()]):
            got = out[key]
            if want <= 0.99e-12:  # the zero bucket: reported as exactly 0
                assert got == 0.0, (key, want)
            else:
                assert abs(got - want) <= alpha * want * (1 + 1e-9), (key, got, want)
    # the edge cases are in the data: zeros, ~1e-12, JS at ln 2, Jeffreys up to 1e3
    assert out["jeffreys_p0"] == 0.0
    assert 1e-13 < float(per_token["jeffreys"][1, :8].min()) < 1e-10
    assert float(per_token["jensen_shannon"].nan_to_num().max()) == pytest.approx(LN2, rel=1e-12)
    assert 700.0 < out["jeffreys_max"] < 1.01e3
    assert out["jensen_shannon_max"] == pytest.approx(LN2, rel=alpha)
    # a different α gives a different (still guaranteed) answer: the argument reaches the sketch
    coarse = NextTokenDivergence(quantiles=(0.5,), relative_accuracy=0.2).to(device)
    coarse.update(*on_device)
    exact = float(np.quantile(per_token["jeffreys"][mask].numpy(), 0.5, method="inverted_cdf"))
    got = float(coarse.compute()["jeffreys_p50"])
    assert abs(got - exact) <= 0.2 * exact and got != pytest.approx(out["jeffreys_p50"], rel=1e-3)


def test_quantiles_off_keep_outputs_and_on_add_keys_in_order() -> None:
    clean, noisy, mask = _edge_case_logits()
    off, on = NextTokenDivergence(), NextTokenDivergence(quantiles=(0.5, 0.9, 0.99))
    off.update(clean, noisy, mask)
    on.update(clean, noisy, mask)
    a, b = as_floats(off.compute()), as_floats(on.compute())
    assert list(a) == [*NAMES, "top1_agreement"]
    assert list(b)[: len(a)] == list(a) and all(b[k] == a[k] for k in a)
    assert list(b)[len(a) :] == [f"{n}_{s}" for n in NAMES for s in ("p50", "p90", "p99", "max")]
    assert "divergence_sketch" not in off.state_dict() and on.divergence_sketch.shape[0] == len(NAMES)
    # sketches merge exactly: two halves (and a merge_state) give the one-pass counts
    halves = [NextTokenDivergence(quantiles=(0.5,)) for _ in range(2)]
    halves[0].update(clean[:3], noisy[:3], mask[:3])
    halves[1].update(clean[3:], noisy[3:], mask[3:])
    halves[0].merge_state(halves[1])
    assert torch.equal(halves[0].divergence_sketch, on.divergence_sketch)


def test_quantile_arguments_are_validated() -> None:
    for bad in ((), (0.5, 1.5), "0.5", (True,), (float("nan"),)):
        with pytest.raises(ValueError, match="quantiles"):
            NextTokenDivergence(quantiles=bad)
    for bad in (0.0, 1.0, -0.1, float("inf"), True, "0.01"):
        with pytest.raises(ValueError, match="relative_accuracy"):
            NextTokenDivergence(quantiles=(0.5,), relative_accuracy=bad)
