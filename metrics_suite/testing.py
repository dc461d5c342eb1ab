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
import functools
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

#: torch.distributed functions that talk to other ranks (absent ones, e.g. deprecated in this torch, are skipped).
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_coalesced",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "send_object_list",
    "recv_object_list",
    "_all_gather_base",
    "_reduce_scatter_base",
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
    """Count calls to the ``torch.distributed`` functions in [`COLLECTIVES`][metrics_suite.testing.COLLECTIVES] inside the block.

    Counts calls made through the ``torch.distributed`` namespace (what metrics, torchmetrics and
    Lightning use); a call that torch makes internally (``all_gather_object`` gathering through
    ``all_gather``) counts once, under the name called. ``P2POp`` built inside the block accepts the
    counted ``isend``/``irecv``; ``batch_isend_irecv`` counts as one call. Direct ``ProcessGroup``
    method calls and functional collectives are not seen.

    Examples:
        >>> with count_collectives() as calls:
        ...     pass
        >>> sum(calls.values())
        0
    """
    calls: Counter[str] = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    counted: dict[Any, Any] = {}  # counting wrapper -> original

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)

        counted[wrapper] = fn
        return wrapper

    original_p2p = dist.P2POp

    class P2POp(original_p2p):  # type: ignore[misc, valid-type]
        # torch checks ``op`` by identity against its own isend/irecv: hand it the originals
        def __new__(cls, op: Any, *args: Any, **kwargs: Any) -> Any:
            return super().__new__(cls, counted.get(op, op), *args, **kwargs)

        def __init__(self, op: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(counted.get(op, op), *args, **kwargs)

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    dist.P2POp = P2POp  # type: ignore[misc]
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        dist.P2POp = original_p2p  # type: ignore[misc]


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


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    process_group_timeout: float | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh gloo processes on loopback.

    ``fn`` must be importable (a module-level function) and its result picklable. Returns the
    results ordered by rank. Raises [`DistributedError`][metrics_suite.testing.DistributedError] with the failing ranks' tracebacks
    if any rank raises or the group does not finish within ``timeout`` seconds; every process
    is terminated before this function returns, whatever happens. ``process_group_timeout``
    (seconds; default ``min(timeout, 120)``) is what ``init_process_group(timeout=...)`` gets: how
    long a collective waits for a rank that never joins it.
    """
    group_timeout = min(timeout, 120.0) if process_group_timeout is None else process_group_timeout
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(rank, world_size, port, fn, args, results, group_timeout), daemon=True
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
