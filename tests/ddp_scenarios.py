"""Functions run on every rank of a real gloo group by tests/test_distributed.py.

Each returns a list of failure messages (empty when everything held), so one spawned group
checks every registered metric and scenario at once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from metrics_suite.collection import DiagnosticCollection
from metrics_suite.registry import registered
from metrics_suite.testing import count_collectives
from tests.helpers import compare, example_batches, flat, make_metric

N_BATCHES = 6


def _batch_sizes(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(s) for s in torch.randint(1, 6, (N_BATCHES,), generator=g)]


def _assignments(world_size: int, shardable: bool) -> dict[str, list[list[int]]]:
    """Which batches each rank updates with, per scenario (the last batch is held back)."""
    batches = list(range(N_BATCHES - 1))
    if not shardable:  # replicated data: every active rank sees every batch
        return {
            "replicated": [batches for _ in range(world_size)],
            "replicated_idle_rank": [
                batches if r < max(world_size - 1, 1) else [] for r in range(world_size)
            ],
        }
    active = max(world_size - 1, 1)
    return {
        "uneven": [[b for b in batches if b % world_size == r] for r in range(world_size)],
        "idle_rank": [
            [b for b in batches if b % active == r] if r < active else [] for r in range(world_size)
        ],
    }


def _expected_collectives(calls: Any) -> list[str]:
    """One fused all_reduce of the states plus one tiny all_gather (the layout check), nothing else."""
    expected = {"all_reduce": 1, "all_gather_single": 1}
    actual = {k: v for k, v in calls.items() if v}
    return [] if actual == expected else [f"collectives: {actual} (expected {expected})"]


def conformance(rank: int, world_size: int) -> list[str]:
    """Per metric and scenario: synced compute == one process over all data, 2 collectives,
    local states restored (accumulation continues), and a whole collection in 2 collectives."""
    failures: list[str] = []
    entries = registered()
    for scenario_idx in range(2):
        collection_metrics: dict[str, Any] = {}
        references: dict[str, dict[str, float]] = {}
        for seed, entry in enumerate(entries):
            label = f"{entry.suite}/{entry.name}"
            batches = example_batches(entry, _batch_sizes(seed), seed=seed)
            scenario, plan = list(_assignments(world_size, entry.example.shardable).items())[scenario_idx]
            tag = f"[world={world_size} rank={rank} {label} {scenario}]"
            try:
                # one process over all the data the ranks see together (replicated: each rank's copy)
                reference = make_metric(entry, sync_on_compute=False)
                for b in range(N_BATCHES - 1):
                    reference.update(**batches[b])
                expected = flat(reference, reference.compute())
                metric = make_metric(entry)
                if entry.example.shardable:
                    collection_metrics[label] = metric
                for b in plan[rank]:
                    metric.update(**batches[b])
                with count_collectives() as calls:
                    value = metric.compute()
                failures += [f"{tag} {p}" for p in _expected_collectives(calls)]
                failures += [
                    f"{tag} {p}" for p in compare(flat(metric, value), expected, rtol=entry.example.rtol)
                ]
                # local states were restored: one more batch on rank 0 and a second compute still agree
                if entry.example.shardable:
                    if rank == 0:
                        metric.update(**batches[-1])
                    reference.update(**batches[-1])
                    failures += [
                        f"{tag} after restore: {p}"
                        for p in compare(flat(metric, metric.compute()), flat(reference, reference.compute()))
                    ]
                    references[label] = flat(reference, reference.compute())
            except Exception as err:  # report and go on with the next metric
                failures.append(f"{tag} raised {type(err).__name__}: {err}")
        # the same metrics as one collection: one fused sync for all of them
        collection = DiagnosticCollection(collection_metrics)
        try:
            with count_collectives() as calls:
                out = collection.compute()
        except Exception as err:
            failures.append(f"[world={world_size} collection] raised {type(err).__name__}: {err}")
            continue
        failures += [f"[world={world_size} collection] {p}" for p in _expected_collectives(calls)]
        for label, expected in references.items():
            actual = {
                k.removeprefix(label).lstrip("/"): float(v)
                for k, v in out.items()
                if (k == label or k.startswith(label + "/")) and not k.endswith("/nonfinite_count")
            }
            failures += [f"[world={world_size} collection {label}] {p}" for p in compare(actual, expected)]
    return failures


def layout_mismatch(rank: int, world_size: int) -> list[str]:
    """Ranks build different layouts: every rank must raise, none may hang.

    Scenario 1: rank 0 holds one metric more. Scenario 2: same metric, different size.
    """
    from metrics_suite.reconstruction import ReconstructionScore

    extra = {"extra": ReconstructionScore()} if rank == 0 else {}
    scenarios = [
        DiagnosticCollection({"score": ReconstructionScore(), **extra}),
        DiagnosticCollection({"score": ReconstructionScore(num_components=1 + (rank == 0))}),
    ]
    messages = []
    for collection in scenarios:
        try:
            collection.compute()
            messages.append("no error")
        except RuntimeError as err:
            messages.append(str(err))
    # a single metric's own sync checks its layout too
    try:
        ReconstructionScore(num_components=1 + (rank == 0)).compute()
        messages.append("no error")
    except RuntimeError as err:
        messages.append(str(err))
    return messages


def without_layout_check(rank: int, world_size: int) -> dict[str, int]:
    """With check_layout=False a collection compute is exactly one all_reduce."""
    entries = [e for e in registered() if e.example.shardable]
    collection = DiagnosticCollection(
        {f"{e.suite}/{e.name}": make_metric(e) for e in entries}, check_layout=False
    )
    with count_collectives() as calls:
        collection.compute()
    dist.barrier()
    return dict(calls)


def spawned_compute(rank: int, world_size: int, metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Metrics sent to a spawned process (torch.multiprocessing pickling) compute what they did at home."""
    return {name: flat(m, m.compute_on_current_states()) for name, m in metrics.items()}
