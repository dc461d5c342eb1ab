"""The position-mask helpers of ``functional/_masks.py`` against hand-written masks, and the mask
checks of the functions that use them (the helpers trust their input; the callers name the argument)."""

from __future__ import annotations

import re

import pytest
import torch

from metrics_suite.functional import noise as functional_noise
from metrics_suite.functional import reconstruction as functional_reconstruction
from metrics_suite.functional import utility as functional_utility
from metrics_suite.functional._masks import attended_positions, counted_targets, position_mask
from metrics_suite.utility import NextTokenDivergence


def _cpu(x: torch.Tensor) -> list:
    return x.cpu().tolist()


# ---------------------------------------------------------------------------------------------- position_mask
@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (None, [[True, True, True], [True, True, True]]),
        (
            torch.tensor([[True, False, True], [False, False, True]]),
            [[True, False, True], [False, False, True]],
        ),
        (
            torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.uint8),
            [[True, False, True], [False, False, True]],
        ),
        (
            torch.tensor([[True], [False]]),
            [[True, True, True], [False, False, False]],
        ),  # [B, 1]: per sequence
        (torch.tensor([1, 0, 1]), [[True, False, True], [True, False, True]]),  # [T]: every sequence
    ],
    ids=["none", "bool", "uint8", "per-sequence", "per-token"],
)
def test_position_mask_is_bool_of_the_position_shape(
    mask: torch.Tensor | None, expected: list, device: torch.device
) -> None:
    out = position_mask(mask, torch.Size((2, 3)), device)
    assert out.dtype == torch.bool and out.shape == (2, 3) and out.device.type == device.type
    assert _cpu(out) == expected


def test_position_mask_broadcasts_without_copying() -> None:
    mask = torch.tensor([[True], [False]])
    out = position_mask(mask, (2, 4), torch.device("cpu"))
    assert out.data_ptr() == mask.data_ptr() and out.stride() == (1, 0)


# ---------------------------------------------------------------------------------------------- attended_positions
@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (None, [0, 1, 2, 3, 4, 5]),
        (torch.tensor([[True, False, True], [False, False, True]]), [0, 2, 5]),
        (torch.tensor([[0, 1, 1], [1, 0, 0]]), [1, 2, 3]),  # 0/1 integers
        (torch.tensor([[False], [True]]), [3, 4, 5]),  # [B, 1]
        (torch.tensor([False, True, False]), [1, 4]),  # [T]
        (torch.zeros(2, 3, dtype=torch.bool), []),
    ],
    ids=["none", "bool", "int", "per-sequence", "per-token", "nothing"],
)
def test_attended_positions_are_flat_row_major_indices(
    mask: torch.Tensor | None, expected: list[int], device: torch.device
) -> None:
    out = attended_positions(mask, (2, 3), device)
    assert out.dtype == torch.int64 and out.ndim == 1 and out.device.type == device.type
    assert _cpu(out) == expected


# ---------------------------------------------------------------------------------------------- counted_targets
TARGETS = torch.tensor([[5, -100, 7], [1, 2, -100]])


@pytest.mark.parametrize(
    ("mask", "ignore_index", "expected"),
    [
        (None, None, [[True, True, True], [True, True, True]]),
        (None, -100, [[True, False, True], [True, True, False]]),
        (torch.tensor([[1, 1, 0], [1, 0, 1]]), None, [[True, True, False], [True, False, True]]),
        (torch.tensor([[1, 1, 0], [1, 0, 1]]), -100, [[True, False, False], [True, False, False]]),
        (torch.tensor([[True], [False]]), -100, [[True, False, True], [False, False, False]]),
        (None, 7, [[True, True, False], [True, True, True]]),  # any id can be the ignored one
    ],
)
def test_counted_targets_are_attended_and_not_ignored(
    mask: torch.Tensor | None, ignore_index: int | None, expected: list, device: torch.device
) -> None:
    out = counted_targets(TARGETS.to(device), mask, ignore_index)
    assert out.dtype == torch.bool and out.shape == TARGETS.shape
    assert _cpu(out) == expected


def test_counted_targets_of_gathered_targets() -> None:
    # the downstream suite gathers the attended targets first, then drops the ignored ones
    assert _cpu(counted_targets(torch.tensor([3, -1, 0]), None, -1)) == [True, False, True]


