"""Test utilities: run a function on real gloo ranks, and count the collectives it issues.

Used by our own distributed tests and benchmarks, and usable for your own metrics::

    from metrics_suite.testing import run_distributed

    def check(rank: int, world_size: int) -> float:
        ...  # build metrics, update with this rank's shard, compute
        return value

    results = run_distributed(check, world_size=2)  # one entry per rank
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist

__all__ = ["DistributedError", "count_collectives", "free_port", "run_distributed"]

#: torch.distributed functions that talk to other ranks.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "reduce_scatter",
    "gather",
    "scatter",
    "all_to_all",
    "send",
    "recv",
)


class DistributedError(RuntimeError):
    """A rank raised, or the group did not finish in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it, so parallel runs differ)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter[str]]:
    """Count calls to torch.distributed collectives inside the block.

    Examples:
        >>> with count_collectives() as calls:
        ...     pass
        >>> sum(calls.values())
        0
    """
    calls: Counter[str] = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    timeout_s: float,
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh gloo processes on loopback.

    ``fn`` must be importable (a module-level function) and its result picklable. Returns the
    results ordered by rank. Raises :class:`DistributedError` with the failing ranks' tracebacks
    if any rank raises or the group does not finish within ``timeout`` seconds; every process
    is terminated before this function returns, whatever happens.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(rank, world_size, port, fn, args, results, min(timeout, 120.0)), daemon=True
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, tuple[bool, Any]] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(collected) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
                continue
            collected[rank] = (ok, value)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    failures = {r: v for r, (ok, v) in collected.items() if not ok}
    missing = sorted(set(range(world_size)) - set(collected))
    if failures or missing:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        raise DistributedError(
            f"distributed run failed (world_size={world_size}); ranks without a result: {missing}\n{text}"
        )
    return [collected[r][1] for r in range(world_size)]
