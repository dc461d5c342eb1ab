"""Conformance examples, one module per suite, registered with their metrics.

They live apart from the metric modules so that each of those starts with its metrics; they import
nothing above [`metrics_suite.conformance`][metrics_suite.conformance].
"""
