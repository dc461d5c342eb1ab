"""Functions run on every rank of a real gloo group by tests/test_distributed.py.

Each returns a list of failure messages (empty when everything held), so one spawned group
checks every registered metric and scenario at once.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.aggregation import SumMetric

from metrics_suite.base import DiagnosticMetric, SyncFailedError, SyncMismatchError
from metrics_suite.collection import DiagnosticCollection
from metrics_suite.reconstruction import ReconstructionScore
from metrics_suite.registry import registered
from metrics_suite.testing import count_collectives
from tests.helpers import compare, example_batches, flat, make_metric, state_snapshot, states_equal

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


def _compare_states(metric: DiagnosticMetric, reference: DiagnosticMetric) -> list[str]:
    """Differences between two metrics' raw states (float sums to float64 rounding, counts exact)."""
    problems = []
    for name, actual in metric.state_items():
        expected = getattr(reference, name)
        if actual.dtype != expected.dtype or not torch.allclose(
            actual, expected, rtol=1e-9, atol=1e-12, equal_nan=True
        ):
            problems.append(f"state `{name}`: {actual.tolist()} != {expected.tolist()}")
    return problems


def conformance(rank: int, world_size: int) -> list[str]:
    """Per metric and scenario: synced compute == one process over all data, 2 collectives,
    local states restored (accumulation continues), and a whole collection (plus a torchmetrics
    SumMetric) in 2 collectives, without a "never updated" warning on idle ranks, with its local
    states restored too."""
    failures: list[str] = []
    entries = registered()
    for scenario_idx in range(2):
        collection_metrics: dict[str, Any] = {}
        references: dict[str, Any] = {}
        extra_batches: dict[str, dict[str, Any]] = {}
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
                if entry.example.shardable:  # the summed raw states, not only the values (a sync
                    # that averaged float states would leave every ratio unchanged)
                    metric.sync()
                    failures += [f"{tag} synced states: {p}" for p in _compare_states(metric, reference)]
                    metric.unsync()
                # local states were restored: one more batch on rank 0 and a second compute still agree
                if entry.example.shardable:
                    if rank == 0:
                        metric.update(**batches[-1])
                    reference.update(**batches[-1])
                    failures += [
                        f"{tag} after restore: {p}"
                        for p in compare(flat(metric, metric.compute()), flat(reference, reference.compute()))
                    ]
                    references[label] = reference
                    extra_batches[label] = batches[0]
            except Exception as err:  # report and go on with the next metric
                failures.append(f"{tag} raised {type(err).__name__}: {err}")
        # the same metrics as one collection: one fused sync for all of them; a torchmetrics sum
        # metric updated on rank 0 only rides along (its update count travels in the same buffer)
        collection = DiagnosticCollection({**collection_metrics, "torchmetrics/sum": SumMetric()})
        if rank == 0:
            collection["torchmetrics/sum"].update(torch.tensor([2.0, 3.0]))
        tag = f"[world={world_size} rank={rank} collection]"
        try:
            with count_collectives() as calls, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = collection.compute()
            # local states were restored: one more batch on rank 0 and a second compute still agree
            if rank == 0:
                for label, batch in extra_batches.items():
                    collection[label].update(**batch)
            second = collection.compute()
        except Exception as err:
            failures.append(f"{tag} raised {type(err).__name__}: {err}")
            continue
        failures += [f"{tag} {p}" for p in _expected_collectives(calls)]
        failures += [f"{tag} warned: {w.message}" for w in caught if "never updated" in str(w.message)]
        if float(out["torchmetrics/sum"]) != 5.0:
            failures.append(f"{tag} SumMetric gave {float(out['torchmetrics/sum'])}, expected 5.0")
        for label, reference in references.items():
            for when, result in (("", out), (" after restore", second)):
                if when:
                    reference.update(**extra_batches[label])
                expected = flat(reference, reference.compute())
                actual = {
                    k.removeprefix(label).lstrip("/"): float(v)
                    for k, v in result.items()
                    if (k == label or k.startswith(label + "/")) and not k.endswith("/nonfinite_count")
                }
                failures += [f"{tag} {label}{when}: {p}" for p in compare(actual, expected)]
        with collection._synced():  # the collection's own sync sums the raw states too
            for label, reference in references.items():
                failures += [
                    f"{tag} {label} synced states: {p}" for p in _compare_states(collection[label], reference)
                ]
    return failures


