"""``--device`` for the benchmark scripts: parsed and checked once, and a clock that waits for the device.

CUDA kernels run asynchronously: a wall-clock time read without synchronising measures the launch,
not the work. ``timed`` synchronises before starting and before stopping the clock.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def parse_device(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine has; anything else is a usage error."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: {err}") from err
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= (
        torch.cuda.device_count() if torch.cuda.is_available() else 0
    ):
        raise argparse.ArgumentTypeError(f"{text!r}: no such CUDA device on this machine")
    return device


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
