"""End-to-end demo: a tiny noisy-embedding language model trained with Lightning, diagnosed by all four suites.

Run it with ``metrics-suite demo`` (or ``python -m metrics_suite demo``, ``nox -s demo``). Needs the
``lightning`` and ``plots`` extras. Modules: [`data`][metrics_suite.demo.data] (synthetic Markov-chain
tokens), [`model`][metrics_suite.demo.model] (the model and its noise transform),
[`training`][metrics_suite.demo.training] (the LightningModule and [`run_demo`][metrics_suite.demo.training.run_demo]),
[`figure`][metrics_suite.demo.figure] (tables and figure).
"""
