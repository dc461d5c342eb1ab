"""Benchmark of NextTokenDivergence.update: speed against a naive implementation and a floor, and memory.

Prints one JSON document. For each case (logits ``[B, T, V]``, 200 of 256 positions attended per
sequence, full vocabulary and ``num_logits=64``):

* ``update_ms``: median wall time of ``NextTokenDivergence.update`` with every output (the six
  divergences and top-1 agreement), sketch off; ``update_sketch_ms``: the same with
  ``quantiles=(0.5, 0.9, 0.99)`` (one quantile sketch per divergence).
* ``naive_ms``: four separate functions (Jeffreys, JS, TV, squared Hellinger), each with its own
  ``log_softmax`` of both inputs over the whole ``[B, T, V]`` tensor, then masked sequence means.
* ``floor_ms``: the fastest pass found that only computes ``log_softmax`` of both inputs (no
  divergence math at all): the attended rows gathered with ``index_select`` into reused buffers and
  ``log_softmax(out=)`` in chunks of each of :data:`FLOOR_CHUNK_ROWS` rows, and one ``log_softmax``
  of each whole ``[B, T, V]`` tensor (masked rows included). Every round times every candidate;
  ``floor_ms`` is the median over rounds of the fastest candidate of the round, and
  ``floor_candidates_ms`` the median of each, so the chosen chunk size is visible. A floor chunked
  like ``update`` would flatter ``update``.
* ``speedup_vs_naive`` = naive / update (target >= 10) and ``ratio_to_floor`` = update / floor,
  ``ratio_to_floor_sketch`` = update with sketch / floor (target <= 4): medians of the per-round
  ratios. A round runs the floor candidates and both updates back to back (interleaved, one process),
  so load from other processes hits them alike.

Memory: ``extra_peak_mib`` is the growth of the process's peak resident set (Linux ``VmHWM``) during
one ``update``, measured in a fresh process per case: inputs are created and a tiny warm-up update
runs first, freed memory is returned to the OS (``malloc_trim``), then the peak is reset
(``/proc/self/clear_refs``) and read back after the update.
This counts every page the update touches (tensors, allocator overhead, thread stacks), not an
estimate; the same measurement of the naive implementation (``memory_naive_reference``) shows it
sees full-size intermediates. Target: <= 64 MiB, independent of B and T.

Usage: ``python benchmarks/bench_divergence.py [--reps 5] [--naive-reps 2] [--threads N] [--no-memory]
[--device cpu]``
(about 2.5 minutes on 2 idle cores). Timings on a shared machine are noisy: compare the per-repetition
ratios and the recorded load average.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _device import add_device_argument, timed
from _memory import memory_summary, peak_growth_mib, run_worker
from torch import Tensor

from metrics_suite import NextTokenDivergence
from metrics_suite.functional._chunks import LOGIT_CHUNK_BYTES
from metrics_suite.functional.utility import chunk_rows, top_k_support_mask

LN2 = math.log(2.0)
ATTENDED = 200
SEQ = 256
#: Row counts per chunk tried for the floor (the default chunk of ``update`` is 16 rows at V = 32000).
FLOOR_CHUNK_ROWS = (4, 8, 16, 32, 64, 128)
QUANTILES = (0.5, 0.9, 0.99)
CASES = [  # (batch, vocab)
    (4, 32000),
    (1, 128256),
]
MEMORY_CASES = [  # (batch, sequence, vocab): B × T grows 16x (V = 32000) and 4x (V = 128256)
    (1, 256, 32000),
    (4, 1024, 32000),
    (1, 256, 128256),
    (1, 1024, 128256),
]


def make_inputs(batch: int, seq: int, vocab: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Clean logits ~ N(0, 4), noisy = clean + N(0, 0.25); built in place (no freed temporaries)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(batch, seq, vocab, generator=g).mul_(2.0)
    noisy = torch.randn(batch, seq, vocab, generator=g).mul_(0.5).add_(clean)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[:, : round(seq * ATTENDED / SEQ)] = True
    return clean, noisy, mask


# ---------------------------------------------------------------------------------------------- naive
def _log_probs(clean: Tensor, noisy: Tensor, support: Tensor | None) -> tuple[Tensor, Tensor]:
    if support is not None:
        clean = clean.masked_fill(~support, -math.inf)
        noisy = noisy.masked_fill(~support, -math.inf)
    return torch.log_softmax(clean.float(), -1), torch.log_softmax(noisy.float(), -1)


def _restrict(terms: Tensor, support: Tensor | None) -> Tensor:
    return terms if support is None else torch.where(support, terms, 0.0)


def naive_jeffreys(clean: Tensor, noisy: Tensor, support: Tensor | None = None) -> Tensor:
    lp, lq = _log_probs(clean, noisy, support)
    return _restrict((lp.exp() - lq.exp()) * (lp - lq), support).sum(-1)


def naive_jensen_shannon(clean: Tensor, noisy: Tensor, support: Tensor | None = None) -> Tensor:
    lp, lq = _log_probs(clean, noisy, support)
    lm = torch.logaddexp(lp, lq) - LN2
    terms = 0.5 * lp.exp() * (lp - lm) + 0.5 * lq.exp() * (lq - lm)
    return _restrict(terms, support).sum(-1)


def naive_total_variation(clean: Tensor, noisy: Tensor, support: Tensor | None = None) -> Tensor:
    lp, lq = _log_probs(clean, noisy, support)
    return 0.5 * _restrict((lp.exp() - lq.exp()).abs(), support).sum(-1)


def naive_squared_hellinger(clean: Tensor, noisy: Tensor, support: Tensor | None = None) -> Tensor:
    lp, lq = _log_probs(clean, noisy, support)
    return 0.5 * _restrict(((0.5 * lp).exp() - (0.5 * lq).exp()) ** 2, support).sum(-1)


NAIVE = {
    "jeffreys": naive_jeffreys,
    "jensen_shannon": naive_jensen_shannon,
    "total_variation": naive_total_variation,
    "squared_hellinger": naive_squared_hellinger,
}


def naive_update(clean: Tensor, noisy: Tensor, mask: Tensor, num_logits: int | None) -> dict[str, float]:
    """Sequence-reduced divergences, the straightforward way."""
    support = None if num_logits is None else top_k_support_mask(noisy, clean, num_logits)
    counts = mask.sum(1)
    out = {}
    for name, fn in NAIVE.items():
        per_token = fn(clean, noisy, support)
        per_sequence = (per_token * mask).sum(1) / counts.clamp_min(1)
        out[name] = float(per_sequence[counts > 0].double().mean())
    return out


# ---------------------------------------------------------------------------------------------- floor
def floor_chunked(clean: Tensor, noisy: Tensor, positions: Tensor, rows: int, buffers: list[Tensor]) -> None:
    """log_softmax of both inputs over the attended rows, ``rows`` at a time, into reused buffers."""
    vocab = clean.shape[-1]
    gathered, log_probs = buffers
    flat_clean, flat_noisy = clean.view(-1, vocab), noisy.view(-1, vocab)
    for start in range(0, positions.numel(), rows):
        chunk = positions[start : start + rows]
        n = chunk.numel()
        for flat in (flat_clean, flat_noisy):
            torch.log_softmax(torch.index_select(flat, 0, chunk, out=gathered[:n]), -1, out=log_probs[:n])


def floor_whole(clean: Tensor, noisy: Tensor) -> None:
    """One log_softmax of each whole tensor (masked rows included, no gather, full-size outputs)."""
    torch.log_softmax(clean, -1)
    torch.log_softmax(noisy, -1)


def floor_candidates(clean: Tensor, noisy: Tensor, mask: Tensor) -> dict[str, Callable[[], None]]:
    """Every log_softmax-only pass tried as the floor, by name."""
    vocab = clean.shape[-1]
    positions = mask.reshape(-1).nonzero().squeeze(-1)
    candidates: dict[str, Callable[[], None]] = {"whole": lambda: floor_whole(clean, noisy)}
    for rows in FLOOR_CHUNK_ROWS:
        buffers = [torch.empty(rows, vocab, device=clean.device) for _ in range(2)]
        candidates[f"chunk_{rows}"] = functools.partial(floor_chunked, clean, noisy, positions, rows, buffers)
    return candidates


# ---------------------------------------------------------------------------------------------- timing
def _ms(seconds: list[float]) -> float:
    return round(1e3 * statistics.median(seconds), 2)


def time_case(
    batch: int, vocab: int, num_logits: int | None, reps: int, naive_reps: int, device: torch.device
) -> dict[str, Any]:
    clean, noisy, mask = (t.to(device) for t in make_inputs(batch, SEQ, vocab))
    metric = NextTokenDivergence(num_logits=num_logits).to(device)
    sketched = NextTokenDivergence(num_logits=num_logits, quantiles=QUANTILES).to(device)
    floors = floor_candidates(clean, noisy, mask)
    for warm in (metric, sketched):
        warm.update(clean[:1, :4], noisy[:1, :4], mask[:1, :4])
    for fn in floors.values():
        fn()
    naive_reps = max(1, min(naive_reps, reps))
    candidate_times: dict[str, list[float]] = {name: [] for name in floors}
    times: dict[str, list[float]] = {"update": [], "update_sketch": [], "floor": [], "naive": []}
    for rep in range(reps):
        for name, fn in floors.items():
            candidate_times[name].append(timed(fn, device))
        times["floor"].append(min(t[-1] for t in candidate_times.values()))
        times["update"].append(timed(lambda: metric.update(clean, noisy, mask), device))
        times["update_sketch"].append(timed(lambda: sketched.update(clean, noisy, mask), device))
        if rep < naive_reps:
            times["naive"].append(timed(lambda: naive_update(clean, noisy, mask, num_logits), device))
    # agreement with the naive implementation (float32 math on both sides)
    check = NextTokenDivergence(num_logits=num_logits).to(device)
    check.update(clean, noisy, mask)
    ours = {k: float(v) for k, v in check.compute().items()}
    naive = naive_update(clean, noisy, mask, num_logits)
    speedups = [n / u for n, u in zip(times["naive"], times["update"])]
    floor_ratios = [u / f for u, f in zip(times["update"], times["floor"])]
    sketch_ratios = [u / f for u, f in zip(times["update_sketch"], times["floor"])]
    candidates_ms = {name: _ms(t) for name, t in candidate_times.items()}
    return {
        "batch": batch,
        "sequence": SEQ,
        "vocab": vocab,
        "attended_per_sequence": ATTENDED,
        "num_logits": num_logits,
        "update_ms": _ms(times["update"]),
        "update_sketch_ms": _ms(times["update_sketch"]),
        "floor_ms": _ms(times["floor"]),
        "floor_best_candidate": min(candidates_ms, key=candidates_ms.__getitem__),
        "floor_candidates_ms": candidates_ms,
        "naive_ms": _ms(times["naive"]),
        "speedup_vs_naive": round(statistics.median(speedups), 2),
        "ratio_to_floor": round(statistics.median(floor_ratios), 2),
        "ratio_to_floor_sketch": round(statistics.median(sketch_ratios), 2),
        "ratio_to_floor_all": [round(r, 2) for r in floor_ratios],
        "ratio_to_floor_sketch_all": [round(r, 2) for r in sketch_ratios],
        "sketch_cost": round(statistics.median(sketch_ratios) / statistics.median(floor_ratios) - 1.0, 3),
        "meets_speedup_target_10x": statistics.median(speedups) >= 10,
        "meets_floor_target_4x": statistics.median(sketch_ratios) <= 4,
        "max_rel_diff_vs_naive": max(abs(ours[k] - naive[k]) / abs(naive[k]) for k in naive),
        "values": {k: round(v, 6) for k, v in ours.items()},
    }


# ---------------------------------------------------------------------------------------------- memory
def memory_worker(
    batch: int, seq: int, vocab: int, num_logits: int | None, naive: bool = False
) -> dict[str, Any]:
    """Run in a fresh process: peak RSS growth during one update (or one naive evaluation)."""
    clean, noisy, mask = make_inputs(batch, seq, vocab)
    metric = NextTokenDivergence(num_logits=num_logits)
    metric.update(clean[:1, :2, :64].clone(), noisy[:1, :2, :64].clone(), mask[:1, :2])  # warm-up
    extra = peak_growth_mib(
        lambda: naive_update(clean, noisy, mask, num_logits) if naive else metric.update(clean, noisy, mask),
        "cpu",
    )
    buffers = 6 if num_logits is None else 2  # [chunk, V] float32 buffers held by update
    return {
        "implementation": "naive" if naive else "update",
        "batch": batch,
        "sequence": seq,
        "vocab": vocab,
        "num_logits": num_logits,
        "input_mib": round(2 * clean.numel() * 4 / 2**20, 1),
        "extra_peak_mib": extra,
        "update_workspace_mib": round(
            buffers * chunk_rows(vocab, torch.float32, batch, seq) * vocab * 4 / 2**20, 1
        ),
    }


def measure_memory(
    batch: int, seq: int, vocab: int, num_logits: int | None, naive: bool = False
) -> dict[str, Any]:
    return run_worker(__file__, [batch, seq, vocab, num_logits, naive])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of update and floor (median)")
    parser.add_argument("--naive-reps", type=int, default=2, help="repetitions of the naive implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(*json.loads(args.memory_worker))))
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cases = [
        time_case(batch, vocab, num_logits, args.reps, args.naive_reps, args.device)
        for batch, vocab in CASES
        for num_logits in (None, 64)
    ]
    # peak RSS is host memory: it says nothing about a GPU run
    no_memory = args.no_memory or args.device.type != "cpu"
    memory = [] if no_memory else [measure_memory(b, t, v, k) for b, t, v in MEMORY_CASES for k in (None, 64)]
    # the same measurement sees the naive implementation's full-size intermediates
    naive_memory = [] if no_memory else [measure_memory(*MEMORY_CASES[0], None, naive=True)]
    report = {
        "environment": {
            "torch": torch.__version__,
            "device": str(args.device),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "default_chunk_bytes": LOGIT_CHUNK_BYTES,
            "load_average": os.getloadavg(),
        },
        "timing": cases,
        "memory": memory,
        "memory_naive_reference": naive_memory,
        **memory_summary(memory),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
