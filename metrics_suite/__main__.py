"""``python -m metrics_suite`` runs the ``metrics-suite`` command (e.g. ``python -m metrics_suite demo``)."""

import sys

from metrics_suite.cli import main

if __name__ == "__main__":  # guarded: spawned DDP workers import the main module
    sys.exit(main())
