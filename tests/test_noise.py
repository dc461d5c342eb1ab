"""Noise suite: NoiseStatistics and noise_statistics against a per-position numpy reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import metrics_suite as ms
from metrics_suite import NoiseStatistics
from metrics_suite.functional import noise as functional_noise
from metrics_suite.functional import noise_statistics
from metrics_suite.functional.noise import NOISE_STATISTICS
from tests.helpers import on_cpu, to_device


def _reference(x: np.ndarray, mu: np.ndarray, eps: np.ndarray, dim: int) -> dict[str, np.ndarray]:
    """Per-position statistics by a slow loop over positions, float64; NaN where undefined."""
    x, mu, eps = (np.moveaxis(np.broadcast_to(a, x.shape).astype(np.float64), dim, -1) for a in (x, mu, eps))
    positions = x.shape[:-1]
    out = {name: np.empty(positions) for name in NOISE_STATISTICS}

    def div(a: float, b: float) -> float:
        return a / b if b != 0 else math.nan

    for pos in np.ndindex(*positions):
        xi, mi, ei = x[pos], mu[pos], eps[pos]
        si = mi + ei
        nx, nm, ne, ns = (math.sqrt(float(v @ v)) for v in (xi, mi, ei, si))
        values = [
            nx,
            nm,
            ne,
            ns,
            div(nm, nm + ne),
            div(nm, ne),
            div(float(xi @ mi), nx * nm),
            div(ns, nx + ns),
            div(ns, nx),
            div(float(xi @ si), nx * ns),
        ]
        for name, value in zip(NOISE_STATISTICS, values):
            out[name][pos] = value
    return out


def _data(g: torch.Generator, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(shape, generator=g)
    mu = 0.5 * torch.randn(shape, generator=g) + 0.2
    eps = 0.8 * torch.randn(shape, generator=g)
    return x, mu, eps


def _states(metric: ms.DiagnosticMetric) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in metric.state_items()}


@pytest.mark.parametrize("chunk_elements", [None, 7])
@pytest.mark.parametrize(("shape", "dim"), [((3, 5, 4), -1), ((4, 3, 2, 2), -3), ((6, 2, 3), -2)])
def test_functional_matches_per_position_reference(
    shape: tuple[int, ...],
    dim: int,
    chunk_elements: int | None,
    monkeypatch: pytest.MonkeyPatch,
    device: torch.device,
) -> None:
    if chunk_elements is not None:  # many position chunks, including a ragged last one
        monkeypatch.setattr(functional_noise, "NOISE_CHUNK_ELEMENTS", chunk_elements)
    x, mu, eps = _data(torch.Generator().manual_seed(0), shape)
    out = on_cpu(noise_statistics(*to_device((x.double(), mu.double(), eps.double()), device), dim=dim))
    want = _reference(x.numpy(), mu.numpy(), eps.numpy(), dim)
    assert list(out) == list(NOISE_STATISTICS)
    for name in NOISE_STATISTICS:
        np.testing.assert_allclose(out[name].numpy(), want[name].reshape(-1), rtol=1e-12, err_msg=name)


def test_seed_example_mask_broadcast_over_positions(device: torch.device) -> None:
    x, mu, eps = _data(torch.Generator().manual_seed(1), (4, 3, 2, 2))
    mask = torch.tensor([[True, False], [False, True]])
    inputs = to_device((x, mu, eps, mask), device)
    out = on_cpu(noise_statistics(*inputs[:3], noise_mask=inputs[3], dim=-3))
    want = _reference(x.numpy(), mu.numpy(), eps.numpy(), -3)
    full_mask = np.broadcast_to(mask.numpy(), (4, 2, 2))
    for name in NOISE_STATISTICS:
        assert out[name].shape == (8,)
        np.testing.assert_allclose(out[name].numpy(), want[name][full_mask], rtol=1e-5, err_msg=name)
    metric = NoiseStatistics(dim=-3).to(device)
    metric.update(*inputs[:3], noise_mask=inputs[3])
    result = metric.compute()
    for name in NOISE_STATISTICS:
        assert result[name].item() == pytest.approx(want[name][full_mask].mean(), rel=1e-5), name


def test_metric_streamed_equals_mean_of_reference(device: torch.device) -> None:
    g = torch.Generator().manual_seed(2)
    x, mu, eps = _data(g, (11, 6, 5))
    mask = torch.rand(11, 6, generator=g) < 0.7
    metric = NoiseStatistics(with_stderr=True).to(device)
    for part in (slice(0, 2), slice(2, 2), slice(2, 9), slice(9, 11)):
        metric.update(
            *to_device((x[part].double(), mu[part].double(), eps[part].double(), mask[part]), device)
        )
    want = _reference(x.numpy(), mu.numpy(), eps.numpy(), -1)
    out = metric.compute()
    for name in NOISE_STATISTICS:
        values = want[name][mask.numpy()]
        assert out[name].item() == pytest.approx(values.mean(), rel=1e-10), name
        stderr = values.std(ddof=1) / math.sqrt(len(values))
        assert out[f"{name}_stderr"].item() == pytest.approx(stderr, rel=1e-8), name
    # statistics differ from each other: a mixed-up order would fail
    assert len({round(out[name].item(), 6) for name in NOISE_STATISTICS}) == len(NOISE_STATISTICS)


def test_mask_broadcasting_forms_agree() -> None:
    x, mu, eps = _data(torch.Generator().manual_seed(3), (3, 4, 5))
    per_token = torch.tensor([True, False, True, True])
    per_sequence = torch.tensor([[True], [False], [True]])
    cases = [
        (per_token, per_token.expand(3, 4)),
        (per_sequence.to(torch.uint8), per_sequence.expand(3, 4)),
        (torch.tensor(True), torch.ones(3, 4, dtype=torch.bool)),
    ]
    for mask, full in cases:
        broadcast, explicit = NoiseStatistics(), NoiseStatistics()
        broadcast.update(x, mu, eps, noise_mask=mask)
        explicit.update(x, mu, eps, noise_mask=full.clone())
        assert torch.equal(broadcast.statistic_stats, explicit.statistic_stats)
        assert broadcast.statistic_stats[0, 0].item() == full.sum().item()


@pytest.mark.parametrize("chunk_elements", [None, 7])
def test_broadcast_mean_shape(
    chunk_elements: int | None, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    if chunk_elements is not None:  # the broadcast mean is read row by row, a chunk at a time
        monkeypatch.setattr(functional_noise, "NOISE_CHUNK_ELEMENTS", chunk_elements)
    x, _, eps = _data(torch.Generator().manual_seed(4), (2, 3, 4))
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0])  # one learned mean vector for every position
    out = on_cpu(noise_statistics(*to_device((x, mu, eps), device)))
    want = _reference(x.numpy(), mu.numpy(), eps.numpy(), -1)
    for name in NOISE_STATISTICS:
        np.testing.assert_allclose(out[name].numpy(), want[name].reshape(-1), rtol=1e-5, err_msg=name)


def test_bfloat16_input() -> None:
    x, mu, eps = (t.to(torch.bfloat16) for t in _data(torch.Generator().manual_seed(5), (4, 6, 16)))
    metric = NoiseStatistics()
    metric.update(x, mu, eps)
    out = metric.compute()
    # reference on the same bf16 values in float64, as the metric computes
    want = _reference(x.double().numpy(), mu.double().numpy(), eps.double().numpy(), -1)
    for name in NOISE_STATISTICS:
        assert out[name].dtype == torch.float64
        assert out[name].item() == pytest.approx(want[name].mean(), rel=1e-12), name
    assert noise_statistics(x, mu, eps)["input_norm"].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_magnitudes_neither_overflow_nor_underflow(dtype: torch.dtype) -> None:
    # squares overflow (3e19² > 3.4e38) or underflow (1e-23² < 1e-45) in float32 and bfloat16
    x = torch.tensor([[3e19, 4e19], [1.0, 0.0], [1.0, 0.0]], dtype=dtype)
    mu = torch.tensor([[1e19, 0.0], [1.0, 0.0], [1e19, 0.0]], dtype=dtype)
    eps = torch.tensor([[0.0, 1e19], [0.0, 1e-23], [0.0, 1e-21]], dtype=dtype)
    want = _reference(x.double().numpy(), mu.double().numpy(), eps.double().numpy(), -1)
    assert want["input_norm"][0] == pytest.approx(5e19, rel=1e-2)  # the data is what it says
    assert want["mean_domination_ratio"][1] == pytest.approx(1e23, rel=1e-2)
    assert want["mean_domination_ratio"][2] == pytest.approx(1e40, rel=1e-2)
    out = noise_statistics(x, mu, eps)
    metric = NoiseStatistics()
    metric.update(x, mu, eps)
    result = metric.compute()
    assert metric.nonfinite_count.item() == 0  # a huge finite input is not taken for NaN/inf
    for name in NOISE_STATISTICS:
        np.testing.assert_allclose(out[name].numpy(), want[name], rtol=1e-12, err_msg=name)
        assert result[name].item() == pytest.approx(want[name].mean(), rel=1e-12), name
        assert math.isfinite(result[name].item()), name


def test_zero_norm_positions_are_left_out_of_their_statistic_only() -> None:
    x, mu, eps = _data(torch.Generator().manual_seed(6), (2, 4, 3))
    eps[0, 1] = 0.0  # e.g. no noise at one position: mean/noise ratio undefined
    x[1, 2] = 0.0  # a zero input: input ratios and cosines undefined
    mu[1, 3] = 0.0
    eps[1, 3] = 0.0  # neither mean nor noise: also the mean domination percent is undefined
    metric = NoiseStatistics()
    metric.update(x, mu, eps)
    out = metric.compute()
    want = _reference(x.numpy(), mu.numpy(), eps.numpy(), -1)
    counts = metric.statistic_stats[:, 0]
    for i, name in enumerate(NOISE_STATISTICS):
        values = want[name]
        assert math.isfinite(out[name].item()), name
        assert out[name].item() == pytest.approx(np.nanmean(values), rel=1e-5), name
        assert counts[i].item() == np.isfinite(values).sum(), name
    assert counts[0].item() == 8 and counts[5].item() == 6 and counts[4].item() == 7
    functional = noise_statistics(x, mu, eps)
    assert torch.isnan(functional["mean_domination_ratio"]).sum().item() == 2
    # a statistic that is nowhere defined is NaN, never inf
    zero_noise = NoiseStatistics()
    zero_noise.update(x, mu, torch.zeros_like(eps))
    result = zero_noise.compute()
    assert math.isnan(result["mean_domination_ratio"].item())
    assert result["unshifted_noise_norm"].item() == 0.0
    assert not any(math.isinf(v.item()) for v in result.values())


def test_nonfinite_positions_are_skipped_and_counted() -> None:
    x, mu, eps = _data(torch.Generator().manual_seed(7), (2, 3, 4))
    x[0, 1, 2] = float("nan")
    eps[1, 0, 0] = float("inf")
    mask = torch.tensor([[True, True, True], [False, True, True]])  # the inf position is masked out
    metric = NoiseStatistics()
    metric.update(x, mu, eps, noise_mask=mask)
    assert metric.nonfinite_count.item() == 1
    keep = mask.clone()
    keep[0, 1] = False
    clean = NoiseStatistics()
    clean.update(x, mu, eps, noise_mask=keep)
    assert torch.equal(metric.statistic_stats, clean.statistic_stats)
    strict = NoiseStatistics(nan_strategy="error")
    with pytest.raises(ValueError, match="NaN or inf"):
        strict.update(x, mu, eps, noise_mask=mask)


def test_bad_input_leaves_state_unchanged() -> None:
    x, mu, eps = _data(torch.Generator().manual_seed(8), (2, 3, 4))
    metric = NoiseStatistics()
    metric.update(x, mu, eps)
    bad_cases = [
        (ValueError, r"`mean`.*\[2, 3, 4\].*\[2, 2, 4\]", {"input": x, "mean": mu[:, :2], "noise": eps}),
        (ValueError, "`noise`", {"input": x, "mean": mu, "noise": eps[..., :3]}),
        (ValueError, "`noise`.*broadcast", {"input": x, "mean": mu, "noise": torch.zeros(5, 2, 3, 4)}),
        (TypeError, "`input`", {"input": x.long(), "mean": mu, "noise": eps}),
        (
            ValueError,
            r"noise_mask.*\[2, 3\].*\[4\]",
            {"input": x, "mean": mu, "noise": eps, "noise_mask": torch.ones(4, dtype=torch.bool)},
        ),
        (
            ValueError,
            "noise_mask",
            {"input": x, "mean": mu, "noise": eps, "noise_mask": torch.ones(2, 3, 4, dtype=torch.bool)},
        ),
        (TypeError, "noise_mask", {"input": x, "mean": mu, "noise": eps, "noise_mask": torch.ones(3)}),
        (
            ValueError,
            "input.*at least",
            {"input": torch.tensor(1.0), "mean": torch.tensor(1.0), "noise": torch.tensor(1.0)},
        ),
    ]
    for error, match, inputs in bad_cases:
        before = _states(metric)
        with pytest.raises(error, match=match):
            metric.update(**inputs)
        for name, value in _states(metric).items():
            assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="dim"):
        NoiseStatistics(dim=0)
    with pytest.raises(ValueError, match="dim"):
        noise_statistics(x, mu, eps, dim=1)
    with pytest.raises(ValueError, match="at least 4"):
        NoiseStatistics(dim=-4).update(x, mu, eps)


def test_collection_routing_and_empty() -> None:
    col = ms.suite("noise")
    x, mu, eps = _data(torch.Generator().manual_seed(9), (2, 3, 4))
    col.update(input=x, mean=mu, noise=eps)
    out = col.compute()
    assert {f"noise/noise/{name}" for name in NOISE_STATISTICS} <= out.keys()
    want = _reference(x.numpy(), mu.numpy(), eps.numpy(), -1)
    assert out["noise/noise/noise_domination_ratio"].item() == pytest.approx(
        want["noise_domination_ratio"].mean(), rel=1e-5
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(math.isnan(v.item()) for v in NoiseStatistics().compute().values())


@pytest.mark.parametrize("poison", ["input", "mean", "noise"])
def test_nonfinite_in_any_input_skips_only_its_position(poison: str) -> None:
    g = torch.Generator().manual_seed(4)
    inputs = {k: torch.randn(3, 5, 4, generator=g) for k in ("input", "mean", "noise")}
    inputs[poison][1, 2, 3] = float("nan")
    inputs[poison][2, 0, 0] = float("inf")
    metric = NoiseStatistics()
    with pytest.warns(UserWarning, match="skipped 2 item"):
        metric.update(**inputs)
        out = metric.compute()
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1, 2] = keep[2, 0] = False
    clean = NoiseStatistics()
    clean.update(**inputs, noise_mask=keep)
    assert metric.nonfinite_count.item() == 2
    for name, value in clean.compute().items():
        assert torch.isfinite(out[name]) and torch.allclose(out[name], value, rtol=1e-12), name
    with pytest.raises(ValueError, match=poison):
        NoiseStatistics(nan_strategy="error").update(**inputs)


def test_broadcast_mean_with_nan_skips_the_positions_it_reaches() -> None:
    # a [D] mean with a NaN, norms over dim=-2: only the positions of that feature column are hit
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5))
    mu = torch.zeros(4)
    mu[1] = float("nan")
    metric = NoiseStatistics(dim=-2)
    metric.update(x, mu, torch.ones_like(x))
    assert metric.nonfinite_count.item() == 2  # positions [b, 1] for b in 0, 1


def test_finite_inputs_whose_norm_overflows_are_not_called_nonfinite() -> None:
    # finiteness is judged on the inputs: a float64 norm of 1e200 values overflows, the values do not
    x = torch.full((2, 3), 1e200, dtype=torch.float64)
    metric = NoiseStatistics()
    metric.update(x, x, x)
    assert metric.nonfinite_count.item() == 0
