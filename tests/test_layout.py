"""The package layout of DESIGN.md section 4: dependencies point one way.

Reads the import statements of every module (also those inside functions) with ``ast``, so a lazy
import counts as a dependency too. The registry loads the suite modules with ``importlib`` by name:
that is the one deliberate upward reference, and it is no import statement.
"""

from __future__ import annotations

import ast
from pathlib import Path

import metrics_suite

PACKAGE = Path(metrics_suite.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of ``metrics_suite`` that ``path`` imports (``from a import b`` counts ``a.b`` if that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in MODULES}


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_the_scan_sees_known_imports() -> None:
    # guards the scanner itself: an empty graph would make every check below pass
    assert "metrics_suite.base" in GRAPH["metrics_suite.collection"]
    assert "metrics_suite.functional._stats" in GRAPH["metrics_suite.base"]
    assert "metrics_suite.validation" in GRAPH["metrics_suite.functional.utility"]


def test_functional_imports_nothing_above_it() -> None:
    allowed_outside = {"metrics_suite.validation"}
    for name, deps in GRAPH.items():
        if name.startswith("metrics_suite.functional"):
            above = {
                d for d in deps if not d.startswith("metrics_suite.functional") and d not in allowed_outside
            }
            assert not above, f"{name} imports {sorted(above)}"


def test_validation_imports_nothing_of_the_package() -> None:
    assert GRAPH["metrics_suite.validation"] == set()


def test_no_import_cycles() -> None:
    # depth-first search; a module met again while still on the path closes a cycle
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for dep in sorted(GRAPH[name]):
            # a package imports its own submodules (``functional/__init__`` re-exports them): no cycle
            if not dep.startswith(name + "."):
                visit(dep, [*path, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])
