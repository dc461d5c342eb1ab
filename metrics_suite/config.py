"""Pydantic configuration of a diagnostics collection (from Python, a dict, JSON or TOML)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from metrics_suite.validation import closest, unknown_names

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


def parse_config(data: Any, source: str = "config") -> SuiteConfig:
    """Validate ``data`` as a [`SuiteConfig`][metrics_suite.config.SuiteConfig]; errors are one ``ValueError`` line each, naming ``source``.

    An unknown field or suite name suggests the closest known one and lists the valid ones.
    """
    try:
        return SuiteConfig.model_validate(data)
    except ValidationError as err:
        lines: list[str] = []
        for e in err.errors():
            where = ".".join(str(part) for part in e["loc"]) or "the top level"
            got = e["input"]
            if e["loc"][:1] == ("metrics",) and len(e["loc"]) >= 2:
                # one line for the union's two errors (dict or bool)
                line = f"`metrics.{e['loc'][1]}` got {got!r}; accepted: a dict of constructor arguments, true or false"
                if line not in lines:
                    lines.append(line)
            elif e["type"] == "extra_forbidden":
                lines.append(unknown_names("field", [where], SuiteConfig.model_fields))
            elif e["loc"][:1] == ("suites",) and isinstance(got, str):
                lines.append(f"`{where}` got {got!r}{closest(got, SUITES)}; accepted: {', '.join(SUITES)}")
            else:
                accepted = e["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
                lines.append(f"`{where}` got {got!r}; accepted: {accepted}")
        raise ValueError(f"{source}: " + "; ".join(lines)) from None


def load_config(path: str | Path) -> SuiteConfig:
    """Read a [`SuiteConfig`][metrics_suite.config.SuiteConfig] from a ``.json`` or ``.toml`` file
    (errors name the file)."""
    path = Path(path)
    if path.suffix == ".json":
        parse: Any = json.loads
        syntax_error: type[Exception] = json.JSONDecodeError
    elif path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        parse, syntax_error = tomllib.loads, tomllib.TOMLDecodeError
    else:
        raise ValueError(f"config file must end in .json or .toml, got {path.name!r}")
    try:
        data = parse(path.read_text())
    except syntax_error as err:
        raise ValueError(f"{path}: invalid {path.suffix[1:].upper()}: {err}") from None
    return parse_config(data, str(path))