def _probes(rank: int, world_size: int) -> dict[str, Callable[[], Any]]:
    """One call of each collective (pairs of point-to-point calls between ranks 0 and 1)."""
    peer = 1 - rank
    root = rank == 0

    def batch_p2p() -> None:
        ops = [dist.P2POp(dist.isend, torch.ones(2), peer), dist.P2POp(dist.irecv, torch.empty(2), peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return {
        "all_reduce_coalesced": lambda: dist.all_reduce_coalesced([torch.ones(2), torch.ones(3)]),
        "all_gather_coalesced": lambda: dist.all_gather_coalesced(
            [[torch.empty(2)] for _ in range(world_size)], [torch.ones(2)]
        ),
        "all_to_all_single": lambda: dist.all_to_all_single(
            torch.empty(2 * world_size), torch.ones(2 * world_size)
        ),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(
            torch.empty(2), torch.ones(2 * world_size)
        ),
        "monitored_barrier": lambda: dist.monitored_barrier(),
        "gather_object": lambda: dist.gather_object(rank, [None] * world_size if root else None, dst=0),
        "scatter_object_list": lambda: dist.scatter_object_list(
            [None], [1] * world_size if root else None, src=0
        ),
        "send" if root else "recv": lambda: (
            dist.send(torch.ones(2), 1) if root else dist.recv(torch.empty(2), 0)
        ),
        "isend" if root else "irecv": lambda: (
            dist.isend(torch.ones(2), 1) if root else dist.irecv(torch.empty(2), 0)
        ).wait(),
        "batch_isend_irecv": batch_p2p,
        "send_object_list" if root else "recv_object_list": lambda: (
            dist.send_object_list([1], 1) if root else dist.recv_object_list([None], 0)
        ),
    }


def collective_counts(rank: int, world_size: int) -> list[str]:
    """``count_collectives`` counts each kind of collective exactly once under its own name."""
    failures = []
    for name, probe in _probes(rank, world_size).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated coalesced variants
            with count_collectives() as calls:
                probe()
        if dict(calls) != {name: 1}:
            failures.append(f"[rank={rank}] {name}: counted {dict(calls)}")
    return failures


def layout_mismatch(rank: int, world_size: int) -> list[str]:
    """Ranks build different layouts: every rank must raise, none may hang.

    Scenario 1: rank 0 holds one metric more. Scenario 2: same metric, different size.
    """
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


# ------------------------------------------------------------------ sync failures (issue 12)
def _losses(rank: int, nan: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """ReconstructionScore inputs of one rank (rebuilt by every rank for the reference)."""
    g = torch.Generator().manual_seed(100 + rank)
    clean = torch.rand(4, generator=g, dtype=torch.float64) + 1
    spliced = clean + torch.rand(4, generator=g, dtype=torch.float64)
    ablated = spliced + 1 + torch.rand(4, generator=g, dtype=torch.float64)
    if nan:
        spliced[0] = float("nan")
    return clean, spliced, ablated


def _all_ranks_score(world_size: int, nan_rank: int | None = None, ranks: Any = None) -> float:
    """One process over the data of ``ranks`` (default all)."""
    reference = ReconstructionScore(sync_on_compute=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(world_size) if ranks is None else ranks:
            reference.update(*_losses(r, nan=r == nan_rank))
        return float(reference.compute())


class ExplodingScore(ReconstructionScore):
    """A metric whose compute() raises after the sync (stands for any error in a compute)."""

    def compute(self) -> Tensor:
        raise ArithmeticError("compute failed on purpose")


def _restored(tag: str, metric: DiagnosticMetric, before: dict[str, Tensor], count: int) -> list[str]:
    problems = []
    if not states_equal(state_snapshot(metric), before):
        problems.append(f"{tag}: states not restored: {state_snapshot(metric)} vs {before}")
    if metric._update_count != count:
        problems.append(f"{tag}: update count {metric._update_count}, expected the local {count}")
    if metric._is_synced:
        problems.append(f"{tag}: still marked synced")
    return problems


def _raises_after_sync(rank: int, world_size: int) -> list[str]:
    """Item 1: compute() raising after the sync (a warning turned error; an exception of the
    metric's own compute) puts back the local states and count; the next compute is right."""
    failures: list[str] = []
    for kind in ("nan warning as error", "compute raises"):
        tag = f"[world={world_size} rank={rank} {kind}]"
        metric = ReconstructionScore() if kind.startswith("nan") else ExplodingScore()
        metric.update(*_losses(rank, nan=rank == 0 and kind.startswith("nan")))
        before, count = state_snapshot(metric), metric._update_count
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                metric.compute()
            failures.append(f"{tag}: compute did not raise")
        except (UserWarning, ArithmeticError):
            pass
        failures += _restored(tag, metric, before, count)
        if kind.startswith("nan"):  # accumulation goes on: every rank's data counted once
            metric.update(*_losses(rank))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = float(metric.compute())
            reference = ReconstructionScore(sync_on_compute=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for r in range(world_size):
                    reference.update(*_losses(r, nan=r == 0))
                    reference.update(*_losses(r))
                expected = float(reference.compute())
            failures += [f"{tag} next compute: {p}" for p in compare({"v": value}, {"v": expected})]
    return failures


def _idle_rank_no_warning(rank: int, world_size: int) -> list[str]:
    """Item 2: only rank 0 updates; with warnings as errors no rank raises and every rank gets the
    global value. A metric no rank updated still warns (on the global count), after the sync."""
    tag = f"[world={world_size} rank={rank} idle rank]"
    failures: list[str] = []
    metric = ReconstructionScore()
    if rank == 0:
        metric.update(*_losses(0))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            value = float(metric.compute())
        failures += [f"{tag} {p}" for p in compare({"v": value}, {"v": _all_ranks_score(1)})]
    except Exception as err:
        failures.append(f"{tag}: raised {type(err).__name__}: {err}")
    empty = ReconstructionScore()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        empty.compute()
    if rank == 0 and not any("before the ``update``" in str(w.message) for w in caught):
        failures.append(f"{tag}: a metric no rank updated gave no warning on rank 0")
    return failures


def _fingerprint_cases() -> list[tuple[type[DiagnosticMetric], dict[str, Any], dict[str, Any], str]]:
    """(class, arguments on rank 0, arguments on the other ranks, the argument that differs)."""
    from metrics_suite.credit import BridgeResidual, NudgingDelta, PerturbationCorrelation
    from metrics_suite.noise import NoiseStatistics
    from metrics_suite.reconstruction import FeatureSparsity
    from metrics_suite.utility import MaskedCrossEntropy, NextTokenDivergence

    return [
        (NextTokenDivergence, {"num_logits": 2}, {}, "num_logits"),
        (NextTokenDivergence, {"reduction": "token"}, {}, "reduction"),
        (MaskedCrossEntropy, {"ignore_index": -100}, {}, "ignore_index"),
        (PerturbationCorrelation, {"epsilon": 1e-2, "seed": 0}, {"seed": 0}, "epsilon"),
        (PerturbationCorrelation, {"num_directions": 8, "seed": 0}, {"seed": 0}, "num_directions"),
        (PerturbationCorrelation, {"difference": "central", "seed": 0}, {"seed": 0}, "difference"),
        (PerturbationCorrelation, {"seed": 1}, {"seed": 0}, "seed"),
        (NudgingDelta, {"eta": 0.1}, {}, "eta"),
        (BridgeResidual, {"lam": 0.2}, {}, "lam"),
        (NoiseStatistics, {"dim": -2}, {}, "dim"),
        (
            FeatureSparsity,
            {"num_features": 4, "dead_thresholds": (0.5,)},
            {"num_features": 4, "dead_thresholds": (0.0,)},
            "dead_thresholds",
        ),
        (ReconstructionScore, {"reduction": "itemwise_mean"}, {}, "reduction"),
        (ReconstructionScore, {"num_components": 2}, {}, "num_components"),
    ]


def _expect_mismatch(tag: str, call: Callable[[], Any], *needles: str) -> list[str]:
    try:
        call()
    except SyncMismatchError as err:
        missing = [n for n in needles if n not in str(err)]
        return [f"{tag}: message lacks {missing}: {err}"] if missing else []
    except Exception as err:
        return [f"{tag}: raised {type(err).__name__} instead of SyncMismatchError: {err}"]
    return [f"{tag}: no error"]


def _fingerprint_mismatches(rank: int, world_size: int) -> list[str]:
    """Item 3: ranks whose metrics differ in a non-size argument, or in the number of synced
    computes, raise on every rank naming the metric and what differs (standalone and collection)."""
    failures: list[str] = []
    for cls, kwargs0, kwargs, arg in _fingerprint_cases():
        mine = kwargs0 if rank == 0 else kwargs
        tag = f"[world={world_size} rank={rank} {cls.__name__} {arg}]"
        failures += _expect_mismatch(tag, cls(**mine).compute, cls.__name__, f"argument `{arg}`")
        collection = DiagnosticCollection({"suite/metric": cls(**mine)})
        failures += _expect_mismatch(f"{tag} collection", collection.compute, "'suite/metric'", f"`{arg}`")
    # one rank computes once more than its peers: its extra sync would pair with their next epoch's
    for kind in ("metric", "collection"):
        tag = f"[world={world_size} rank={rank} extra compute ({kind})]"
        metric = ReconstructionScore()
        target: Any = metric if kind == "metric" else DiagnosticCollection({"score": metric})
        metric.update(*_losses(rank))
        target.compute()
        if rank == 0:
            needles = ("number of synced compute() calls since reset() differs (this rank: 1)",)
            failures += _expect_mismatch(tag, target.compute, *needles)
        else:  # next epoch
            target.reset()
            metric.update(*_losses(rank))
            failures += _expect_mismatch(tag, target.compute, "synced compute() calls", "this rank: 0")
        # after a reset on every rank the ranks agree again
        target.reset()
        metric.update(*_losses(rank))
        result = target.compute()
        value = float(result if kind == "metric" else result["score"])
        failures += [
            f"{tag} after reset: {p}" for p in compare({"v": value}, {"v": _all_ranks_score(world_size)})
        ]
    return failures


def sync_failures(rank: int, world_size: int) -> list[str]:
    """Issue 12 items 1-3 in one group: every scenario leaves all ranks in step for the next."""
    return (
        _raises_after_sync(rank, world_size)
        + _idle_rank_no_warning(rank, world_size)
        + _fingerprint_mismatches(rank, world_size)
    )


def rank_skips_compute(rank: int, world_size: int, group_timeout: float) -> list[str]:
    """Item 5: rank 1 never calls compute(); rank 0's sync fails after the process-group timeout
    with a message naming what was syncing and the likely cause (metric, then collection)."""
    if rank != 0:
        time.sleep(2 * group_timeout + 4)  # outlives both of rank 0's waits
        return []
    failures = []
    targets = {
        "ReconstructionScore.compute()": ReconstructionScore(),
        "DiagnosticCollection.compute() of 1 metrics (reconstruction/score)": DiagnosticCollection(
            {"reconstruction/score": ReconstructionScore()}
        ),
    }
    for label, target in targets.items():
        start = time.monotonic()
        try:
            target.compute()
            failures.append(f"{label}: no error")
        except SyncFailedError as err:
            needles = [label, "a rank did not call compute()", "init_process_group(timeout=...)"]
            failures += [f"{label}: message lacks {n!r}: {err}" for n in needles if n not in str(err)]
        except Exception as err:
            failures.append(f"{label}: raised {type(err).__name__} instead of SyncFailedError: {err}")
        if time.monotonic() - start > group_timeout + 10:
            failures.append(f"{label}: waited {time.monotonic() - start:.0f} s")
    return failures
