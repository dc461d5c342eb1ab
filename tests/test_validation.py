"""Input checks shared by every metric."""

from __future__ import annotations

import pytest
import torch


def test_index_and_mask_checks_accept_numpy_ints_and_unsigned_masks() -> None:
    import numpy as np

    from metrics_suite.validation import check_index, check_mask

    assert check_index("layer", np.int64(1), 2, "num_layers") == 1
    with pytest.raises(TypeError, match="`layer` must be an int"):
        check_index("layer", True, 2, "num_layers")
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        mask = torch.tensor([1, 0, 1], dtype=dtype)
        assert check_mask("mask", mask, (3,)).tolist() == [True, False, True]
        with pytest.raises(ValueError, match="`mask` must hold only 0 and 1"):
            check_mask("mask", torch.tensor([2, 0, 1], dtype=dtype), (3,))
    with pytest.raises(TypeError, match="`mask` must be a bool"):
        check_mask("mask", torch.ones(3), (3,))
