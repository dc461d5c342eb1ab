"""Every check a contributor needs: ``nox -s tests lint typecheck docs bench demo``.

The test, bench and demo sessions install the CPU build of torch first. Set
``METRICS_SUITE_TORCH`` to another requirement (e.g. ``torch==2.13.0+cu124`` or ``torch``) to use
your own build, or to ``skip`` to keep whatever the environment already has.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "docs"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
TORCH = os.environ.get("METRICS_SUITE_TORCH", "torch==2.13.0")


def _install(session: nox.Session, *extras: str) -> None:
    if TORCH != "skip":
        session.install(TORCH)
    session.install("-e", f".[{','.join(extras)}]" if extras else ".")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite: unit, conformance kit, real-DDP (gloo) and doc examples."""
    _install(session, "dev", "lightning", "plots")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    _install(session, "dev", "lightning", "plots")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site, warnings as errors."""
    _install(session, "docs")
    session.run("mkdocs", "build", "--strict", "-d", "site", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run every benchmark; JSON into benchmarks/results/ and a summary table."""
    _install(session, "lightning")
    session.run("python", "benchmarks/run_all.py", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The end-to-end demo: a tiny noisy-embedding language model trained on 2 CPU processes."""
    _install(session, "lightning", "plots")
    session.run("metrics-suite", "demo", *(session.posargs or ["--out", "demo_out"]))
