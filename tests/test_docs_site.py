"""The built documentation site works offline: no external script or stylesheet, every formula
rendered as MathML at build time, every Sphinx role turned into a link (DESIGN.md §5, Docs)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="mkdocs is not installed (the docs extra: pip install -e '.[docs]')")
pytest.importorskip(
    "latex2mathml", reason="latex2mathml is not installed (the docs extra: pip install -e '.[docs]')"
)

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc):")
LATEX = re.compile(r"\\[()\[\]]|\\[A-Za-z]{2,}")


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Build the site once (``mkdocs build --strict``); ``{page path: html}``."""
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    pages = {str(p.relative_to(out)): p.read_text(encoding="utf-8") for p in out.rglob("*.html")}
    assert "api/index.html" in pages and len(pages) >= 10, sorted(pages)
    return pages


class _Page(HTMLParser):
    """Collects external script/stylesheet URLs, the visible text (outside code and math) and
    the number of MathML formulas."""

    SKIP = frozenset({"code", "pre", "script", "style", "math", "textarea"})

    def __init__(self) -> None:
        super().__init__()
        self.external: list[str] = []
        self.text: list[str] = []
        self.formulas = 0
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        url = attr.get("src") if tag == "script" else attr.get("href") if tag == "link" else None
        if url and EXTERNAL.match(url.strip()):
            self.external.append(f"<{tag}> {url}")
        self.formulas += tag == "math"
        self._skip += tag in self.SKIP

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in self.SKIP and self._skip > 0

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)


@functools.cache
def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def test_no_external_script_or_stylesheet(site: dict[str, str]) -> None:
    found = {name: page.external for name, html in site.items() if (page := _parse(html)).external}
    assert not found, found


def test_no_sphinx_role_left(site: dict[str, str]) -> None:
    found = {name: ROLE.findall(html) for name, html in site.items() if ROLE.search(html)}
    assert not found, found


def test_every_formula_is_mathml(site: dict[str, str]) -> None:
    leftovers = {}
    for name, html in site.items():
        text = " ".join(_parse(html).text)
        if hits := [text[max(m.start() - 40, 0) : m.end() + 40] for m in LATEX.finditer(text)]:
            leftovers[name] = hits
    assert not leftovers, leftovers
    # The pages with formulas have them as MathML: the suite pages and the API reference.
    counts = {name: _parse(site[name]).formulas for name in ("api/index.html", "suites/credit/index.html")}
    assert all(n >= 20 for n in counts.values()), counts


def test_cross_references_are_links(site: dict[str, str]) -> None:
    # A converted role, e.g. "[`SuiteConfig`][metrics_suite.config.SuiteConfig]" in
    # registry.build's docstring, is a link to the object's anchor on a page that renders it.
    api = site["api/index.html"]
    assert re.search(
        r'<a[^>]+href="[^"]*#metrics_suite\.config\.SuiteConfig"[^>]*>\s*<code>SuiteConfig</code>', api
    )
    assert "autoref" not in " ".join(_parse(api).text)
