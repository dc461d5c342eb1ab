"""Reading rows of a ``[..., V]`` tensor chunk by chunk, shared by the utility and noise functionals."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class RowGather:
    """Copies selected positions of a ``[..., V]`` tensor into a ``[n, V]`` buffer of the compute dtype.

    Never copies the whole tensor: a contiguous input is read with ``index_select`` through a
    ``[N, V]`` view, a strided one (a moved dimension, a broadcast input with zero strides) with
    advanced indexing on the unravelled positions. So the extra memory of a chunked pass is one
    chunk. The input is detached: ``out=`` buffers cannot carry gradients, and these are diagnostics.
    A caller that only reads the rows uses `read`, which skips the copy where it can.
    """

    def __init__(self, logits: Tensor, dtype: torch.dtype, max_rows: int) -> None:
        self.logits = logits = logits.detach()
        self.vocab = logits.shape[-1]
        try:
            self.flat: Tensor | None = logits.view(-1, self.vocab)
        except RuntimeError:
            self.flat = None
        # half-precision inputs are gathered in their own dtype first, then converted
        self.raw = (
            torch.empty(max_rows, self.vocab, dtype=logits.dtype, device=logits.device)
            if logits.dtype != dtype and self.flat is not None
            else None
        )

    def __call__(self, positions: Tensor, out: Tensor) -> Tensor:
        if self.flat is None:
            return out.copy_(self.logits[torch.unravel_index(positions, self.logits.shape[:-1])])
        if self.raw is None:
            return torch.index_select(self.flat, 0, positions, out=out)
        raw = torch.index_select(self.flat, 0, positions, out=self.raw[: positions.numel()])
        return out.copy_(raw)

    def read(self, positions: Tensor, out: Tensor) -> Tensor:
        """The rows at ``positions``, to be read only: a view of the input where they are consecutive
        rows of a flat CPU input already in ``out``'s dtype, else `__call__`'s copy into ``out``.

        On the CPU the positions are in host memory: numpy reads them in place, a few microseconds
        against the copy's memory pass (about 0.25 ms for 16 rows of 32,000 float32). Elsewhere the
        check would wait for the device, so other devices always copy.
        """
        n = positions.numel()
        if n and self.flat is not None and self.raw is None and positions.device.type == "cpu":
            index = positions.numpy()
            first = int(index[0])
            if index[-1] - first == n - 1 and bool((np.diff(index) == 1).all()):
                return self.flat[first : first + n]
        return self(positions, out)

    def span(self, start: int, end: int, out: Tensor) -> Tensor:
        """Positions ``start`` to ``end`` (exclusive) into ``out``: one converting copy of a slice
        when the input has a flat view, else as `__call__`."""
        if self.flat is not None:
            return out.copy_(self.flat[start:end])
        return self(torch.arange(start, end, device=self.logits.device), out)
