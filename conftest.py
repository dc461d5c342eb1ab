"""Plain ``pytest`` without the optional extras, and the ``--device`` option.

``--doctest-modules`` imports every module under ``metrics_suite`` (and helper scripts under
``tests``) to collect doctests; the test files skip themselves with ``importorskip``. Modules that
need a missing extra are left out of collection instead of stopping it with an import error.

``pytest --device cuda`` runs the conformance kit (``tests/test_conformance.py``), the host-sync
budgets and the reference-value tests of each suite (those that take the ``device`` fixture) with
metrics and inputs on that device; see "Devices" in ``docs/guides/distributed.md``.
"""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

from metrics_suite.testing import check_device

collect_ignore: list[str] = []
if find_spec("pytorch_lightning") is None:
    collect_ignore += ["metrics_suite/demo/training.py", "tests/lightning_ddp_script.py"]
    if find_spec("lightning") is None:  # the integration also accepts the unified package
        collect_ignore.append("metrics_suite/integrations/lightning.py")
if find_spec("matplotlib") is None:  # plots.py imports it lazily, but its doctests draw
    collect_ignore.append("metrics_suite/plots.py")


DEVICE = pytest.StashKey[torch.device]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="device the tests taking the `device` fixture (conformance kit, suite reference tests) run "
        "metrics and inputs on: cpu (default), cuda or cuda:N",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Reject an unusable ``--device`` before collection: a session that skipped everything on a
    machine without the device would pass green and be mistaken for a device run."""
    text = config.getoption("--device")
    try:
        config.stash[DEVICE] = check_device(text)
    except ValueError as err:
        raise pytest.UsageError(f"--device {err}") from err


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The ``--device`` metrics and inputs go to (``cpu`` by default)."""
    return pytestconfig.stash[DEVICE]
