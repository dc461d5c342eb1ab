"""RowGather: the rows it reads equal advanced indexing, and `read` copies only where it must."""

from __future__ import annotations

import torch

from metrics_suite.functional._rows import RowGather


def _logits(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)


def _expected(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[positions].float()


def test_read_gives_a_view_of_consecutive_rows() -> None:
    x = _logits()
    positions = torch.arange(4, 9)
    out = torch.empty(8, 7)
    rows = RowGather(x, torch.float32, 8).read(positions, out[:5])
    assert torch.equal(rows, _expected(x, positions))
    assert rows.data_ptr() == x[0, 4].data_ptr()  # no copy: the input's own memory


def test_read_copies_rows_that_are_not_consecutive() -> None:
    x = _logits()
    out = torch.empty(8, 7)
    # a gap, a repeat whose span still equals n - 1, an unsorted pair
    for positions in ([0, 2, 3], [0, 0, 2], [5, 4]):
        index = torch.tensor(positions)
        rows = RowGather(x, torch.float32, 8).read(index, out[: len(positions)])
        assert torch.equal(rows, _expected(x, index)), positions
        assert rows.data_ptr() == out.data_ptr(), positions


def test_read_copies_where_a_view_would_be_wrong() -> None:
    """Another dtype is converted, a strided input has no flat view: both land in ``out``."""
    positions = torch.arange(2, 6)
    for x in (_logits(torch.bfloat16), _logits().transpose(0, 1)):
        out = torch.empty(8, 7)
        rows = RowGather(x, torch.float32, 8).read(positions, out[:4])
        assert torch.equal(rows, _expected(x, positions))
        assert rows.data_ptr() == out.data_ptr()
    empty = RowGather(_logits(), torch.float32, 8).read(torch.arange(0), torch.empty(0, 7))
    assert empty.shape == (0, 7)
