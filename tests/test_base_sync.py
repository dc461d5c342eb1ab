"""Fingerprint of the fused sync, checked without processes: what a metric declares, what its
state_dict carries, and merge/load refusing a metric built with another configuration (issue 12).

The checks between real ranks are in tests/test_distributed.py.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import pytest
import torch

from metrics_suite.base import (
    DiagnosticMetric,
    MetricFingerprint,
    _fingerprint_vector,
    _mismatch_report,
)
from metrics_suite.collection import DiagnosticCollection
from metrics_suite.credit import PerturbationCorrelation
from metrics_suite.reconstruction import ReconstructionScore
from metrics_suite.registry import RegisteredMetric, registered
from metrics_suite.utility import NextTokenDivergence
from tests.helpers import example_batches, make_metric, state_snapshot, states_equal

ENTRIES = registered()


def _ids(entries: list[RegisteredMetric]) -> list[str]:
    return [f"{e.suite}/{e.name}" for e in entries]


def _logits(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(2, 3, 5, generator=g)
    return {"clean_logits": clean, "noisy_logits": clean + 0.3 * torch.randn(2, 3, 5, generator=g)}


def _other(value: Any) -> Any:
    """A value of the same kind as ``value`` (JSON data) that differs from it."""
    if value is None:
        return 7
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    return [*value, value[-1] if value else 0]


def test_compute_with_cache_is_refused() -> None:
    """A cached value lets a rank skip the sync its peers enter: refused, with the reason."""
    with pytest.raises(ValueError, match=r"`compute_with_cache=True` is not supported.*skips the sync"):
        ReconstructionScore(compute_with_cache=True)
    assert ReconstructionScore(compute_with_cache=False).compute_with_cache is False
    assert ReconstructionScore().compute_with_cache is False


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_every_metric_has_a_fingerprint_and_refuses_another_configuration(entry: RegisteredMetric) -> None:
    """Conformance: the fingerprint reads every declared argument; state_dict carries it; loading or
    merging states of a metric with any other fingerprint value raises ValueError naming the
    argument and changes nothing (or the checkpoint itself sets that argument, like a seed)."""
    source = make_metric(entry)
    config = source.fingerprint_config()
    assert set(config) == set(type(source).fingerprint_args())
    assert not {"validate_args", "with_stderr", "check_layout", "nan_strategy"} & set(config)
    for batch in example_batches(entry, [3, 2]):
        source.update(**batch)
    saved = source.state_dict()
    assert json.loads(bytes(saved["fingerprint"].tolist())) == config
    for arg, value in config.items():
        target = make_metric(entry)
        target.update(**example_batches(entry, [2], seed=1)[0])
        setattr(target, arg, _other(json.loads(value)))
        before = state_snapshot(target)
        try:
            target.load_state_dict(saved)
        except ValueError as err:
            assert f"`{arg}`" in str(err), str(err)
            assert states_equal(state_snapshot(target), before), arg
        else:  # only an argument that the checkpoint carries may load, and then it is the saved one
            assert target.fingerprint_config()[arg] == value, arg
            setattr(target, arg, _other(json.loads(value)))
        with pytest.raises(ValueError, match=f"`{arg}`"):
            target.merge_state(source)
        with pytest.raises(ValueError, match=f"`{arg}`"):
            target.merge_state(source.state_dict())


def test_next_token_divergence_with_other_num_logits_is_refused() -> None:
    """The issue's example: same shapes, another definition; nothing changes on refusal."""
    two = NextTokenDivergence(num_logits=2)
    two.update(**_logits())
    default = NextTokenDivergence()
    default.update(**_logits(1))
    before, count = state_snapshot(default), default._update_count
    match = r"NextTokenDivergence: `num_logits` is null here but 2 in the (checkpoint|merged metric)"
    with pytest.raises(ValueError, match=match):
        default.load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match=match):
        default.merge_state(two)
    with pytest.raises(ValueError, match=match):
        default.merge_state(two.state_dict())
    assert states_equal(state_snapshot(default), before)
    assert default._update_count == count


