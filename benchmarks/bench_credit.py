"""Benchmark: batched direction evaluation of PerturbationCorrelation vs a loop of M loss_fn calls.

Both sides draw the same number of random directions (uniform on the sphere) and evaluate the same
small-MLP loss on the same rows; the batched side stacks all directions (plus the unperturbed rows)
into one ``loss_fn`` call, the loop calls ``loss_fn`` once per direction (the straightforward
implementation). Prints one JSON object; runs in well under a minute.

    python benchmarks/bench_credit.py [--threads 1] [--repeats 40] [--width 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from metrics_suite import PerturbationCorrelation
from metrics_suite.functional import perturbation_pairs

BATCH, DIM, DIRECTIONS, EPSILON = 64, 256, 32, 1e-3


class MLPLoss(nn.Module):
    """Per-item cross-entropy of a small MLP head; targets are tiled over the stacked rows."""

    def __init__(self, dim: int, width: int, classes: int, targets: Tensor) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, classes))
        self.register_buffer("targets", targets)

    def forward(self, hidden: Tensor) -> Tensor:
        # rows come as whole copies of the batch (row s*N + i is item i)
        targets = self.targets.repeat(hidden.shape[0] // self.targets.shape[0])
        return nn.functional.cross_entropy(self.net(hidden), targets, reduction="none")


def loop_pairs(
    hidden: Tensor, credit: Tensor, loss_fn: Callable[[Tensor], Tensor], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The straightforward implementation: one loss_fn call per direction."""
    with torch.no_grad():
        base = loss_fn(hidden)
        predicted, true = [], []
        for _ in range(DIRECTIONS):
            v = torch.randn(hidden.shape, generator=generator)
            step = EPSILON * v / v.norm(dim=-1, keepdim=True)
            predicted.append((credit * step).sum(-1))
            true.append(loss_fn(hidden + step) - base)
    return torch.stack(predicted, 1), torch.stack(true, 1)


def best_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(minimum, median) wall time in ms over ``repeats`` runs after a warm-up."""
    return interleaved_ms([fn], repeats)[0]


def interleaved_ms(fns: list[Callable[[], object]], repeats: int) -> list[tuple[float, float]]:
    """Like :func:`best_ms` for several functions, alternating them so load changes hit all alike."""
    for fn in fns:
        for _ in range(3):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return [(min(t), statistics.median(t)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared box)"
    )
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--width", type=int, default=64, help="hidden width of the MLP")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    hidden = torch.randn(BATCH, DIM)
    loss_fn = MLPLoss(DIM, args.width, 10, torch.randint(10, (BATCH,)))
    hidden.requires_grad_(True)
    loss_fn(hidden).sum().backward()
    credit = hidden.grad.detach() + 0.1 * torch.randn(BATCH, DIM)  # a noisy gradient as credit
    hidden = hidden.detach()
    loss_fn.requires_grad_(False)

    calls = {"batched": 0, "loop": 0}

    def counted(kind: str) -> Callable[[Tensor], Tensor]:
        def call(h: Tensor) -> Tensor:
            calls[kind] += 1
            return loss_fn(h)

        return call

    gen_b, gen_l = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    perturbation_pairs(hidden, credit, counted("batched"), EPSILON, DIRECTIONS, "forward", gen_b)
    loop_pairs(hidden, credit, counted("loop"), gen_l)

    batched_min, batched_med = best_ms(
        lambda: perturbation_pairs(hidden, credit, loss_fn, EPSILON, DIRECTIONS, "forward", gen_b),
        args.repeats,
    )
    loop_min, loop_med = best_ms(lambda: loop_pairs(hidden, credit, loss_fn, gen_l), args.repeats)
    metric = PerturbationCorrelation(epsilon=EPSILON, num_directions=DIRECTIONS, seed=0)
    metric_min, _ = best_ms(lambda: metric.update(hidden, credit, loss_fn), args.repeats)
    # where the batched time goes: both parts are shared with the loop, which adds per-call overhead
    stacked = hidden.repeat(DIRECTIONS + 1, 1)
    sampling_min, _ = best_ms(lambda: torch.randn(DIRECTIONS, BATCH, DIM, generator=gen_b), args.repeats)
    with torch.no_grad():
        loss_min, _ = best_ms(lambda: loss_fn(stacked), args.repeats)

    result = {
        "benchmark": "perturbation_correlation: batched directions vs loop of M loss_fn calls",
        "ratio": round(loop_min / batched_min, 2),
        "ratio_median": round(loop_med / batched_med, 2),
        "batched_ms": round(batched_min, 3),
        "loop_ms": round(loop_min, 3),
        "metric_update_ms": round(metric_min, 3),
        "breakdown_ms": {
            "direction_sampling": round(sampling_min, 3),
            "stacked_loss_eval": round(loss_min, 3),
        },
        "loss_fn_calls": {"batched": calls["batched"], "loop": calls["loop"]},
        "rho": round(metric.compute().item(), 4),
        "config": {
            "batch": BATCH,
            "dim": DIM,
            "directions": DIRECTIONS,
            "mlp": f"Linear({DIM},{args.width})-GELU-Linear({args.width},10)-cross_entropy",
            "threads": args.threads,
            "repeats": args.repeats,
            "torch": torch.__version__,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
