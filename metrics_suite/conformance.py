"""Conformance examples: how the test kit feeds a metric.

Every registered metric carries a [`ConformanceExample`][metrics_suite.conformance.ConformanceExample]. The conformance tests in
``tests/test_conformance.py`` (and ``tests/test_distributed.py``) use it to check, for each
metric, the invariants of DESIGN.md: sharding invariance, real-DDP equality with one process,
collective counts, ``state_dict``/pickle round trips, bad input leaving the state unchanged, and
``forward()`` semantics. A new metric gets all of them by registering an example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: ``make_batch(generator, n)`` -> keyword inputs of one ``update`` holding ``n`` items.
BatchFactory = Callable[[torch.Generator, int], dict[str, Any]]
#: ``bad_inputs(generator)`` -> a list of keyword inputs that ``update`` must reject.
BadInputFactory = Callable[[torch.Generator], list[dict[str, Any]]]


def _no_bad_inputs(_: torch.Generator) -> list[dict[str, Any]]:
    return []


@dataclass(frozen=True)
class ConformanceExample:
    """Inputs that exercise one metric.

    Attributes:
        make_batch: builds the inputs of one ``update`` with ``n`` items along dim 0 of every
            tensor named in ``batch_keys``. Must be deterministic given the generator.
        bad_inputs: inputs that ``update`` must reject with ``ValueError``/``TypeError`` whose
            message names (in backticks) the argument at fault. Build each from one shared good
            batch, ``{**good, "x": bad_x}``: the kit takes the arguments whose value differs from
            the one most bad inputs share as the ones the message must name (or one ``update``
            argument the bad input leaves out).
        init_kwargs: constructor arguments used by the kit (e.g. a size the metric needs).
        batch_keys: inputs split along dim 0 when a batch is sharded; ``None`` means every
            tensor input.
        shardable: ``False`` for metrics whose value is not a sum over items (e.g. a value of the
            latest update); they still get the DDP, state and bad-input checks.
        rtol: relative tolerance of sharding comparisons (float64 rounding).
    """

    make_batch: BatchFactory
    bad_inputs: BadInputFactory = _no_bad_inputs
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_keys: tuple[str, ...] | None = None
    shardable: bool = True
    rtol: float = 1e-9

    def split(self, batch: dict[str, Any], sizes: Sequence[int]) -> list[dict[str, Any]]:
        """Split one batch into consecutive shards of ``sizes`` items along dim 0."""
        keys = (
            self.batch_keys
            if self.batch_keys is not None
            else tuple(k for k, v in batch.items() if isinstance(v, Tensor))
        )
        parts: list[dict[str, Any]] = [dict(batch) for _ in sizes]
        for key in keys:
            for part, chunk in zip(parts, torch.split(batch[key], list(sizes), dim=0)):
                part[key] = chunk
        return parts
