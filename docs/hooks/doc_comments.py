"""Griffe extension: ``#:`` comments above an attribute become its docstring.

The sources document constants and class attributes the Sphinx way (``#: text`` lines right
above the assignment). Griffe only reads a string literal below the assignment, so without this
those attributes would be undocumented, hidden, and cross-references to them would not resolve.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


class DocComments(griffe.Extension):
    def on_attribute_instance(
        self, *, node: ast.AST | griffe.ObjectNode, attr: griffe.Attribute, **kwargs: Any
    ) -> None:
        if attr.docstring is not None or not isinstance(node, ast.AST) or attr.lineno is None:
            return
        path = attr.filepath
        if isinstance(path, list) or path not in attr.lines_collection:
            return
        lines = attr.lines_collection[path]
        comment: list[str] = []
        index = attr.lineno - 2  # the line above the assignment, 0-based
        while index >= 0 and lines[index].lstrip().startswith("#:"):
            comment.insert(0, lines[index].lstrip()[2:].strip())
            index -= 1
        if comment:
            attr.docstring = griffe.Docstring("\n".join(comment), lineno=index + 2, parent=attr)