# ---------------------------------------------------------------------------------------------- callers
def _logits(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_int_and_bool_masks_give_the_same_results() -> None:
    logits, targets = _logits(2, 3, 5), torch.tensor([[0, 1, 2], [3, 4, 0]])
    bool_mask = torch.tensor([[True, False, True], [True, True, False]])
    for int_mask in (bool_mask.to(torch.int64), bool_mask.to(torch.uint8)):
        assert functional_utility.masked_cross_entropy(logits, targets, int_mask) == (
            functional_utility.masked_cross_entropy(logits, targets, bool_mask)
        )
        x, y = _logits(2, 3, 4), _logits(2, 3, 4) + 1.0
        got = functional_utility.next_token_divergence(x, y, int_mask)
        want = functional_utility.next_token_divergence(x, y, bool_mask)
        assert {k: v.item() for k, v in got.items()} == {k: v.item() for k, v in want.items()}
    # hand-computed: 3 of the 4 selected tokens changed (the masked-out change does not count);
    # per sequence 1/2 and 2/2
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    rec = torch.tensor([[9, 2, 3], [9, 9, 9]])
    rate = functional_reconstruction.changed_token_rate(ids, rec, bool_mask.to(torch.int32))
    assert rate["token_rate"].item() == pytest.approx(3 / 4)
    assert rate["sequence_mean"].item() == pytest.approx((1 / 2 + 1.0) / 2)


BAD_MASKS = [
    (
        lambda: functional_reconstruction.percentage_changed_ids(
            torch.zeros(2, 4, dtype=torch.long),
            torch.zeros(2, 4, dtype=torch.long),
            torch.ones(3, dtype=torch.bool),
        ),
        ValueError,
        "`noise_mask` must broadcast to the shape of `input_ids` [2, 4], got [3]",
    ),
    (
        lambda: functional_noise.noise_statistics(
            _logits(2, 3, 4), _logits(2, 3, 4), _logits(2, 3, 4), torch.ones(2, 2, dtype=torch.bool)
        ),
        ValueError,
        "`noise_mask` must broadcast to the position shape (input without dim) [2, 3], got [2, 2]",
    ),
    (
        lambda: functional_reconstruction.activation_reconstruction(
            _logits(2, 3, 4), _logits(2, 3, 4), torch.tensor([[1, 2, 0], [0, 0, 1]])
        ),
        ValueError,
        "`mask` must hold only 0 and 1 when given as integers",
    ),
    (
        lambda: functional_reconstruction.feature_sparsity(
            _logits(2, 3, 4), torch.ones(2, 1, dtype=torch.bool)
        ),
        ValueError,
        "`mask` must have shape [2, 3], got [2, 1]",  # exact shape: no broadcast here
    ),
    (
        lambda: functional_utility.masked_cross_entropy(
            _logits(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool)
        ),
        ValueError,
        "`attention_mask` must have shape [2, 3], got [2, 1]",
    ),
    (
        lambda: functional_utility.next_token_divergence(
            _logits(2, 3, 5), _logits(2, 3, 5), torch.ones(2, 3)
        ),
        TypeError,
        "`attention_mask` must be a bool (or 0/1 integer) tensor, got dtype torch.float32",
    ),
    (
        lambda: functional_utility.token_divergences(
            _logits(4, 5), _logits(4, 5), torch.ones(2, dtype=torch.bool)
        ),
        ValueError,
        "`attention_mask` must have shape [4], got [2]",
    ),
    (
        lambda: functional_utility.prediction_change(
            torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2, torch.tensor([1, 0, 3])
        ),
        ValueError,
        "`mask` must hold only 0 and 1 when given as integers",
    ),
    (
        lambda: functional_reconstruction.downstream_reconstruction(
            _logits(2, 3, 5),
            _logits(2, 3, 5),
            _logits(2, 3, 5),
            attention_mask=torch.ones(3, 2, dtype=torch.bool),
        ),
        ValueError,
        "`attention_mask` must have shape [2, 3], got [3, 2]",
    ),
    (
        lambda: NextTokenDivergence().update(
            _logits(2, 3, 5), _logits(2, 3, 5), torch.ones(2, 1, dtype=torch.bool)
        ),
        ValueError,
        "`attention_mask` must have shape [2, 3], got [2, 1]",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD_MASKS)
def test_callers_name_the_bad_mask(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call()
