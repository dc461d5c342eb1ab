"""Benchmark of DownstreamReconstruction.update against the SAELens-style computation: speed and memory.

Prints one JSON document. For each case (three logits ``[B, T, V]``, 200 of 256 positions attended per
sequence, with targets):

* ``update_ms``: median wall time of ``DownstreamReconstruction.update``.
* ``reference_ms``: the SAELens-style computation: three full ``log_softmax`` tensors, ``F.kl_div`` of
  clean against spliced and against ablated, ``F.cross_entropy`` of the three models, masked means.
* ``speedup`` = reference / update, median of the per-repetition ratios (target >= 5).

Memory: ``extra_peak_mib`` is the growth of the process's peak resident set (Linux ``VmHWM``) during
one call, in a fresh process per case: inputs are built and a tiny warm-up runs first, freed memory
goes back to the OS (``malloc_trim``), the peak is reset (``/proc/self/clear_refs``) and read after
the call. It counts every page touched (tensors, allocator overhead, thread stacks). With
``--device cuda`` it is ``torch.cuda.max_memory_allocated`` growth instead. Target: <= 64 MiB, flat in
B and T (the reference needs several ``[B, T, V]`` tensors).

Usage: ``python benchmarks/bench_downstream.py [--reps 5] [--device cpu] [--no-memory]``.
Timings on a loaded machine are noisy: the per-repetition ratios and the load average are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from _device import add_device_argument, timed
from _memory import memory_summary, peak_growth_mib, run_worker
from torch import Tensor

from metrics_suite import DownstreamReconstruction

ATTENDED = 200
SEQ = 256
CASES = [(4, 32000), (1, 128256)]  # (batch, vocab)
MEMORY_CASES = [(1, 256, 32000), (4, 256, 32000), (4, 1024, 32000), (1, 256, 128256)]  # (B, T, V)


def make_inputs(batch: int, seq: int, vocab: int, device: torch.device | str) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(batch, seq, vocab, generator=g) * 3.0
    spliced = clean + torch.randn(batch, seq, vocab, generator=g)
    ablated = torch.randn(batch, seq, vocab, generator=g) * 3.0
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[:, : min(ATTENDED, seq)] = True
    return tuple(x.to(device) for x in (clean, spliced, ablated, targets, mask))


def reference(
    clean: Tensor, spliced: Tensor, ablated: Tensor, targets: Tensor, mask: Tensor
) -> dict[str, float]:
    """SAELens-style: full log-probability tensors, F.kl_div, F.cross_entropy, masked token means."""
    lp, ls, la = (F.log_softmax(x, -1) for x in (clean, spliced, ablated))
    kl_spliced = F.kl_div(ls, lp, log_target=True, reduction="none").sum(-1)[mask]
    kl_ablated = F.kl_div(la, lp, log_target=True, reduction="none").sum(-1)[mask]
    ce = [
        F.cross_entropy(x.transpose(1, 2), targets, reduction="none")[mask] for x in (clean, spliced, ablated)
    ]
    return {
        "kl_score": float((kl_ablated.sum() - kl_spliced.sum()) / kl_ablated.sum()),
        "ce_score": float((ce[2].sum() - ce[1].sum()) / (ce[2].sum() - ce[0].sum())),
    }


def time_case(batch: int, vocab: int, reps: int, device: torch.device) -> dict[str, Any]:
    inputs = make_inputs(batch, SEQ, vocab, device)
    metric = DownstreamReconstruction().to(device)
    metric.update(*(x[:1, :4] for x in inputs))  # warm-up of both sides
    reference(*(x[:1, :4] for x in inputs))
    times: dict[str, list[float]] = {"update": [], "reference": []}
    for _ in range(reps):
        times["reference"].append(timed(lambda: reference(*inputs), device))
        times["update"].append(timed(lambda: metric.update(*inputs), device))
    check = DownstreamReconstruction().to(device)
    check.update(*inputs)
    ours = check.compute()
    ref = reference(*inputs)
    return {
        "batch": batch,
        "sequence": SEQ,
        "vocab": vocab,
        "attended_per_sequence": ATTENDED,
        "update_ms": round(1e3 * statistics.median(times["update"]), 1),
        "reference_ms": round(1e3 * statistics.median(times["reference"]), 1),
        "speedup": round(statistics.median(r / u for r, u in zip(times["reference"], times["update"])), 2),
        "per_rep_speedup": [round(r / u, 2) for r, u in zip(times["reference"], times["update"])],
        "abs_diff_vs_reference": {k: abs(float(ours[k]) - v) for k, v in ref.items()},
    }


def memory_worker(batch: int, seq: int, vocab: int, device: str, ref: bool) -> dict[str, Any]:
    """Run in a fresh process: peak memory growth during one update (or one reference evaluation)."""
    inputs = make_inputs(batch, seq, vocab, device)
    metric = DownstreamReconstruction().to(device)
    clean, spliced, ablated, targets, mask = (x[:1, :2] for x in inputs)
    metric.update(
        clean[..., :64].clone(), spliced[..., :64].clone(), ablated[..., :64].clone(), targets % 64, mask
    )
    return {
        "implementation": "reference" if ref else "update",
        "batch": batch,
        "sequence": seq,
        "vocab": vocab,
        "input_mib": round(3 * inputs[0].numel() * 4 / 2**20, 1),
        "extra_peak_mib": peak_growth_mib(
            lambda: reference(*inputs) if ref else metric.update(*inputs), device
        ),
    }


def measure_memory(batch: int, seq: int, vocab: int, device: str, ref: bool = False) -> dict[str, Any]:
    return run_worker(__file__, [batch, seq, vocab, device, ref])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of update and reference (median)")
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(*json.loads(args.memory_worker))))
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    timing = [time_case(batch, vocab, args.reps, args.device) for batch, vocab in CASES]
    memory = [] if args.no_memory else [measure_memory(b, t, v, str(args.device)) for b, t, v in MEMORY_CASES]
    ref_memory = [] if args.no_memory else [measure_memory(*MEMORY_CASES[1], str(args.device), ref=True)]
    report = {
        "environment": {
            "torch": torch.__version__,
            "device": str(args.device),
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "memory_method": "cuda max_memory_allocated"
            if args.device.type == "cuda"
            else "process peak RSS (VmHWM) growth, fresh process per case",
        },
        "timing": timing,
        "min_speedup": min(t["speedup"] for t in timing),
        "meets_speed_target_5x": all(t["speedup"] >= 5 for t in timing),
        "memory": memory,
        "memory_reference": ref_memory,
        **memory_summary(memory),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
