"""``--device`` for the benchmark scripts: parsed and checked once, and a clock that waits for the device.

CUDA kernels run asynchronously: a wall-clock time read without synchronising measures the launch,
not the work. ``timed`` synchronises before starting and before stopping the clock.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from metrics_suite.testing import check_device


def parse_device(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine has; anything else is a usage error."""
    try:
        return check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        type=parse_device,
        default=torch.device("cpu"),
        help="torch device: cpu (default), cuda, cuda:N",
    )


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes on ``device``, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start
