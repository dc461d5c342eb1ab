"""Pydantic configuration of a diagnostics collection (from Python, a dict, JSON or TOML)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool

#: The suite names, in registry and figure order: the one place they are listed.
SuiteName = Literal["reconstruction", "utility", "noise", "credit"]
SUITES: tuple[SuiteName, ...] = get_args(SuiteName)


class SuiteConfig(BaseModel):
    """Which suites to build and how to configure their metrics.

    Attributes:
        suites: suite names; all four when the field is left out. An explicit empty list is
            refused (most likely a mistake, not a request for every suite).
        metrics: per-metric settings keyed by registry name: constructor arguments (this also
            adds a metric that needs configuration), ``true`` to include with defaults, or
            ``false`` to leave it out. Anything else (``0``, ``"no"``) is refused.

    Example (TOML):

        suites = ["utility", "reconstruction"]
        [metrics.next_token]
        num_logits = 64
        [metrics.activations]
        num_features = 768
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    suites: list[SuiteName] = Field(default_factory=lambda: list(SUITES), min_length=1)
    metrics: dict[str, dict[str, Any] | StrictBool] = Field(default_factory=dict)


def load_config(path: str | Path) -> SuiteConfig:
    """Read a [`SuiteConfig`][metrics_suite.config.SuiteConfig] from a ``.json`` or ``.toml`` file."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
    elif path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        data = tomllib.loads(path.read_text())
    else:
        raise ValueError(f"config file must end in .json or .toml, got {path.name!r}")
    return SuiteConfig.model_validate(data)
