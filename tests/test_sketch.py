"""The quantile sketch against numpy.quantile, at the range edges, and as a mergeable sum state."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics_suite.functional import _sketch
from metrics_suite.functional._sketch import (
    SketchSpec,
    check_quantiles,
    quantile_key,
    sketch_max,
    sketch_outputs,
    sketch_quantile,
    sketch_state_shape,
    sketch_update,
)
from tests.helpers import inverted_cdf_quantile

LEVELS = (0.0, 0.01, 0.5, 0.9, 0.99, 1.0)
LN2 = math.log(2.0)


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="np.quantile(weights=) is numpy 2")
@pytest.mark.parametrize("weighted", [False, True])
def test_exact_reference_is_numpy_weighted_inverted_cdf(weighted: bool) -> None:
    rng = np.random.default_rng(9)
    levels = (*LEVELS, 0.07, 0.3, 0.55, 0.999)
    for n in (1, 2, 7, 100, 1001):
        x = 10.0 ** rng.uniform(-6.0, 2.0, n)
        w = rng.exponential(1.0, n) if weighted else np.ones(n)
        want = np.quantile(x, levels, method="inverted_cdf", weights=w)
        np.testing.assert_array_equal(inverted_cdf_quantile(x, levels, w if weighted else None), want)


def _violations(est: np.ndarray, exact: np.ndarray, alpha: float) -> list[tuple[float, float]]:
    """(estimate, exact) pairs outside relative error α (float64 rounding allowed); zeros must be exact."""
    bad = []
    for e, x in zip(est.ravel().tolist(), exact.ravel().tolist()):
        ok = e == x if x == 0 or math.isinf(x) else abs(e - x) <= alpha * x * (1 + 1e-12)
        if not ok:
            bad.append((e, x))
    return bad


def _samples(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "log_uniform":  # sixteen decades, the whole default range
        return 10.0 ** rng.uniform(-12.0, 4.0, n)
    if kind == "exponential":
        return rng.exponential(0.05, n)
    if kind == "with_zeros":
        return np.where(rng.random(n) < 0.3, 0.0, rng.exponential(1.0, n))
    if kind == "near_ln2":  # Jensen–Shannon of nearly disjoint distributions
        return LN2 * (1.0 - 10.0 ** rng.uniform(-9.0, -1.0, n))
    if kind == "jeffreys":  # up to 1e3
        return 10.0 ** rng.uniform(-3.0, 3.0, n)
    raise AssertionError(kind)


KINDS = ("log_uniform", "exponential", "with_zeros", "near_ln2", "jeffreys")


def _check_against_numpy(kind: str, alpha: float) -> list[tuple[float, float]]:
    rng = np.random.default_rng([KINDS.index(kind), round(1e6 * alpha)])
    spec = SketchSpec(relative_accuracy=alpha)
    bad = []
    for n in (1, 2, 3, 7, 100, 1000, 4099):
        x = _samples(kind, n, rng)
        est = sketch_quantile(sketch_update(torch.from_numpy(x), spec), LEVELS, spec).numpy()
        bad += _violations(est, inverted_cdf_quantile(x, LEVELS), alpha)
        bad += _violations(
            sketch_max(sketch_update(torch.from_numpy(x), spec), spec).numpy(), x.max(keepdims=True), alpha
        )
    return bad


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.001])
@pytest.mark.parametrize("kind", KINDS)
def test_quantiles_within_relative_accuracy_of_numpy(kind: str, alpha: float) -> None:
    assert _check_against_numpy(kind, alpha) == []


def test_bound_check_detects_a_floor_bucket_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    # floor(log_γ x) puts x in [γ^i, γ^(i+1)), where 2γ^i/(γ+1) underestimates by α to ~3α
    monkeypatch.setattr(_sketch, "_bucket_index", lambda x, log_gamma: torch.floor(torch.log(x) / log_gamma))
    assert len(_check_against_numpy("log_uniform", 0.01)) > 20


def test_quantile_definition_is_inverted_cdf_not_lower_or_linear() -> None:
    # values spaced 10% apart, so neighbouring items are more than 2α apart
    x = 1e-3 * 1.1 ** np.arange(100.0)
    spec = SketchSpec()
    counts = sketch_update(torch.from_numpy(x), spec)
    levels = (0.07, 0.3, 0.55, 0.999)
    est = sketch_quantile(counts, levels, spec).numpy()
    assert _violations(est, inverted_cdf_quantile(x, levels), 0.01) == []
    # hand-computed ranks: smallest k with k/100 >= q, item x[k - 1]
    assert _violations(est, x[[6, 29, 54, 99]], 0.01) == []
    for other in ("lower", "linear", "higher"):
        assert _violations(est, np.quantile(x, levels, method=other), 0.01) != []
    # numpy's unweighted inverted_cdf rounds 100 * 0.07 up to the 8th item; the sketch keeps the 7th
    assert np.quantile(x, 0.07, method="inverted_cdf") == x[7]


def test_bucket_position_is_ceil_log_gamma() -> None:
    spec = SketchSpec()
    rng = np.random.default_rng(1)
    x = 10.0 ** rng.uniform(-12.0, 4.0, 2000)
    log_gamma = math.log((1 + 0.01) / (1 - 0.01))
    index = [math.log(v) / log_gamma for v in x.tolist()]
    keep = [abs(i - round(i)) > 1e-6 for i in index]  # away from bucket edges, where rounding may differ
    expected_index = [math.ceil(i) for i, k in zip(index, keep) if k]
    min_index = math.ceil(math.log(1e-12) / log_gamma)
    positions = sketch_update(torch.from_numpy(x[keep]), spec, batch_dims=1).argmax(-1)
    assert positions.tolist() == [i - min_index + 1 for i in expected_index]
    # representatives 2γ^i/(γ+1), and the buckets' count independently of the class
    gamma = 1.01 / 0.99
    reps = spec.representatives()
    assert reps[0] == 0 and reps[-1] == math.inf
    assert reps[1:-1].numpy() == pytest.approx(
        [2 * gamma**i / (gamma + 1) for i in range(min_index, 462)], rel=1e-13
    )
    assert spec.num_buckets == math.ceil(math.log(1e4) / log_gamma) - min_index + 3 == 1845


def test_range_edges() -> None:
    spec = SketchSpec()
    levels = (0.0, 0.5, 1.0)

    def est(values: list[float]) -> list[float]:
        counts = sketch_update(torch.tensor(values, dtype=torch.float64), spec)
        return [*sketch_quantile(counts, levels, spec).tolist(), sketch_max(counts, spec).item()]

    assert est([0.0, 0.0, 0.0]) == [0.0, 0.0, 0.0, 0.0]
    # below the bucket of min_value, γ^-1382 = 0.9901e-12 (and rounding-noise negatives): reported 0
    assert est([-1e-9, 3e-13, 9.9e-13]) == [0.0, 0.0, 0.0, 0.0]
    for values in (
        [1e-12] * 3,
        [9.91e-13, 1e-12, 1.01e-12],  # the first regular bucket, partly below min_value
        [1e4] * 3,
        [1e4, 1.01e4, 1.0100168e4],  # the last regular bucket ends at γ^461 = 1.01001681e4
        [LN2, LN2 * (1 - 1e-12), LN2 * (1 - 1e-7)],
        [1e3, 999.0, 1.0],
    ):
        exact = [*np.quantile(values, levels, method="inverted_cdf").tolist(), max(values)]
        assert _violations(np.array(est(values)), np.array(exact), 0.01) == []
    # exact bucket edges γ^i (computed in float64, so either neighbour bucket): still within α
    edges = (1.01 / 0.99) ** np.arange(-1381.0, 462.0, 37.0)
    counts = sketch_update(torch.from_numpy(edges), spec, batch_dims=1)
    assert _violations(sketch_max(counts, spec).numpy(), edges, 0.01) == []


def test_overflow_bucket_reports_inf_and_keeps_lower_quantiles() -> None:
    spec = SketchSpec()
    x = np.array([0.5, 1.0, 2.0, 1.0100169e4, 1e6, math.inf])  # three above the last bucket, γ^461
    counts = sketch_update(torch.from_numpy(x), spec)
    assert counts[-1] == 3
    est = sketch_quantile(counts, (0.0, 0.5, 0.51, 1.0), spec).numpy()
    assert _violations(est[:2], np.array([0.5, 2.0]), 0.01) == []
    assert est[2:].tolist() == [math.inf, math.inf]
    assert sketch_max(counts, spec).item() == math.inf
    # +inf (Jeffreys of a token banned in one model only) matches numpy exactly
    assert np.quantile(x, 1.0, method="inverted_cdf") == math.inf


def test_empty_sketch_is_nan() -> None:
    spec = SketchSpec()
    counts = sketch_update(
        torch.tensor([[0.1, 0.2], [0.3, 0.4]]), spec, torch.tensor([[True, True], [False, False]]), 1
    )
    assert counts[1].sum() == 0
    q = sketch_quantile(counts, (0.0, 0.5, 1.0), spec)
    assert torch.isnan(q[1]).all() and not torch.isnan(q[0]).any()
    assert torch.isnan(sketch_max(counts, spec)[1]) and not torch.isnan(sketch_max(counts, spec)[0])
    assert torch.isnan(sketch_quantile(torch.zeros(spec.num_buckets), 0.5, spec))


def test_weights_and_masks_match_numpy_weighted() -> None:
    spec = SketchSpec()
    rng = np.random.default_rng(2)
    x = 10.0 ** rng.uniform(-6.0, 2.0, 3001)
    w = rng.exponential(1.0, 3001)
    counts = sketch_update(torch.from_numpy(x), spec, torch.from_numpy(w))
    assert counts.dtype == torch.float64
    assert counts.sum().item() == pytest.approx(w.sum(), rel=1e-12)
    assert (
        _violations(sketch_quantile(counts, LEVELS, spec).numpy(), inverted_cdf_quantile(x, LEVELS, w), 0.01)
        == []
    )
    mask = rng.random(3001) < 0.4
    for as_mask in (torch.from_numpy(mask), torch.from_numpy(mask.astype(np.int64))):
        counts = sketch_update(torch.from_numpy(x), spec, as_mask)
        assert counts.dtype == torch.int64 and counts.sum() == mask.sum()
        assert (
            _violations(
                sketch_quantile(counts, LEVELS, spec).numpy(), inverted_cdf_quantile(x[mask], LEVELS), 0.01
            )
            == []
        )


def test_a_batch_of_sketches_equals_one_sketch_each() -> None:
    # the metric's layout: per-token divergences [N, 4], masked tokens NaN, one sketch per divergence
    spec = SketchSpec()
    rng = np.random.default_rng(3)
    tokens = torch.from_numpy(np.stack([_samples(k, 500, rng) for k in KINDS[1:]], axis=1))
    attended = torch.from_numpy(rng.random(500) < 0.8)
    tokens[~attended] = math.nan
    counts = sketch_update(tokens.T, spec, attended, batch_dims=1)
    assert counts.shape == sketch_state_shape(spec, (4,)) == (4, 1845)
    for d in range(4):
        single = sketch_update(tokens[attended, d], spec)
        assert torch.equal(counts[d], single)
        est = sketch_quantile(counts, LEVELS, spec)[d].numpy()
        assert _violations(est, inverted_cdf_quantile(tokens[attended, d].numpy(), LEVELS), 0.01) == []
    out = sketch_outputs(counts, spec, (0.5, 0.9, 0.99), ("a", "b", "c", "d"))
    assert list(out) == [f"{n}_{s}" for n in "abcd" for s in ("p50", "p90", "p99", "max")]
    assert out["c_p90"] == sketch_quantile(counts[2], 0.9, spec)
    assert out["d_max"] == sketch_max(counts[3], spec)


def test_empty_shapes_give_empty_or_zero_counts() -> None:
    spec = SketchSpec()
    assert torch.equal(sketch_update(torch.zeros(0), spec), torch.zeros(1845, dtype=torch.int64))
    assert sketch_update(torch.zeros(0, 5), spec, batch_dims=1).shape == (0, 1845)
    assert sketch_update(torch.zeros(3, 0), spec, batch_dims=1).sum() == 0
    assert sketch_update(torch.tensor(0.5), spec).sum() == 1
    assert sketch_quantile(torch.zeros(0, 1845), (0.5, 0.9), spec).shape == (0, 2)


def test_low_precision_inputs_sketch_their_float64_values() -> None:
    spec = SketchSpec()
    x = torch.tensor([0.0, 1e-5, 0.3, LN2, 7.0, 900.0])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        low = x.to(dtype)
        assert torch.equal(sketch_update(low, spec), sketch_update(low.to(torch.float64), spec))


finite_or_edge = st.one_of(
    st.floats(min_value=0.0, max_value=1e6, allow_subnormal=True),
    st.sampled_from([0.0, 1e-12, 9.9e-13, 1e4, 1.01e4, 1.02e4, math.inf, -1e-10, LN2]),
)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(finite_or_edge, min_size=0, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=5),
    seed=st.integers(0, 2**16),
)
def test_any_split_merges_exactly(values: list[float], cuts: list[int], seed: int) -> None:
    spec = SketchSpec()
    x = torch.tensor(values, dtype=torch.float64)
    mask = torch.rand(len(values), generator=torch.Generator().manual_seed(seed)) < 0.7
    order = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
    x, mask = x[order], mask[order]  # any order
    bounds = [0, *sorted(min(c, len(values)) for c in cuts), len(values)]
    whole = sketch_update(x, spec, mask)
    parts = sum(sketch_update(x[a:b], spec, mask[a:b]) for a, b in itertools.pairwise(bounds))
    assert torch.equal(whole, parts)
    assert whole.sum() == mask.sum()
    # and the merged sketch's quantiles are the exact ones within α
    if mask.any():
        exact = inverted_cdf_quantile(x[mask].numpy(), LEVELS)
        # below the first regular bucket reports 0, above the last one inf
        lower, upper = spec.gamma ** (spec.min_index - 1), spec.gamma**spec.max_index
        expected = np.where(exact <= lower, 0.0, np.where(exact > upper, math.inf, exact))
        assert _violations(sketch_quantile(parts, LEVELS, spec).numpy(), expected, 0.01) == []


def test_bad_input_names_the_argument() -> None:
    for kwargs, word in [
        ({"relative_accuracy": True}, "relative_accuracy"),
        ({"relative_accuracy": 0.0}, "relative_accuracy"),
        ({"relative_accuracy": 1.0}, "relative_accuracy"),
        ({"relative_accuracy": math.nan}, "relative_accuracy"),
        ({"relative_accuracy": "0.01"}, "relative_accuracy"),
        ({"min_value": 0.0}, "min_value"),
        ({"min_value": math.inf}, "min_value"),
        ({"max_value": 1e-13}, "max_value"),
    ]:
        with pytest.raises(ValueError, match=word):
            SketchSpec(**kwargs)
    spec = SketchSpec()
    x = torch.rand(3, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="values"):
        sketch_update(torch.ones(3, dtype=torch.int64), spec)
    with pytest.raises(TypeError, match="spec"):
        sketch_update(x, 0.01)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`weights` must broadcast .* \[3, 5\], got \[3\]"):
        sketch_update(x, spec, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights"):
        sketch_update(x, spec, -torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights"):
        sketch_update(x, spec, torch.full((5,), 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="device"):
        sketch_update(x, spec, torch.ones(5, dtype=torch.bool, device="meta"))
    for bad in (3, -1, True):
        with pytest.raises(ValueError, match="batch_dims"):
            sketch_update(x, spec, batch_dims=bad)
    nan = torch.tensor([0.1, math.nan])
    with pytest.raises(ValueError, match="NaN"):
        sketch_update(nan, spec)
    assert sketch_update(nan, spec, torch.tensor([True, False])).sum() == 1
    counts = sketch_update(x, spec)
    with pytest.raises(ValueError, match=r"counts.*\[\.\.\., 1845\].*\[10\]"):
        sketch_quantile(torch.zeros(10), 0.5, spec)
    for bad_q in (1.5, -0.1, math.nan, True, "0.5", ()):
        with pytest.raises(ValueError, match="quantiles"):
            sketch_quantile(counts, bad_q, spec)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one sketch per name"):
        sketch_outputs(counts, spec, (0.5,), ("a", "b"))
    assert check_quantiles((0.5, 1)) == (0.5, 1.0)
    assert quantile_key(0.999) == "p99.9"
