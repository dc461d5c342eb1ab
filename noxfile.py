"""Every check a contributor needs: ``nox -s tests lint typecheck docs bench demo``.

The test, typecheck, bench and demo sessions install torch first (``torch==2.13.0``), then the
package. Environment variables:

* ``METRICS_SUITE_TORCH_INDEX``: an index URL passed to pip as ``--index-url`` for the torch install
  only, e.g. ``https://download.pytorch.org/whl/cpu`` for the CPU build (on PyPI ``torch==2.13.0``
  is the CUDA build; this project's machines resolve it to a local CPU wheel through pip's
  ``find-links`` configuration, so they need no index).
* ``METRICS_SUITE_TORCH``: another requirement (e.g. ``torch==2.13.0+cu124`` or ``torch``), or
  ``skip`` to keep the torch the environment already has: the sessions' virtualenvs are then
  created with ``--system-site-packages`` so they see it.

``tests_min`` runs the suite on the lowest versions ``pyproject.toml`` declares (each ``>=`` floor
pinned with ``==``; torch installed as above, at its floor). The docs session needs no torch:
mkdocstrings reads the sources statically.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "docs"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
TORCH = os.environ.get("METRICS_SUITE_TORCH", "torch==2.13.0")
TORCH_INDEX = os.environ.get("METRICS_SUITE_TORCH_INDEX")
TORCH_VENV = ["--system-site-packages"] if TORCH == "skip" else []


def _install(session: nox.Session, *extras: str, torch: str = TORCH, constraints: str | None = None) -> None:
    if TORCH != "skip":
        session.install(torch, *(["--index-url", TORCH_INDEX] if TORCH_INDEX else []))
    session.install(
        "-e", f".[{','.join(extras)}]" if extras else ".", *(["-c", constraints] if constraints else [])
    )


def _floors(*extras: str) -> dict[str, str]:
    """``{name: "name==floor"}`` for every ``>=`` requirement of the package and of ``extras``."""
    import tomllib  # Python 3.11+, like every session
    from packaging.requirements import Requirement

    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = [
        *project["dependencies"],
        *(r for e in extras for r in project["optional-dependencies"][e]),
    ]
    return {
        req.name: f"{req.name}=={spec.version}"
        for req in map(Requirement, requirements)
        for spec in req.specifier
        if spec.operator == ">="
    }


@nox.session(python=PYTHON, venv_params=TORCH_VENV)
def tests(session: nox.Session) -> None:
    """The whole test suite: unit, conformance kit, real-DDP (gloo), doc examples, recipes and the built docs site."""
    _install(session, "dev", "lightning", "plots", "docs", "recipes")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=PYTHON, venv_params=TORCH_VENV)
def tests_min(session: nox.Session) -> None:
    """The test suite on the lowest versions ``pyproject.toml`` declares: every ``>=`` floor of the
    dependencies and of the lightning and plots extras, pinned with ``==`` (the test tools stay current)."""
    extras = ("lightning", "plots")
    floors = _floors(*extras)
    # torch goes first, through the usual mechanism (index, ``skip``); the pins hold everything else
    torch = floors.pop("torch")
    constraints = os.path.join(session.create_tmp(), "floors.txt")
    # matplotlib at its floor calls pyparsing's camelCase API, which pyparsing 3.3 deprecates: the
    # doc-script tests (every warning an error) would fail on that third-party warning
    pins = [*floors.values(), "pyparsing<3.3"]
    with open(constraints, "w") as f:
        f.write("\n".join(pins) + "\n")
    _install(session, "dev", *extras, torch=torch, constraints=constraints)
    session.run(
        "python", "-c", "import torch, torchmetrics; print(torch.__version__, torchmetrics.__version__)"
    )
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON, venv_params=TORCH_VENV)
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    _install(session, "dev", "lightning", "plots")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site, warnings as errors (only the docs extra: no torch, no package)."""
    import tomllib  # Python 3.11+, like every session

    with open("pyproject.toml", "rb") as f:
        session.install(*tomllib.load(f)["project"]["optional-dependencies"]["docs"])
    session.run("mkdocs", "build", "--strict", "-d", "site", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python=PYTHON, venv_params=TORCH_VENV)
def bench(session: nox.Session) -> None:
    """Run every benchmark; JSON into benchmarks/results/ and a summary table."""
    _install(session, "lightning")
    session.run("python", "benchmarks/run_all.py", *session.posargs)


@nox.session(python=PYTHON, venv_params=TORCH_VENV)
def demo(session: nox.Session) -> None:
    """The end-to-end demo: a tiny noisy-embedding language model trained on 2 CPU processes."""
    _install(session, "lightning", "plots")
    session.run("metrics-suite", "demo", *(session.posargs or ["--out", "demo_out"]))
