"""Every ```python block of the documentation runs, and prints what its comments say.

Blocks of one page run in order in one namespace (later blocks build on earlier ones), in a
temporary working directory. On the suite pages that state printed values, a
``print(...)  # value`` line (or a ``# value`` line right after it) must print exactly ``value``,
one line, which may be followed by a note (``: text`` or `` (text)``). A block right after
``<!-- no-test -->`` is skipped (it needs files or processes a page cannot make).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())
VALUE_CHECKED = {"suites/reconstruction.md", "suites/noise.md", "suites/utility.md"}
BLOCK = re.compile(r"(<!-- no-test -->\s*)?```python\n(.*?)```", flags=re.S)
# a note after a stated value holds no quotes or brackets, so a truncated value cannot pass as one
NOTE = re.compile(r": [^'\"{}\[\]()]*| \([^'\"{}\[\]]*\)")


def _blocks(page: Path) -> list[str]:
    return [code for skip, code in BLOCK.findall(page.read_text()) if not skip]


def _expected_prints(code: str) -> list[str]:
    lines = code.splitlines()
    expected = []
    for i, line in enumerate(lines):
        if line.startswith("print("):
            comment = line.partition("  # ")[2]
            if not comment and i + 1 < len(lines) and lines[i + 1].startswith("# "):
                comment = lines[i + 1].removeprefix("# ")
            expected.append(comment)
    return expected


def _states(want: str, got: str) -> bool:
    """True when the comment ``want`` is exactly the printed line ``got``, optionally with a note."""
    return want == got or (want.startswith(got) and NOTE.fullmatch(want[len(got) :]) is not None)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    text = page.read_text()
    for extra in ("pytorch_lightning", "matplotlib", "transformers"):  # pages needing an optional extra
        if extra in text or (extra == "matplotlib" and ".plot(" in text):
            pytest.importorskip(extra)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for index, code in enumerate(_blocks(page)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(code, f"{page.name}[{index}]", "exec"), namespace)
        printed = capsys.readouterr().out.splitlines()
        expected = _expected_prints(code)
        if str(page.relative_to(DOCS)) in VALUE_CHECKED:
            assert len(printed) == len(expected), (page.name, index, printed)
            for got, want in zip(printed, expected):
                assert _states(want, got), (page.name, index, got, want)
