"""Streaming precision: a million float32 items match a float64 math.fsum reference to 1e-9."""

from __future__ import annotations

import math

import numpy as np
import torch

from metrics_suite.base import mean_and_stderr, mean_stats
from metrics_suite.reconstruction import ReconstructionScore

N_ITEMS = 1_000_000
N_UPDATES = 200


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
    """int64 counts keep counting where a float32 counter stops at 2**24."""
    metric = ReconstructionScore()
    metric.nonfinite_count += 2**40
    bad = torch.tensor([float("nan")])
    metric.update(bad, bad, bad)
    assert metric.nonfinite_count.item() == 2**40 + 1
    assert torch.tensor(2.0**24, dtype=torch.float32) + 1 == 2.0**24  # what float32 would have done
