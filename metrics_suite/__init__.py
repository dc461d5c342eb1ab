"""metrics_suite: stateful, distributed-ready diagnostics for models trained with a transform.

>>> import metrics_suite as ms
>>> sorted(ms.available())
['credit', 'noise', 'reconstruction', 'utility']
"""

from metrics_suite import credit, noise, reconstruction, utility
from metrics_suite.base import DiagnosticMetric, SyncFailedError, SyncMismatchError, fused_all_reduce
from metrics_suite.capture import ForwardCapture, record, replace_output
from metrics_suite.collection import DiagnosticCollection
from metrics_suite.config import SuiteConfig, load_config
from metrics_suite.conformance import ConformanceExample
from metrics_suite.credit import *  # noqa: F403
from metrics_suite.noise import *  # noqa: F403

# Metric classes and helpers: each suite module lists its public names in ``__all__``.
from metrics_suite.reconstruction import *  # noqa: F403
from metrics_suite.registry import SUITES, available, build, register, registered, suite
from metrics_suite.utility import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [
    "SUITES",
    "ConformanceExample",
    "DiagnosticCollection",
    "DiagnosticMetric",
    "ForwardCapture",
    "SuiteConfig",
    "SyncFailedError",
    "SyncMismatchError",
    "__version__",
    "available",
    "build",
    "fused_all_reduce",
    "load_config",
    "record",
    "register",
    "registered",
    "replace_output",
    "suite",
    *reconstruction.__all__,
    *utility.__all__,
    *noise.__all__,
    *credit.__all__,
]
