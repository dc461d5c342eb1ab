"""DiagnosticCollection routing and keys, the registry, and configuration."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from pydantic import ValidationError

import metrics_suite as ms
from metrics_suite.base import DiagnosticMetric, mean_and_stderr, mean_stats, safe_div
from metrics_suite.collection import DiagnosticCollection
from metrics_suite.reconstruction import ReconstructionScore
from tests.helpers import state_snapshot, states_equal


def _losses(n: int = 4, components: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, components) if components > 1 else (n,)
    clean = torch.rand(shape, generator=g)
    zero = clean + 1 + torch.rand(shape, generator=g)
    return {
        "source_model_loss": clean,
        "source_model_loss_with_reconstruction": clean + (zero - clean) * torch.rand(shape, generator=g),
        "source_model_loss_with_zero_ablation": zero,
    }


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


def test_registry_lists_the_four_suites() -> None:
    suites = ms.available()
    assert list(suites) == ["reconstruction", "utility", "noise", "credit"]
    assert "reconstruction_score" in suites["reconstruction"]


def test_unknown_suite_or_metric_lists_what_exists() -> None:
    with pytest.raises(ValueError, match="available suites"):
        ms.suite("recon")
    with pytest.raises(ValueError, match="reconstruction_score"):
        ms.suite("reconstruction", reconstructon_score={})


def test_overrides_configure_exclude_and_validate() -> None:
    col = ms.suite("reconstruction", reconstruction_score={"num_components": 3, "reduction": "itemwise_mean"})
    metric = col["reconstruction/reconstruction_score"]
    assert (metric.num_components, metric.reduction) == (3, "itemwise_mean")
    assert "reconstruction/reconstruction_score" not in ms.suite("reconstruction", reconstruction_score=False)
    with pytest.raises(ValueError, match=r"(?s)reconstruction/reconstruction_score.*num_components"):
        ms.suite("reconstruction", reconstruction_score={"num_components": 0})
    with pytest.raises(ValueError, match="reduction"):
        ReconstructionScore(reduction="mean")


def test_build_from_dict_json_and_toml(tmp_path) -> None:
    cfg = {"suites": ["reconstruction"], "metrics": {"reconstruction_score": {"num_components": 2}}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    (tmp_path / "c.toml").write_text(
        'suites = ["reconstruction"]\n[metrics.reconstruction_score]\nnum_components = 2\n'
    )
    for source in (cfg, ms.SuiteConfig(**cfg), tmp_path / "c.json", str(tmp_path / "c.toml")):
        col = ms.build(source)
        assert col["reconstruction/reconstruction_score"].num_components == 2
    with pytest.raises(ValidationError, match="suites"):
        ms.build({"suites": ["nope"]})
    with pytest.raises(ValidationError, match="extra"):
        ms.build({"suite": ["utility"]})
    (tmp_path / "c.yaml").write_text("")
    with pytest.raises(ValueError, match=r"\.json or \.toml"):
        ms.build(tmp_path / "c.yaml")


def test_routing_by_name_and_flat_keys() -> None:
    col = DiagnosticCollection(
        {"reconstruction/score": ReconstructionScore(num_components=2), "other/sum": _Sum(with_stderr=True)}
    )
    inputs = _losses(6, components=2)
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
    bad = _losses()
    bad["source_model_loss"] = bad["source_model_loss"][:2]
    return bad


@pytest.mark.parametrize("call", ["update", "forward"])
def test_failed_update_rolls_back_the_whole_collection(call: str) -> None:
    # MetricCollection orders metrics by name: "a/sum" is updated before "b/score" rejects
    for atomic in (True, False):
        col = DiagnosticCollection({"a/sum": _Sum(), "b/score": ReconstructionScore()}, atomic_update=atomic)
        col.update(value=torch.ones(3), **_losses())
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
    inputs = _losses()
    col.update(**inputs)
    metric = col["reconstruction/reconstruction_score"]
    first = col.compute()["reconstruction/reconstruction_score"]
    assert torch.equal(metric.compute(), first)  # Lightning may call each metric's compute
    col.update(**inputs)  # same items again: same ratio, twice the sums
    assert torch.allclose(col.compute()["reconstruction/reconstruction_score"], first, rtol=1e-12)
    assert torch.allclose(metric.loss_sums[0, 0], 2 * inputs["source_model_loss"].double().sum())


def test_mean_and_stderr_match_numpy() -> None:
    import numpy as np

    x = torch.randn(101, dtype=torch.float64)
    mean, stderr = mean_and_stderr(mean_stats(x))
    assert mean.item() == pytest.approx(np.mean(x.numpy()), rel=1e-12)
    assert stderr.item() == pytest.approx(np.std(x.numpy(), ddof=1) / np.sqrt(101), rel=1e-9)
    empty_mean, empty_err = mean_and_stderr(torch.zeros(3, dtype=torch.float64))
    assert torch.isnan(empty_mean) and torch.isnan(empty_err)


def test_nan_strategy() -> None:
    inputs = _losses(4)
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
    metric.update(**_losses())
    metric.half()
    metric.set_dtype(torch.float16)
    assert metric.loss_sums.dtype == torch.float64 and metric.nonfinite_count.dtype == torch.int64
    module = torch.nn.Module()
    module.metric = metric
    module.to(torch.bfloat16)
    assert metric.loss_sums.dtype == torch.float64


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


def _half_way_losses() -> dict[str, torch.Tensor]:
    """Reconstruction losses half way between clean and zero-ablation: score exactly 0.5."""
    clean = torch.tensor([1.0, 2.0, 3.0])
    zero = torch.tensor([3.0, 4.0, 7.0])
    return {
        "source_model_loss": clean,
        "source_model_loss_with_reconstruction": (clean + zero) / 2,
        "source_model_loss_with_zero_ablation": zero,
    }


def test_nonfinite_warning_fires_once_across_forward_calls_until_reset() -> None:
    bad = _half_way_losses()
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


def test_merge_and_load_refuse_other_shapes_and_keep_dtypes() -> None:
    from torchmetrics.aggregation import SumMetric

    two = ReconstructionScore(num_components=2)
    two.update(**_losses(components=2))
    one = ReconstructionScore()
    one.update(**_half_way_losses())
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
    resumed.update(**_half_way_losses())
    assert resumed.compute().item() == 0.5


def test_resumed_or_merged_collection_counts_the_saved_updates() -> None:
    col = ms.suite("reconstruction", changed_tokens=False)
    col.update(**_half_way_losses())
    resumed = ms.suite("reconstruction", changed_tokens=False)
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
    col.update(value=torch.tensor([4.0]), **_half_way_losses())
    del col["a/score"]
    with pytest.raises(TypeError, match="source_model_loss"):
        col.update(**_half_way_losses())  # no metric takes the losses any more
    col.update(value=torch.tensor([2.0]))
    assert col.compute() == {"b/sum/mean": 3.0, "b/sum/nonfinite_count": 0}


def test_forward_keys_are_compute_keys_without_the_running_counts() -> None:
    col = DiagnosticCollection({"a/score": ReconstructionScore(num_components=2), "b/sum": _Sum()})
    batch = col(value=torch.tensor([1.0]), **_losses(components=2))
    assert set(batch) == {k for k in col.compute() if not k.endswith("/nonfinite_count")}


def test_overrides_must_be_a_mapping_or_a_bool() -> None:
    for setting in (None, 0, 768, "no"):
        with pytest.raises(TypeError, match=rf"`next_token` must be a dict.*got {setting!r}"):
            ms.suite("utility", next_token=setting)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="next_token"):
            ms.build({"suites": ["utility"], "metrics": {"next_token": setting}})
    with pytest.raises(ValidationError, match="suites"):
        ms.build({"suites": []})
    assert "utility/next_token" not in ms.suite("utility", next_token=False)


def test_safe_div_promotes_both_sides_to_float64() -> None:
    assert safe_div(torch.tensor(3), 0.5).item() == 6.0
    assert safe_div(torch.tensor(1.0), torch.tensor(1e-50, dtype=torch.float64)).item() == pytest.approx(1e50)
    assert torch.isnan(safe_div(torch.tensor([1.0]), 0.0)).all()


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
