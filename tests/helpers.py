"""Shared test helpers: comparing metric outputs, building metrics from registry entries, loss batches."""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metrics_suite.base import DiagnosticMetric
from metrics_suite.registry import RegisteredMetric

DeviceLike = torch.device | str


def make_metric(entry: RegisteredMetric, device: DeviceLike = "cpu", **kwargs: Any) -> DiagnosticMetric:
    """The entry's metric built with its conformance ``init_kwargs`` (plus ``kwargs``), on ``device``."""
    return entry.cls(**{**entry.example.init_kwargs, **kwargs}).to(device)


def example_batches(
    entry: RegisteredMetric, sizes: list[int], seed: int = 0, device: DeviceLike = "cpu"
) -> list[dict[str, Any]]:
    """Deterministic batches of the given sizes for ``entry`` (drawn on the CPU, moved to ``device``)."""
    g = torch.Generator().manual_seed(seed)
    return [to_device(entry.example.make_batch(g, n), device) for n in sizes]


def bad_inputs_and_arguments(
    entry: RegisteredMetric, device: DeviceLike = "cpu"
) -> list[tuple[set[str], dict[str, Any]]]:
    """The entry's invalid inputs on ``device``, each with the arguments it changed: the ones whose
    value is not the object most of the list shares (the examples build each bad input from one good
    batch, ``{**good, "x": bad_x}``), or all of them when no value is shared."""
    raw = entry.example.bad_inputs(torch.Generator().manual_seed(1))
    usual = {}
    for key in {k for bad in raw for k in bad}:
        counts = Counter(id(bad[key]) for bad in raw if key in bad)
        (value_id, n), *_ = counts.most_common(1)
        if n >= 2:
            usual[key] = value_id
    return [({k for k, v in bad.items() if id(v) != usual.get(k)}, to_device(bad, device)) for bad in raw]


def names_the_argument(message: str, changed: set[str], update: Callable[..., Any], passed: dict) -> bool:
    """Whether a rejection ``message`` names (in backticks) an argument at fault: one the bad input
    changed, or one of ``update``'s it left out (``[N] losses need `component_idx```)."""
    omitted = set(inspect.signature(update).parameters) - set(passed)
    return any(re.search(rf"`{re.escape(name)}[`\[]", message) for name in changed | omitted)


def to_device(value: Any, device: DeviceLike) -> Any:
    """``value`` with every tensor (also inside dicts, lists and tuples) moved to ``device``; other
    objects (e.g. a loss function, which follows its input's device) unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    return value


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU: the results of a ``--device`` run, before they are
    compared with a numpy reference."""
    return to_device(value, "cpu")


def flat(metric: DiagnosticMetric, value: Any) -> dict[str, float]:
    """A compute() result flattened to python floats."""
    return {k: float(v) for k, v in metric.flatten_output(value).items()}


def compare(
    actual: dict[str, float], expected: dict[str, float], rtol: float = 1e-9, atol: float = 1e-12
) -> list[str]:
    """Differences between two flat results (NaN equals NaN); empty when they agree."""
    problems = []
    if actual.keys() != expected.keys():
        problems.append(f"keys differ: {sorted(actual)} vs {sorted(expected)}")
    for key in sorted(actual.keys() & expected.keys()):
        a, e = actual[key], expected[key]
        if math.isnan(a) and math.isnan(e):
            continue
        if not math.isclose(a, e, rel_tol=rtol, abs_tol=atol):
            problems.append(f"{key}: {a!r} != {e!r}")
    return problems


def state_snapshot(metric: DiagnosticMetric) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in metric.state_items()}


def states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        x.dtype == b[k].dtype and x.shape == b[k].shape and torch.equal(x, b[k]) for k, x in a.items()
    )


def score_losses(n: int = 4, components: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``ReconstructionScore`` losses ``[n]`` (``[n, components]``): clean < reconstruction < zero."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, components) if components > 1 else (n,)
    clean = torch.rand(shape, generator=g)
    zero = clean + 1 + torch.rand(shape, generator=g)
    return {
        "source_model_loss": clean,
        "source_model_loss_with_reconstruction": clean + (zero - clean) * torch.rand(shape, generator=g),
        "source_model_loss_with_zero_ablation": zero,
    }


def half_way_losses() -> dict[str, torch.Tensor]:
    """Reconstruction losses half way between clean and zero-ablation: score exactly 0.5."""
    clean = torch.tensor([1.0, 2.0, 3.0])
    zero = torch.tensor([3.0, 4.0, 7.0])
    return {
        "source_model_loss": clean,
        "source_model_loss_with_reconstruction": (clean + zero) / 2,
        "source_model_loss_with_zero_ablation": zero,
    }


def inverted_cdf_quantile(
    x: np.ndarray, levels: Sequence[float], weights: np.ndarray | None = None
) -> np.ndarray:
    """The inverted-CDF quantile as numpy's weighted path computes it (the definition the sketch
    documents): the smallest sorted item whose float64 cumulative weight / total reaches q. Spelled
    out because ``np.quantile(weights=)`` needs numpy 2 and the declared floor is older; checked
    against numpy's own in tests/test_sketch.py where numpy has it."""
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    cdf = np.cumsum(w[order])
    cdf /= cdf[-1]
    index = np.searchsorted(cdf, np.asarray(levels, dtype=np.float64), side="left")
    return x[order][np.minimum(index, len(x) - 1)]
