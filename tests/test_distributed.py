"""Real multi-process DDP (gloo on loopback) checks of every registered metric.

Each spawned group runs every metric and scenario (uneven batches, a rank with no updates,
replicated data for non-shardable metrics), so the cost of spawning is paid once per world size.
"""

from __future__ import annotations

import pytest

from metrics_suite.registry import registered
from metrics_suite.testing import run_distributed
from tests import ddp_scenarios
from tests.helpers import compare, example_batches, flat, make_metric


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_metric_matches_one_process(world_size: int) -> None:
    per_rank = run_distributed(ddp_scenarios.conformance, world_size, timeout=600)
    failures = [f for rank_failures in per_rank for f in rank_failures]
    assert not failures, "\n".join(failures[:40])


def test_layout_mismatch_fails_fast_on_every_rank() -> None:
    per_rank = run_distributed(ddp_scenarios.layout_mismatch, 3, timeout=120)
    assert all(len(messages) == 3 for messages in per_rank), per_rank
    assert all("the ranks' metrics cannot be summed" in m for messages in per_rank for m in messages), (
        per_rank
    )
    # rank 0 holds one metric more: it names it; the others know only that rank 0 holds metrics they lack
    assert "metric 'extra' (ReconstructionScore) is missing on other ranks" in per_rank[0][0]
    assert all("other ranks hold metrics this rank does not have" in m[0] for m in per_rank[1:]), per_rank
    assert all("metrics per rank: [2, 1, 1]" in m[0] for m in per_rank), per_rank
    # same metric, another size: every rank names the metric, its layout and the argument
    for messages in per_rank:
        for message, name in zip(messages[1:], ("'score'", "'ReconstructionScore'")):
            assert f"metric {name} (ReconstructionScore): state layout differs" in message, message
            assert "argument `num_components` differs" in message, message


def test_sync_failures_restore_warn_globally_and_check_fingerprints() -> None:
    """Issue 12 items 1-3: restore after a raising compute, no 'never updated' warning on an idle
    rank, and every fingerprint mismatch (arguments, extra compute) raising on every rank."""
    per_rank = run_distributed(ddp_scenarios.sync_failures, 2, timeout=300, process_group_timeout=20)
    failures = [f for rank_failures in per_rank for f in rank_failures]
    assert not failures, "\n".join(failures[:40])


def test_a_rank_that_skips_compute_times_out_with_a_clear_error() -> None:
    """Item 5: with a 3 s process-group timeout the waiting rank's error names what was syncing."""
    per_rank = run_distributed(ddp_scenarios.rank_skips_compute, 2, 3.0, timeout=120, process_group_timeout=3)
    failures = [f for rank_failures in per_rank for f in rank_failures]
    assert not failures, "\n".join(failures)


def test_collection_without_layout_check_is_one_all_reduce() -> None:
    calls = run_distributed(ddp_scenarios.without_layout_check, 2, timeout=120)
    assert all(c == {"all_reduce": 1} for c in calls), calls


def test_count_collectives_sees_every_collective() -> None:
    per_rank = run_distributed(ddp_scenarios.collective_counts, 2, timeout=120)
    failures = [f for rank_failures in per_rank for f in rank_failures]
    assert not failures, failures


def test_every_metric_travels_to_a_spawned_process() -> None:
    """ddp_spawn sends metrics through torch.multiprocessing's pickler (tensors by file descriptor)."""
    metrics = {}
    for entry in registered():
        metric = make_metric(entry)
        for batch in example_batches(entry, [3, 4]):
            metric.update(**batch)
        metrics[f"{entry.suite}/{entry.name}"] = metric
    (remote,) = run_distributed(ddp_scenarios.spawned_compute, 1, metrics, timeout=120)
    for name, metric in metrics.items():
        assert not compare(remote[name], flat(metric, metric.compute_on_current_states())), name
