"""The suite registry: which metric classes make up each suite, and how to build collections.

Metric modules register their classes with [`register`][metrics_suite.registry.register]; [`suite`][metrics_suite.registry.suite] and [`build`][metrics_suite.registry.build]
turn registry names plus per-metric overrides into one [`DiagnosticCollection`][metrics_suite.collection.DiagnosticCollection].
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from metrics_suite.base import DiagnosticMetric
from metrics_suite.collection import DiagnosticCollection
from metrics_suite.config import SUITES, SuiteConfig, load_config
from metrics_suite.conformance import ConformanceExample

_BUILTIN_MODULES = tuple(f"metrics_suite.{s}" for s in SUITES)

M = TypeVar("M", bound=type[DiagnosticMetric])


@dataclass(frozen=True)
class RegisteredMetric:
    """One registry entry.

    Attributes:
        suite: suite name (``"utility"``, ...).
        name: registry name, the ``{metric}`` part of output keys and the override keyword.
        cls: the metric class.
        example: inputs for the conformance kit.
        needs_config: ``True`` for metrics that need a size or a reference; they join a suite
            only when configured explicitly.
    """

    suite: str
    name: str
    cls: type[DiagnosticMetric]
    example: ConformanceExample
    needs_config: bool = False


_REGISTRY: dict[str, dict[str, RegisteredMetric]] = {s: {} for s in SUITES}


def register(
    suite: str, name: str, *, example: ConformanceExample, needs_config: bool = False
) -> Callable[[M], M]:
    """Class decorator adding a metric to ``suite`` under ``name``."""
    if suite not in _REGISTRY:
        raise ValueError(f"unknown suite {suite!r}; suites: {list(SUITES)}")

    def decorator(cls: M) -> M:
        for entries in _REGISTRY.values():
            if name in entries and entries[name].cls is not cls:
                raise ValueError(
                    f"metric name {name!r} is already registered to {entries[name].cls.__name__}"
                )
        _REGISTRY[suite][name] = RegisteredMetric(suite, name, cls, example, needs_config)
        return cls

    return decorator


def _load_builtin() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def registered() -> list[RegisteredMetric]:
    """Every registered metric, suite by suite in registration order."""
    _load_builtin()
    return [entry for s in SUITES for entry in _REGISTRY[s].values()]


def available() -> dict[str, list[str]]:
    """Registry names per suite, e.g. ``{"utility": ["next_token", ...], ...}``."""
    _load_builtin()
    return {s: list(_REGISTRY[s]) for s in SUITES}


def _check_suites(names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; available suites: {list(SUITES)}")
    return names or SUITES


def suite(*names: str, **overrides: Mapping[str, Any] | bool) -> DiagnosticCollection:
    """Build one collection holding the named suites (all four when none is named).

    Args:
        names: suite names.
        overrides: per-metric settings keyed by registry name: a dict of constructor arguments
            (which also adds a metric that needs configuration), ``True`` to include with
            defaults, ``False`` to leave the metric out.

    Raises:
        ValueError: an unknown suite or metric name, or constructor arguments a metric rejects.
        TypeError: an override that is neither a mapping nor a bool (e.g. ``next_token=None``).

    Examples:
        >>> import metrics_suite as ms
        >>> col = ms.suite("reconstruction", reconstruction_score={"num_components": 2})
        >>> col["reconstruction/reconstruction_score"].num_components
        2
    """
    suites = _check_suites(names)
    _load_builtin()
    known = {name: entry for s in suites for name, entry in _REGISTRY[s].items()}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(
            f"unknown metric(s) {unknown} for suites {list(suites)}; available: "
            + ", ".join(f"{s}: {list(_REGISTRY[s])}" for s in suites)
        )
    for name, setting in overrides.items():
        if not isinstance(setting, bool | Mapping):
            raise TypeError(
                f"override `{name}` must be a dict of constructor arguments, True or False, got {setting!r}"
            )
    metrics: dict[str, DiagnosticMetric] = {}
    for name, entry in known.items():
        setting = overrides.get(name, not entry.needs_config)
        if setting is False:
            continue
        kwargs = dict(setting) if isinstance(setting, Mapping) else {}
        try:
            metrics[f"{entry.suite}/{name}"] = entry.cls(**kwargs)
        except (TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
            kind = TypeError if isinstance(err, TypeError) else ValueError
            raise kind(f"cannot build {entry.suite}/{name} ({entry.cls.__name__}): {err}") from err
    return DiagnosticCollection(metrics)


def build(config: Any) -> DiagnosticCollection:
    """Build a collection from a [`SuiteConfig`][metrics_suite.config.SuiteConfig], a dict, or a
    ``.json``/``.toml`` file path.

    Examples:
        >>> import metrics_suite as ms
        >>> col = ms.build({"suites": ["reconstruction"], "metrics": {"reconstruction_score": False}})
        >>> "reconstruction/reconstruction_score" in col.keys()
        False
    """
    if isinstance(config, str | Path):
        cfg = load_config(config)
    elif isinstance(config, SuiteConfig):
        cfg = config
    else:
        cfg = SuiteConfig.model_validate(config)
    return suite(*cfg.suites, **cfg.metrics)
