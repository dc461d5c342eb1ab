"""The chunking policy of the functional modules: every chunk budget, how many rows a chunk holds, the row slices.

A batch is processed in consecutive row chunks so that the float64 (or compute-dtype) copies of
an update stay a few chunks large, however many rows the batch holds. Every budget lives here, with
its reason; changing one changes the order of the float64 sums (so results in the last bits), and
the functional modules import them by name (tests shrink them there to exercise ragged chunks).
"""

from __future__ import annotations

from collections.abc import Iterator

#: Elements of one float64 working chunk (32 MiB) where no measured size says otherwise
#: (reconstruction vectors, credit items and item keys).
CHUNK_ELEMENTS = 1 << 22

#: Elements of the perturbed rows in one ``loss_fn`` call of the credit suite by default (16 MB in
#: float32): few calls, and one call's input stays bounded whatever the number of directions.
LOSS_CALL_ELEMENTS = 1 << 22

#: Elements of one float64 chunk per input of the noise statistics on the CPU (512 KiB): it stays in
#: cache; larger chunks mostly add page faults (measured).
NOISE_CHUNK_ELEMENTS = 1 << 16

#: Off the CPU a noise chunk is this many times larger: there each chunk costs a dozen kernel launches.
NOISE_DEVICE_CHUNK_FACTOR = 1 << 6

#: Bytes of one ``[chunk, V]`` logits buffer when no ``max_batch_size``/``max_sequence_length`` is
#: given (2 MiB): about six such buffers are live at once, and together they stay in cache.
LOGIT_CHUNK_BYTES = 1 << 21


def rows_per_chunk(row_size: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows of ``row_size`` elements that fit ``elements`` (at least one)."""
    return max(1, elements // max(row_size, 1))


def row_slices(n_rows: int, rows: int) -> Iterator[slice]:
    """Consecutive slices of at most ``rows`` rows covering ``range(n_rows)``."""
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))
