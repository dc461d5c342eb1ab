"""DiagnosticCollection: routing by argument name, flat keys, atomic updates, warnings."""

from __future__ import annotations

import warnings

import pytest
import torch

import metrics_suite as ms
from metrics_suite.base import DiagnosticMetric, mean_stats
from metrics_suite.collection import DiagnosticCollection
from metrics_suite.reconstruction import ReconstructionScore
from tests.helpers import half_way_losses, score_losses, state_snapshot, states_equal


class _Sum(DiagnosticMetric):
    """A tiny stand-in metric: the mean of ``value`` (exercises routing of another input name)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_mean_state("stats")

    def update(self, value: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError("`value` must be a tensor")
        self.stats += mean_stats(value if mask is None else value[mask])

    def compute(self):
        return self.mean_output(self.stats, "mean")


def test_routing_by_name_and_flat_keys() -> None:
    col = DiagnosticCollection(
        {"reconstruction/score": ReconstructionScore(num_components=2), "other/sum": _Sum(with_stderr=True)}
    )
    inputs = score_losses(6, components=2)
    col.update(**inputs)  # _Sum lacks `value`: skipped
    col.update(value=torch.tensor([1.0, 2.0, 3.0, 4.0]))  # only _Sum
    out = col.compute()
    expected_score = ms.functional.reconstruction_score(*inputs.values())
    assert set(out) == {
        "reconstruction/score/component_0",
        "reconstruction/score/component_1",
        "reconstruction/score/nonfinite_count",
        "other/sum/mean",
        "other/sum/mean_stderr",
        "other/sum/nonfinite_count",
    }
    assert torch.allclose(out["reconstruction/score/component_1"], expected_score[1], rtol=1e-12)
    assert out["other/sum/mean"].item() == 2.5
    # stderr of [1, 2, 3, 4]: sample std / sqrt(n)
    assert out["other/sum/mean_stderr"].item() == pytest.approx(torch.tensor([1.0, 2, 3, 4]).std().item() / 2)
    assert all(v.ndim == 0 for v in out.values())


def test_unknown_input_raises_and_positional_inputs_are_rejected() -> None:
    col = ms.suite("reconstruction")
    with pytest.raises(TypeError, match="source_model_los"):
        col.update(source_model_los=torch.ones(2))
    with pytest.raises(TypeError, match="keyword"):
        col.update(torch.ones(2))


def test_never_updated_metrics_warn_once_and_are_nan() -> None:
    col = DiagnosticCollection({"a/score": ReconstructionScore(), "b/sum": _Sum()})
    col.update(value=torch.ones(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = col.compute()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "a/score" in messages[0], messages
    assert torch.isnan(out["a/score"]) and out["b/sum/mean"] == 1.0


def _bad_losses() -> dict[str, torch.Tensor]:
    bad = score_losses()
    bad["source_model_loss"] = bad["source_model_loss"][:2]
    return bad


@pytest.mark.parametrize("call", ["update", "forward"])
def test_failed_update_rolls_back_the_whole_collection(call: str) -> None:
    # MetricCollection orders metrics by name: "a/sum" is updated before "b/score" rejects
    for atomic in (True, False):
        col = DiagnosticCollection({"a/sum": _Sum(), "b/score": ReconstructionScore()}, atomic_update=atomic)
        col.update(value=torch.ones(3), **score_losses())
        before = {name: state_snapshot(m) for name, m in col.items(keep_base=True)}
        with pytest.raises(ValueError, match="source_model_loss"):
            getattr(col, call)(value=torch.full((3,), 5.0), **_bad_losses())
        unchanged = {
            name: states_equal(state_snapshot(m), before[name]) for name, m in col.items(keep_base=True)
        }
        if not atomic:  # negative control: without the rollback the first metric keeps the batch
            assert unchanged == {"a/sum": False, "b/score": True}
            continue
        assert all(unchanged.values()), unchanged
        assert [m.update_count for m in col.values()] == [1, 1]
        col.update(value=torch.tensor([3.0]))
        assert col.compute()["a/sum/mean"] == 1.5  # (1 + 1 + 1 + 3) / 4: nothing of the rejected batch


def test_forward_gives_batch_values_and_accumulates() -> None:
    col = DiagnosticCollection({"b/sum": _Sum()})
    assert col(value=torch.tensor([1.0, 3.0]))["b/sum/mean"] == 2.0
    assert col(value=torch.tensor([5.0, 7.0]))["b/sum/mean"] == 6.0
    assert col.compute()["b/sum/mean"] == 4.0


def test_per_metric_compute_still_works_and_compute_restores_state() -> None:
    col = ms.suite("reconstruction", changed_tokens=False)
    inputs = score_losses()
    col.update(**inputs)
    metric = col["reconstruction/reconstruction_score"]
    first = col.compute()["reconstruction/reconstruction_score"]
    assert torch.equal(metric.compute(), first)  # Lightning may call each metric's compute
    col.update(**inputs)  # same items again: same ratio, twice the sums
    assert torch.allclose(col.compute()["reconstruction/reconstruction_score"], first, rtol=1e-12)
    assert torch.allclose(metric.loss_sums[0, 0], 2 * inputs["source_model_loss"].double().sum())


class _RandomProbe(DiagnosticMetric):
    """Adds a random draw of its own generator per item: a metric whose extra state is a generator."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)
        self.add_sum_state("total")

    def update(self, hidden: torch.Tensor) -> None:
        self.total += torch.rand(len(hidden), generator=self.generator, dtype=torch.float64).sum()

    def compute(self) -> torch.Tensor:
        return self.total

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def test_rollback_restores_extra_state_such_as_a_random_generator() -> None:
    """A rejected collection update must not advance a metric's generator (module extra state)."""
    hidden = torch.zeros(5, 3)
    reference = _RandomProbe()
    reference.update(hidden)
    for atomic in (True, False):
        # "a/probe" draws before "b/score" rejects the call
        col = DiagnosticCollection(
            {"a/probe": _RandomProbe(), "b/score": ReconstructionScore()}, atomic_update=atomic
        )
        with pytest.raises(ValueError):
            col.update(hidden=hidden, **_bad_losses())
        if not atomic:  # negative control: without the rollback the generator moved on
            col["a/probe"].reset()
        col.update(hidden=hidden)
        assert torch.equal(col["a/probe"].compute(), reference.compute()) is atomic


