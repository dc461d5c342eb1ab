"""Test-wide fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _fresh_rendezvous_port() -> Iterator[None]:
    """Lightning's ddp_spawn writes MASTER_PORT into this process's environment and the next
    Trainer would reuse it (a port that may still be in TIME_WAIT); every test starts without it."""
    saved = {k: os.environ.pop(k) for k in _LAUNCH_VARS if k in os.environ}
    yield
    for key in _LAUNCH_VARS:
        os.environ.pop(key, None)
    os.environ.update(saved)
