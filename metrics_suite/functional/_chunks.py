"""The chunking policy of the functional modules: how many rows a working chunk holds, and the row slices.

A batch is processed in consecutive row chunks so that the float64 (or compute-dtype) copies of
an update stay a few chunks large, however many rows the batch holds.
"""

from __future__ import annotations

from collections.abc import Iterator

#: Elements of one float64 working chunk (32 MiB) where no measured size says otherwise.
CHUNK_ELEMENTS = 1 << 22


def rows_per_chunk(row_size: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows of ``row_size`` elements that fit ``elements`` (at least one)."""
    return max(1, elements // max(row_size, 1))


def row_slices(n_rows: int, rows: int) -> Iterator[slice]:
    """Consecutive slices of at most ``rows`` rows covering ``range(n_rows)``."""
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))