def test_only_sum_state_metrics_can_join() -> None:
    from torchmetrics.aggregation import CatMetric, MaxMetric, MeanMetric, MinMetric

    with pytest.raises(TypeError, match=r"x/max \(MaxMetric\): state `max_value` has reduction 'max'"):
        DiagnosticCollection({"x/max": MaxMetric()})
    with pytest.raises(TypeError, match=r"x/cat \(CatMetric\): state `value` is a list"):
        DiagnosticCollection({"a/score": ReconstructionScore(), "x/cat": CatMetric()})
    col = DiagnosticCollection({"a/score": ReconstructionScore()})
    with pytest.raises(TypeError, match=r"x/min \(MinMetric\): state `min_value` has reduction 'min'"):
        col.add_metrics({"x/min": MinMetric()})
    with pytest.raises(TypeError, match="x/max"):
        col["x/max"] = MaxMetric()
    assert list(col.keys()) == ["a/score"]
    col["x/mean"] = MeanMetric()  # its states are sums (Σw·x, Σw): fine
    col.update(value=torch.tensor([2.0, 3.0]))
    with pytest.warns(UserWarning, match=r"never updated .*\['a/score'\]"):
        assert col.compute()["x/mean"] == 2.5


def test_resumed_or_merged_collection_counts_the_saved_updates() -> None:
    col = ms.suite("reconstruction", changed_tokens=False, downstream=False)
    col.update(**half_way_losses())
    resumed = ms.suite("reconstruction", changed_tokens=False, downstream=False)
    resumed.load_state_dict(col.state_dict())
    merged = DiagnosticCollection({"r/s": ReconstructionScore()})
    merged["r/s"].merge_state(col["reconstruction/reconstruction_score"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "never updated" (nor "compute before update") warning
        assert resumed.compute()["reconstruction/reconstruction_score"] == 0.5
        assert merged.compute()["r/s"] == 0.5
        assert merged["r/s"].compute() == 0.5


def test_routes_follow_setitem_and_del() -> None:
    col = DiagnosticCollection({"a/score": ReconstructionScore()})
    col["b/sum"] = _Sum()
    col.update(value=torch.tensor([4.0]), **half_way_losses())
    del col["a/score"]
    with pytest.raises(TypeError, match="source_model_loss"):
        col.update(**half_way_losses())  # no metric takes the losses any more
    col.update(value=torch.tensor([2.0]))
    assert col.compute() == {"b/sum/mean": 3.0, "b/sum/nonfinite_count": 0}


def test_forward_keys_are_compute_keys_without_the_running_counts() -> None:
    col = DiagnosticCollection({"a/score": ReconstructionScore(num_components=2), "b/sum": _Sum()})
    batch = col(value=torch.tensor([1.0]), **score_losses(components=2))
    assert set(batch) == {k for k in col.compute() if not k.endswith("/nonfinite_count")}
