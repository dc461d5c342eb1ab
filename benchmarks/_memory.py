"""Peak memory of one call, measured in a fresh process: the benchmarks' shared memory probe.

On the CPU the probe reads the process's peak resident set (Linux ``VmHWM``): memory freed so far
goes back to the OS (``malloc_trim``), the peak is reset to the current RSS
(``/proc/self/clear_refs``) and read back after the call. This counts every page the call touches
(tensors, allocator overhead, thread stacks), not an estimate. On CUDA it reads the caching
allocator's peak (``torch.cuda.max_memory_allocated``).

A benchmark runs each case in a fresh process (`run_worker`), so one case's freed pages cannot
hide the next one's growth.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth_mib(fn: Callable[[], object], device: torch.device | str) -> float:
    """Growth of the peak memory (MiB) while ``fn()`` runs: process RSS on the CPU, allocator on CUDA."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current RSS
    fn()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return round((peak - before) / 2**20, 1)


def memory_summary(memory: list[dict[str, Any]], target_mib: float = 64) -> dict[str, Any]:
    """The summary keys of a benchmark's memory cases: the largest extra peak and whether every case
    meets ``target_mib`` (both None when memory was not measured)."""
    return {
        "memory_max_extra_peak_mib": max((m["extra_peak_mib"] for m in memory), default=None),
        f"meets_memory_target_{target_mib:g}mib": all(m["extra_peak_mib"] <= target_mib for m in memory)
        if memory
        else None,
    }


def run_worker(script: str, args: list[Any]) -> dict[str, Any]:
    """Run ``script --memory-worker '<json args>'`` in a fresh interpreter and parse its JSON output.

    The current directory goes first on the worker's ``PYTHONPATH``, so a benchmark run from a
    checkout measures that checkout's package.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, script, "--memory-worker", json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(done.stdout)