def test_checkpoints_without_fingerprint_and_cast_checkpoints_still_load() -> None:
    source = NextTokenDivergence(num_logits=2)
    source.update(**_logits())
    expected = source.compute()
    old = {k: v for k, v in source.state_dict().items() if k != "fingerprint"}  # an older checkpoint
    resumed = NextTokenDivergence()  # nothing to compare against: accepted as before
    resumed.load_state_dict(old)
    assert states_equal(state_snapshot(resumed), state_snapshot(source))
    buffer = io.BytesIO()
    torch.save({k: v.float() for k, v in source.state_dict().items()}, buffer)  # a cast of every entry
    buffer.seek(0)
    cast = NextTokenDivergence(num_logits=2)
    cast.load_state_dict(torch.load(buffer, weights_only=True))
    # the fingerprint bytes survive the cast exactly; the sums only to float32 precision
    assert all(torch.allclose(cast.compute()[k], v, rtol=1e-6) for k, v in expected.items())
    with pytest.raises(ValueError, match="`num_logits`"):
        buffer.seek(0)
        NextTokenDivergence().load_state_dict(torch.load(buffer, weights_only=True))


def test_perturbation_seed_comes_with_the_checkpoint_but_is_not_merged() -> None:
    """A resume adopts the checkpoint's seed (documented); merging items scored on other
    directions would break sharding invariance, so it is refused."""
    saved = PerturbationCorrelation(seed=1).state_dict()
    resumed = PerturbationCorrelation(seed=0)
    resumed.load_state_dict(saved)
    assert resumed.seed == 1
    with pytest.raises(ValueError, match=r"`seed` is 0 here but 1"):
        PerturbationCorrelation(seed=0).merge_state(PerturbationCorrelation(seed=1))


def test_collection_load_names_the_argument() -> None:
    source = DiagnosticCollection({"utility/next_token": NextTokenDivergence(num_logits=2)})
    source.update(**_logits())
    target = DiagnosticCollection({"utility/next_token": NextTokenDivergence()})
    with pytest.raises(ValueError, match="`num_logits`"):
        target.load_state_dict(source.state_dict())


class _NewMetric(ReconstructionScore):
    """A metric another helper might add: a stored argument and an unstored one."""

    def __init__(self, temperature: float = 1.0, window: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature
        self._window = window


def test_a_new_metric_gets_its_fingerprint_from_its_signature() -> None:
    assert _NewMetric.fingerprint_args() == ("num_components", "reduction", "temperature", "window")
    with pytest.raises(TypeError, match=r"`window` is not stored as `self.window`.*fingerprint_exclude"):
        _NewMetric().fingerprint_config()


def _print(name: str, syncs: int = 0, **config: Any) -> MetricFingerprint:
    return MetricFingerprint(name, "M", "s[3]:float64", syncs, {k: json.dumps(v) for k, v in config.items()})


def test_report_names_every_differing_field_even_when_fields_share_slots() -> None:
    """More fields than slots (200 metrics): the differing field is named on both sides; a
    field that shares its slot may be named too, never a field of an agreeing slot."""
    base = [_print(f"m{i}", a=i, b="x") for i in range(200)]
    changed = list(base)
    changed[150] = _print("m150", a=150, b="y")
    (v0, e0), (v1, e1) = _fingerprint_vector(600, base), _fingerprint_vector(600, changed)
    for rank, entries, value in ((0, e0, '"x"'), (1, e1, '"y"')):
        problems = _mismatch_report([v0, v1], rank, base if rank == 0 else changed, entries)
        assert f"metric 'm150' (M): argument `b` differs (this rank: {value})" in problems
        assert 1 <= len(problems) <= -(-len(entries) // 96)


def test_report_when_ranks_hold_different_metrics() -> None:
    one, two = [_print("a")], [_print("a"), _print("extra")]
    (v1, e1), (v2, e2) = _fingerprint_vector(3, one), _fingerprint_vector(6, two)
    assert "metric 'extra' (M) is missing on other ranks, or differs there" in _mismatch_report(
        [v1, v2], 1, two, e2
    )
    lacking = _mismatch_report([v1, v2], 0, one, e1)
    assert "other ranks hold metrics this rank does not have (or under other names)" in lacking
    assert "metrics per rank: [1, 2]" in lacking
    assert not any("'a'" in p for p in lacking)


def test_single_process_compute_is_unchanged_by_the_new_wrapper() -> None:
    """Without a process group: the value is squeezed and cloned as torchmetrics does, and the
    'called before update' warning still fires on a metric that never updated."""
    metric = ReconstructionScore()
    with pytest.warns(UserWarning, match="called before the ``update`` method"):
        assert torch.isnan(metric.compute())
    metric.update(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]))
    value = metric.compute()
    assert value.shape == () and float(value) == pytest.approx(0.5)
    value += 1  # a clone: the states are untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(metric.compute()) == pytest.approx(0.5)
    assert isinstance(metric, DiagnosticMetric)
