"""The recipe pages (docs/recipes/) as scripts, and what each rank of a gloo group runs of them.

Used by tests/test_recipes.py: one spawned group runs every recipe, as a newcomer's script would run
under DDP (the same code; ``evaluate`` takes every ``world_size``-th batch on each rank).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import torch

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes"
_BLOCK = re.compile(r"(<!-- no-test -->\s*)?```python\n(.*?)```", flags=re.S)


def recipe_script(page: Path) -> str:
    """The page's ``python`` blocks joined into one script (what a reader copies)."""
    return "\n\n".join(code for skip, code in _BLOCK.findall(page.read_text()) if not skip)


def recipe_values(name: str, namespace: dict[str, Any]) -> Any:
    """What a recipe computed, as plain data (the values DDP must reproduce)."""
    if name == "vit-intervention":
        return {
            "rows": [dataclasses.asdict(row) for row in namespace["rows"]],
            "classes": [dataclasses.asdict(c) for c in namespace["metric"].class_results()],
        }
    return namespace["results"]


def run_recipes(rank: int, world_size: int, scripts: dict[str, str]) -> dict[str, Any]:
    """Run every recipe script on this rank (the process group is up); their values by name."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    out = {}
    for name, code in scripts.items():
        torch.manual_seed(0)
        namespace: dict[str, Any] = {"__name__": f"recipe_{name.replace('-', '_')}"}
        exec(compile(code, f"{name}.md", "exec"), namespace)
        out[name] = recipe_values(name, namespace)
    return out
