"""Integrations with training frameworks.

Each submodule imports its framework lazily on import of that submodule only, so
``import metrics_suite`` never needs Lightning:

* [`metrics_suite.integrations.lightning`][metrics_suite.integrations.lightning] — PyTorch Lightning (``pip install 'metrics_suite[lightning]'``).
"""
