"""MkDocs hook: formulas become MathML at build time, so pages render them with no script.

``pymdownx.arithmatex`` (``generic: true``) wraps every formula, in pages and in docstrings
rendered by mkdocstrings alike, as ``<span class="arithmatex">\\(...\\)</span>`` (inline) or
``<div class="arithmatex">\\[...\\]</div>`` (display). Browsers render MathML natively, so
converting those with ``latex2mathml`` replaces the CDN MathJax script. A formula that cannot be
converted is a build warning (an error under ``mkdocs build --strict``).
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.hooks.mathml")

_FORMULA = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])\s*</(?P=tag)>',
    re.DOTALL,
)
# latex2mathml keeps ``\_`` and the like verbatim inside text arguments; LaTeX prints the character.
_TEXT_ARG = re.compile(r"\\(text|texttt|mathrm|operatorname)\{([^{}]*)\}")
_TEXT_ESCAPE = re.compile(r"\\([_#%&$])")


def to_mathml(latex: str, *, block: bool) -> str:
    latex = _TEXT_ARG.sub(
        lambda m: "\\" + m.group(1) + "{" + _TEXT_ESCAPE.sub(r"\1", m.group(2)) + "}", latex
    )
    return convert(latex.strip(), display="block" if block else "inline")


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        block = match.group("block") is not None
        latex = html.unescape(match.group("block") if block else match.group("inline"))
        try:
            mathml = to_mathml(latex, block=block)
        except Exception as error:  # latex2mathml raises several types; each is a broken formula
            log.warning("%s: cannot convert formula %r to MathML: %s", page.file.src_uri, latex, error)
            return match.group(0)
        return f'<{match.group("tag")} class="arithmatex">{mathml}</{match.group("tag")}>'

    return _FORMULA.sub(replace, html_text)
