"""Sync cost of one four-suite collection: our fused compute vs torchmetrics' per-state sync.

Runs on real gloo processes (2 and 4 by default) and prints JSON: collectives issued per
compute, and the median time of

* ``collection.compute()`` -- one fused ``all_reduce`` (+ a tiny all_gather layout check), then
  every metric computed locally, states restored;
* the same ``collection.compute()`` with NextTokenDivergence's quantile sketch off (``sketch``:
  state elements and time, on vs off);
* torchmetrics' default per-state sync alone (``Metric._sync_dist`` with ``gather_all_tensors``:
  a barrier and two ``all_gather`` calls per state) over the same states, no compute.

``ratio`` = torchmetrics time / our time (higher is better for us).

``--device cuda`` puts every rank's states on a GPU (rank r on ``cuda:r mod #GPUs``) and still
uses gloo, which implements ``all_reduce`` and ``all_gather`` for CUDA tensors by staging them
through host memory: the collective counts carry over, the times include those copies and are not
NCCL's (run under a launcher with NCCL for that).

Usage: python benchmarks/bench_sync.py [--world-sizes 2 4] [--repeats 30] [--out FILE] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _device import add_device_argument, timed
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from metrics_suite.collection import DiagnosticCollection
from metrics_suite.reconstruction import ReconstructionScore
from metrics_suite.registry import registered
from metrics_suite.testing import count_collectives, run_distributed

MIN_STATES = 48


def _build_collection(device: torch.device, sketch: bool = True) -> DiagnosticCollection:
    """Every registered metric, updated with its example; ``sketch=False`` turns the quantile sketch
    of NextTokenDivergence off (its example has it on), to measure what the sketch adds to a sync."""
    metrics: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    for entry in registered():
        kwargs = dict(entry.example.init_kwargs)
        if not sketch and "quantiles" in kwargs:
            kwargs["quantiles"] = None
        metric = entry.cls(**kwargs)
        metric.update(**entry.example.make_batch(g, 8))  # on the CPU, then moved with the states
        metrics[f"{entry.suite}/{entry.name}"] = metric
    # stand-ins until the registry alone has enough states
    i = 0
    while sum(len(m._defaults) for m in metrics.values()) < MIN_STATES:
        metric = ReconstructionScore(num_components=4)
        metric.update(
            torch.rand(8, 4, generator=g), torch.rand(8, 4, generator=g), torch.rand(8, 4, generator=g) + 1
        )
        metrics[f"standin/score_{i}"] = metric
        i += 1
    return DiagnosticCollection(metrics).to(device)


def _state_elements(collection: DiagnosticCollection) -> int:
    return sum(getattr(m, name).numel() for m in collection.values(copy_state=False) for name in m._defaults)


def _median_ms(fn: Any, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        times.append(timed(fn, device) * 1e3)
    return statistics.median(times)


def _torchmetrics_sync(collection: DiagnosticCollection) -> None:
    for metric in collection.values(copy_state=False):
        cache = metric._copy_state_dict()
        Metric._sync_dist(metric, gather_all_tensors)  # torchmetrics' own per-state sync
        for attr, value in cache.items():
            setattr(metric, attr, value)


def _worker(rank: int, world_size: int, repeats: int, device_type: str) -> dict[str, Any]:
    device = (
        torch.device(device_type, rank % torch.cuda.device_count())
        if device_type == "cuda"
        else torch.device("cpu")
    )
    collection = _build_collection(device)
    with count_collectives() as ours_calls:
        collection.compute()
    with count_collectives() as tm_calls:
        _torchmetrics_sync(collection)
    ours_ms = _median_ms(collection.compute, repeats, device)
    tm_ms = _median_ms(lambda: _torchmetrics_sync(collection), repeats, device)
    no_sketch = _build_collection(device, sketch=False)
    no_sketch_ms = _median_ms(no_sketch.compute, repeats, device)
    return {
        "world_size": world_size,
        "device": str(device),
        "metrics": len(collection),
        "states": sum(len(m._defaults) for m in collection.values(copy_state=False)),
        "ours_collection_compute": {"median_ms": round(ours_ms, 3), "collectives": dict(ours_calls)},
        "torchmetrics_per_state_sync": {"median_ms": round(tm_ms, 3), "collectives": dict(tm_calls)},
        "ratio": round(tm_ms / ours_ms, 1),
        # the same collection with NextTokenDivergence's quantile sketch off
        "sketch": {
            "on": {"median_ms": round(ours_ms, 3), "state_elements": _state_elements(collection)},
            "off": {"median_ms": round(no_sketch_ms, 3), "state_elements": _state_elements(no_sketch)},
            "time_ratio_on_vs_off": round(ours_ms / no_sketch_ms, 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    add_device_argument(parser)
    args = parser.parse_args()
    results = [
        run_distributed(_worker, ws, args.repeats, args.device.type, timeout=600)[0]
        for ws in args.world_sizes
    ]
    text = json.dumps({"benchmark": "sync", "results": results}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
