"""Plain ``pytest`` without the optional extras.

``--doctest-modules`` imports every module under ``metrics_suite`` (and helper scripts under
``tests``) to collect doctests; the test files skip themselves with ``importorskip``. Modules that
need a missing extra are left out of collection instead of stopping it with an import error.
"""

from __future__ import annotations

from importlib.util import find_spec

collect_ignore: list[str] = []
if find_spec("pytorch_lightning") is None:
    collect_ignore += ["metrics_suite/demo/training.py", "tests/lightning_ddp_script.py"]
    if find_spec("lightning") is None:  # the integration also accepts the unified package
        collect_ignore.append("metrics_suite/integrations/lightning.py")
if find_spec("matplotlib") is None:  # plots.py imports it lazily, but its doctests draw
    collect_ignore.append("metrics_suite/plots.py")
