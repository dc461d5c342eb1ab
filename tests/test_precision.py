"""Streaming precision: a million float32 items match a float64 math.fsum reference to 1e-9."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics_suite.base import mean_and_stderr, mean_stats
from metrics_suite.collection import DiagnosticCollection
from metrics_suite.reconstruction import ReconstructionScore
from metrics_suite.registry import registered
from tests.helpers import compare, example_batches, flat, make_metric

N_ITEMS = 1_000_000
N_UPDATES = 200
SHARDABLE = [e for e in registered() if e.example.shardable]


def _stream(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # offset data is where float32 accumulation fails first
    return [torch.randn(N_ITEMS // N_UPDATES, generator=g) * 3 + 1000 for _ in range(N_UPDATES)]


def test_mean_state_over_a_million_float32_items() -> None:
    chunks = _stream(0)
    stats = torch.zeros(3, dtype=torch.float64)
    for chunk in chunks:
        stats += mean_stats(chunk)
    values = [float(v) for chunk in chunks for v in chunk.double().tolist()]
    mean, stderr = mean_and_stderr(stats)
    expected_mean = math.fsum(values) / len(values)
    assert stats[0].item() == N_ITEMS
    assert math.isclose(mean.item(), expected_mean, rel_tol=1e-9)
    expected_std = np.std(np.asarray(values), ddof=1) / math.sqrt(len(values))
    assert math.isclose(stderr.item(), expected_std, rel_tol=1e-6)


def test_reconstruction_score_itemwise_over_a_million_items() -> None:
    g = torch.Generator().manual_seed(1)
    metric = ReconstructionScore(reduction="itemwise_mean")
    ratios: list[float] = []
    sums = [[], [], []]
    ratio_of_sums = ReconstructionScore()
    for _ in range(N_UPDATES):
        clean = torch.rand(N_ITEMS // N_UPDATES, generator=g) + 1.0
        zero = clean + 0.5 + torch.rand(clean.shape, generator=g)
        recon = clean + (zero - clean) * torch.rand(clean.shape, generator=g)
        metric.update(clean, recon, zero)
        ratio_of_sums.update(clean, recon, zero)
        c, r, z = (x.double() for x in (clean, recon, zero))
        ratios.extend(((z - r) / (z - c)).tolist())
        for acc, x in zip(sums, (c, r, z)):
            acc.extend(x.tolist())
    assert math.isclose(metric.compute().item(), math.fsum(ratios) / len(ratios), rel_tol=1e-9)
    s, s_rec, s_zero = (math.fsum(acc) for acc in sums)
    assert math.isclose(ratio_of_sums.compute().item(), (s_zero - s_rec) / (s_zero - s), rel_tol=1e-9)
    assert metric.ratio_stats[0, 0].item() == N_ITEMS


def test_counts_do_not_saturate() -> None:
    """int64 counts keep counting where a float32 counter stops at 2**24 (2**40 + 1 would read 2**40),
    through an update, a checkpoint and a collection's compute."""
    metric = ReconstructionScore()
    metric.nonfinite_count += 2**40
    bad = torch.tensor([float("nan")])
    metric.update(bad, bad, bad)
    assert metric.nonfinite_count.item() == 2**40 + 1
    resumed = ReconstructionScore()
    resumed.load_state_dict(metric.state_dict())
    col = DiagnosticCollection({"a/score": resumed})
    with pytest.warns(UserWarning, match=f"skipped {2**40 + 1} item"):
        assert col.compute()["a/score/nonfinite_count"].item() == 2**40 + 1


def _bytes_per_item(batch: dict, n: int) -> float:
    return sum(v.element_size() * v.numel() for v in batch.values() if isinstance(v, torch.Tensor)) / n


@pytest.mark.parametrize("entry", SHARDABLE, ids=[f"{e.suite}/{e.name}" for e in SHARDABLE])
def test_streaming_a_million_items_matches_one_float64_pass(entry) -> None:  # type: ignore[no-untyped-def]
    """Up to 10**6 items (capped at ~48 MiB of input) in 200 updates equal one update over all of them.

    The per-item math is identical in both runs, so any difference is accumulation error: float64
    sums stay within 1e-9 where a float32 accumulator drifts by ~1e-4 at this scale.
    """
    probe = entry.example.make_batch(torch.Generator().manual_seed(0), 10)
    n_total = int(min(N_ITEMS, 48 * 2**20 / _bytes_per_item(probe, 10)))
    n_total -= n_total % N_UPDATES
    (whole,) = example_batches(entry, [n_total], seed=7)
    one_pass = make_metric(entry)
    one_pass.update(**whole)
    streamed = make_metric(entry)
    for part in entry.example.split(whole, [n_total // N_UPDATES] * N_UPDATES):
        streamed.update(**part)
    assert not compare(flat(streamed, streamed.compute()), flat(one_pass, one_pass.compute()), rtol=1e-9)
