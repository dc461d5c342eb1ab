"""The sum-state machinery of DiagnosticMetric and the statistics helpers it uses."""

from __future__ import annotations

import warnings

import pytest
import torch

import metrics_suite as ms
from metrics_suite.collection import DiagnosticCollection
from metrics_suite.functional._stats import mean_and_stderr, mean_stats, safe_div
from metrics_suite.reconstruction import ReconstructionScore
from tests.helpers import half_way_losses, score_losses, state_snapshot, states_equal


def test_mean_and_stderr_match_numpy() -> None:
    import numpy as np

    x = torch.randn(101, dtype=torch.float64)
    mean, stderr = mean_and_stderr(mean_stats(x))
    assert mean.item() == pytest.approx(np.mean(x.numpy()), rel=1e-12)
    assert stderr.item() == pytest.approx(np.std(x.numpy(), ddof=1) / np.sqrt(101), rel=1e-9)
    empty_mean, empty_err = mean_and_stderr(torch.zeros(3, dtype=torch.float64))
    assert torch.isnan(empty_mean) and torch.isnan(empty_err)


def test_safe_div_promotes_both_sides_to_float64() -> None:
    assert safe_div(torch.tensor(3), 0.5).item() == 6.0
    assert safe_div(torch.tensor(1.0), torch.tensor(1e-50, dtype=torch.float64)).item() == pytest.approx(1e50)
    assert torch.isnan(safe_div(torch.tensor([1.0]), 0.0)).all()


def test_nan_strategy() -> None:
    inputs = score_losses(4)
    bad = dict(inputs)
    bad["source_model_loss"] = inputs["source_model_loss"].clone()
    bad["source_model_loss"][1] = float("nan")
    finite_rows = {k: v[[0, 2, 3]] for k, v in inputs.items()}

    skip = ReconstructionScore()
    skip.update(**bad)
    with pytest.warns(UserWarning, match="skipped 1 item"):
        value = skip.compute()
    assert value == ms.functional.reconstruction_score(*finite_rows.values())
    assert skip.nonfinite_count == 1

    error = ReconstructionScore(nan_strategy="error")
    before = state_snapshot(error)
    with pytest.raises(ValueError, match="NaN"):
        error.update(**bad)
    assert states_equal(state_snapshot(error), before)

    propagate = ReconstructionScore(nan_strategy="propagate")
    propagate.update(**bad)
    assert torch.isnan(propagate.compute())

    col = DiagnosticCollection({"a/score": ReconstructionScore()})
    col.update(**bad)
    with pytest.warns(UserWarning, match="skipped"):
        assert col.compute()["a/score/nonfinite_count"] == 1


def test_set_dtype_and_half_keep_float64_accumulators() -> None:
    metric = ReconstructionScore()
    metric.update(**score_losses())
    metric.half()
    metric.set_dtype(torch.float16)
    assert metric.loss_sums.dtype == torch.float64 and metric.nonfinite_count.dtype == torch.int64
    module = torch.nn.Module()
    module.metric = metric
    module.to(torch.bfloat16)
    assert metric.loss_sums.dtype == torch.float64


def test_nonfinite_warning_fires_once_across_forward_calls_until_reset() -> None:
    bad = half_way_losses()
    bad["source_model_loss"] = torch.tensor([1.0, float("nan"), 3.0])
    metric = ReconstructionScore()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            metric(**bad)
        metric.compute()
        metric.reset()
        metric(**bad)
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert (
        skipped == ["ReconstructionScore: skipped 1 item(s) with NaN/inf inputs (nan_strategy='skip')."] * 2
    )


def test_merge_and_load_refuse_other_shapes_and_keep_dtypes() -> None:
    from torchmetrics.aggregation import SumMetric

    two = ReconstructionScore(num_components=2)
    two.update(**score_losses(components=2))
    one = ReconstructionScore()
    one.update(**half_way_losses())
    before = state_snapshot(one)
    with pytest.raises(ValueError, match=r"`loss_sums` must have shape \[1, 3\], got \[2, 3\]"):
        one.merge_state(two)
    with pytest.raises(ValueError, match=r"`loss_sums` must have shape \[1, 3\], got \[2, 3\]"):
        one.load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match=r"`incoming_state` must be a ReconstructionScore .*got SumMetric"):
        one.merge_state(SumMetric())
    with pytest.raises(
        ValueError, match=r"`incoming_state` lacks the states \['nonfinite_count', 'ratio_stats'\]"
    ):
        one.merge_state({"loss_sums": before["loss_sums"]})
    assert states_equal(state_snapshot(one), before)

    resumed = ReconstructionScore()
    resumed.load_state_dict({k: v.float() for k, v in one.state_dict().items()})
    assert resumed.loss_sums.dtype == torch.float64 and resumed.nonfinite_count.dtype == torch.int64
    resumed.update(**half_way_losses())
    assert resumed.compute().item() == 0.5


def test_rejected_forward_on_the_full_state_path_keeps_the_states() -> None:
    """With dist_sync_on_step torchmetrics adds the batch in place before its second update."""
    calls = {"n": 0}

    def flaky_loss(h: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:  # the forward's second update (after one plain update)
            raise RuntimeError("out of memory")
        return 0.5 * h.square().sum(-1)

    hidden = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    metric = ms.NudgingDelta(dist_sync_on_step=True)
    metric.update(hidden, hidden, flaky_loss)
    before = {k: v.clone() for k, v in metric.state_items()}
    with pytest.raises(RuntimeError, match="out of memory"):
        metric(hidden, hidden, flaky_loss)
    assert all(torch.equal(v, before[k]) for k, v in metric.state_items())
    assert metric.update_count == 1


def test_update_count_in_state_dicts_and_merges() -> None:
    a, b = ms.ReconstructionScore(), ms.ReconstructionScore()
    loss = torch.tensor([1.0, 2.0])
    for _ in range(3):
        b.update(loss, loss + 1, loss + 2)
    a.merge_state(b.state_dict())  # a state_dict carries its update count
    assert a.update_count == 3
    assert a.compute().item() == pytest.approx(0.5)
    b.persistent(False)
    assert "update_count" not in b.state_dict()  # nothing saved: no count that describes nothing


def test_metric_unpickled_from_an_older_version_resets() -> None:
    metric = ms.ReconstructionScore()
    state = metric.__getstate__()
    state.pop("_in_forward", None)  # older versions had no such attribute
    restored = ms.ReconstructionScore.__new__(ms.ReconstructionScore)
    restored.__setstate__(state)
    restored.reset()
    assert restored.update_count == 0
