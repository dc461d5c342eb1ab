"""Input checks shared by every metric."""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch

import metrics_suite as ms
from metrics_suite.registry import registered


def test_index_and_mask_checks_accept_numpy_ints_and_unsigned_masks() -> None:
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


# every constructor size, float and flag argument, with a valid value of each (None: no size)
_SIZE_ARGS = [
    (ms.ReconstructionScore, "num_components", {}),
    (ms.ActivationReconstruction, "num_features", {}),
    (ms.FeatureSparsity, "num_features", {}),
    (ms.NextTokenDivergence, "num_logits", {}),
    (ms.NextTokenDivergence, "max_batch_size", {}),
    (ms.MaskedCrossEntropy, "max_sequence_length", {}),
    (ms.PredictionChange, "num_classes", {}),
    (ms.CreditCosine, "num_layers", {}),
    (ms.PerturbationCorrelation, "num_directions", {}),
    (ms.PerturbationCorrelation, "chunk_size", {}),
    (ms.NudgingDelta, "num_layers", {}),
    (ms.BridgeResidual, "num_layers", {}),
]
_REQUIRED = {"num_features": 4, "num_classes": 3}


def _build(cls: type, **kwargs: object) -> object:
    required = {k: v for k, v in _REQUIRED.items() if k in inspect.signature(cls.__init__).parameters}
    return cls(**(required | kwargs))


@pytest.mark.parametrize(
    ("cls", "arg", "extra"), _SIZE_ARGS, ids=[f"{c.__name__}-{a}" for c, a, _ in _SIZE_ARGS]
)
def test_sizes_are_strict_positive_ints_numpy_accepted(cls: type, arg: str, extra: dict) -> None:
    for bad in (True, 2.0, "8", 0, -1, np.float64(3.0)):
        with pytest.raises(
            ValueError,
            match=rf"^{cls.__name__}: `{arg}` got {re.escape(repr(bad))}; accepted: a positive int",
        ):
            _build(cls, **{arg: bad}, **extra)
    metric = _build(cls, **{arg: np.int64(3)}, **extra)
    assert getattr(metric, arg) == 3 and type(getattr(metric, arg)) is int


@pytest.mark.parametrize(
    ("cls", "arg"),
    [(ms.PerturbationCorrelation, "epsilon"), (ms.NudgingDelta, "eta"), (ms.BridgeResidual, "lam")],
)
def test_step_sizes_are_finite_positive_floats(cls: type, arg: str) -> None:
    for bad in (math.inf, math.nan, 0.0, -1.0, True, "0.1"):
        with pytest.raises(
            ValueError, match=rf"^{cls.__name__}: `{arg}` got .*; accepted: a finite number > 0"
        ):
            cls(**{arg: bad})
    assert getattr(cls(**{arg: np.float32(0.5)}), arg) == 0.5


@pytest.mark.parametrize("arg", ["validate_args", "with_stderr", "check_layout"])
def test_flags_are_bools(arg: str) -> None:
    for bad in (1, "yes", None):
        with pytest.raises(
            TypeError, match=rf"^CreditCosine: `{arg}` got {re.escape(repr(bad))}; accepted: True or False"
        ):
            ms.CreditCosine(**{arg: bad})


def test_with_stderr_works_or_raises_for_every_metric() -> None:
    from tests.helpers import example_batches

    for entry in registered():
        try:
            metric = entry.cls(**entry.example.init_kwargs, with_stderr=True)
        except ValueError as err:
            assert "`with_stderr`" in str(err) or "with_stderr=True" in str(err), err
            continue
        metric.update(**example_batches(entry, [4])[0])
        out = metric.compute()
        assert isinstance(out, dict) and any(k.endswith("_stderr") for k in out), entry.name


def test_component_idx_accepts_numpy_ints_like_layer() -> None:
    loss = torch.tensor([4.0, 6.0])
    numpy_idx, int_idx = ms.ReconstructionScore(num_components=2), ms.ReconstructionScore(num_components=2)
    numpy_idx.update(loss, loss - 1, loss + 2, component_idx=np.int64(1))
    int_idx.update(loss, loss - 1, loss + 2, component_idx=1)
    for a, b in zip(numpy_idx.state_items(), int_idx.state_items()):
        assert torch.equal(a[1], b[1]), a[0]
    assert numpy_idx.loss_sums[1].abs().sum() > 0 and numpy_idx.loss_sums[0].abs().sum() == 0
    with pytest.raises(TypeError, match="`component_idx`"):
        numpy_idx.update(loss, loss - 1, loss + 2, component_idx=np.float64(1.0))
