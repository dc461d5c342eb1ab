"""Pure tensor functions behind the metric classes, usable without any ``Metric``.

Each suite module lists its public functions in ``__all__``.
"""

from metrics_suite.functional import credit, noise, reconstruction, utility
from metrics_suite.functional.credit import *  # noqa: F403
from metrics_suite.functional.noise import *  # noqa: F403
from metrics_suite.functional.reconstruction import *  # noqa: F403
from metrics_suite.functional.utility import *  # noqa: F403

__all__ = [*reconstruction.__all__, *utility.__all__, *noise.__all__, *credit.__all__]
