"""Devices (DESIGN.md section 5): the ``--device`` option, results on a device equal to the CPU's, and
the host round trips each metric's ``update`` makes, held to a per-metric budget."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metrics_suite.registry import RegisteredMetric, registered
from metrics_suite.testing import check_device
from tests.helpers import compare, example_batches, flat, make_metric

ENTRIES = registered()
aten = torch.ops.aten

# ops that wait for the device whatever their arguments: a value read back (``item``, ``bool()``,
# ``int()``), an output size known only from the data, or CUDA kernels that read a size first
# (bincount reads the largest index back)
_SYNCING = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.bincount.default: "bincount",
    aten.equal.default: "equal",
}
# ops that sync when indexed with a boolean mask (the kernel gathers with nonzero first)
_MASK_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class HostSyncCounter(TorchDispatchMode):
    """Counts the aten calls that force a device-to-host synchronisation, by kind.

    On the CPU nothing waits, but the same calls would on CUDA, so the count is the same on every
    device. Copies to the host (``.cpu()``, ``.tolist()``, ``.numpy()``) of device tensors are
    counted as ``to_host``; they only appear in a run on another device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = _SYNCING.get(func)
        if func in _MASK_INDEXED and any(_is_mask(i) for i in args[1]):
            kind = "mask_index"
        elif func == aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            kind = "repeat_interleave"
        elif _copies_to_host(func, args, kwargs):
            kind = "to_host"
        if kind:
            self.counts[kind] += 1
        return func(*args, **kwargs)


def _copies_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    """``_to_copy`` to the CPU (``.cpu()``, ``.to("cpu")``) or ``copy_`` into a CPU tensor, from another device."""
    if func == aten._to_copy.default:
        src, target = args[0], kwargs.get("device")
    elif func == aten.copy_.default:
        src, target = args[1], args[0].device
    else:
        return False
    return target is not None and torch.device(target).type == "cpu" and src.device.type != "cpu"


def test_counter_sees_each_kind_of_host_sync() -> None:
    """The counter against hand-counted calls (and none for the masked arithmetic that replaces them)."""
    x = torch.tensor([1.0, -2.0, 3.0])
    mask = x > 0
    with HostSyncCounter() as counter:
        float(x.sum())
        x[mask]
        mask.nonzero()
        torch.bincount(mask.long())
        x.unique()
        torch.masked_select(x, mask)
        torch.where(mask, x, 0.0).sum()
        x.masked_fill(~mask, 0.0)
        torch.zeros(2, dtype=torch.int64).index_add(0, mask.long(), torch.ones(3, dtype=torch.int64))
    assert counter.counts == {
        "item": 1,
        "mask_index": 1,
        "nonzero": 1,
        "bincount": 1,
        "unique": 1,
        "masked_select": 1,
    }


# Host syncs allowed in one ``update`` with validate_args=(False, True), and why. Every registered
# metric needs an entry, so a new metric states its budget.
SYNC_BUDGETS: dict[str, tuple[int, int, str]] = {
    "reconstruction/downstream": (
        1,
        2,
        "nonzero gathers the attended positions; validation reads back whether a counted target id is "
        "outside the vocabulary",
    ),
    "utility/next_token": (1, 1, "nonzero gathers the attended positions (the rows' number is data)"),
    "utility/cross_entropy": (
        1,
        2,
        "nonzero gathers the attended, non-ignored positions; validation reads back whether a counted "
        "target id is outside the vocabulary",
    ),
    "utility/prediction_change": (
        0,
        1,
        "counts scatter into a fixed [C, C] matrix; validation reads back whether a class id is out of range",
    ),
}


def _budget(entry: RegisteredMetric) -> tuple[int, int, str]:
    return SYNC_BUDGETS.get(f"{entry.suite}/{entry.name}", (0, 0, "fixed-size masked arithmetic"))


def _syncs_in_one_update(entry: RegisteredMetric, device: torch.device, validate_args: bool) -> Counter[str]:
    metric = make_metric(entry, device, validate_args=validate_args)
    first, second = example_batches(entry, [4, 5], device=device)
    metric.update(**first)  # lazy one-time work (if any) is not per update
    with HostSyncCounter() as counter:
        metric.update(**second)
    return counter.counts


@pytest.mark.parametrize("entry", ENTRIES, ids=[f"{e.suite}/{e.name}" for e in ENTRIES])
def test_update_host_syncs_within_budget(entry: RegisteredMetric, device: torch.device) -> None:
    """Each metric's ``update`` makes at most its budget of host round trips (the count is the same on
    every device: the calls are counted, not timed)."""
    unvalidated, validated, _ = _budget(entry)
    for validate_args, budget in ((False, unvalidated), (True, validated)):
        counts = _syncs_in_one_update(entry, device, validate_args)
        assert sum(counts.values()) <= budget, (
            f"{entry.suite}/{entry.name} (validate_args={validate_args}): {dict(counts)} exceeds the budget "
            f"of {budget} host sync(s); see SYNC_BUDGETS"
        )


def test_budgets_name_registered_metrics() -> None:
    assert set(SYNC_BUDGETS) <= {f"{e.suite}/{e.name}" for e in ENTRIES}


@pytest.mark.parametrize("entry", ENTRIES, ids=[f"{e.suite}/{e.name}" for e in ENTRIES])
def test_device_result_matches_cpu(entry: RegisteredMetric, device: torch.device) -> None:
    """On ``--device``, each metric gives the CPU's result (up to the devices' rounding), with its
    states and outputs on that device."""
    if device.type == "cpu":
        pytest.skip("compares another --device with the CPU")
    on_cpu, on_device = make_metric(entry), make_metric(entry, device)
    for cpu_batch, device_batch in zip(
        example_batches(entry, [3, 5, 2]), example_batches(entry, [3, 5, 2], device=device)
    ):
        on_cpu.update(**cpu_batch)
        on_device.update(**device_batch)
    value = on_device.compute()
    outputs = on_device.flatten_output(value)
    assert all(t.device.type == device.type for t in outputs.values()), {
        k: t.device for k, t in outputs.items()
    }
    assert not compare(flat(on_device, value), flat(on_cpu, on_cpu.compute()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("meta", "not supported"),
        ("mps", "not supported"),
        ("gpu", "not a device"),
        (f"cuda:{torch.cuda.device_count()}", "usable CUDA device"),
    ],
)
def test_device_option_rejects_unusable_devices(text: str, message: str) -> None:
    """``--device`` (conftest.py) and the benchmarks' ``--device`` refuse these with ``check_device``'s message."""
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=message):
        check_device(text)
