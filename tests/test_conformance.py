"""The conformance kit: invariants of DESIGN.md section 1, checked for every registered metric.

A metric gets these tests by registering a ConformanceExample (see metrics_suite/conformance.py).
Real multi-process checks live in tests/test_distributed.py.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics_suite.registry import RegisteredMetric, registered
from tests.helpers import (
    bad_inputs_and_arguments,
    compare,
    example_batches,
    flat,
    make_metric,
    names_the_argument,
    state_snapshot,
    states_equal,
)

ENTRIES = registered()
SHARDABLE = [e for e in ENTRIES if e.example.shardable]


def _ids(entries: list[RegisteredMetric]) -> list[str]:
    return [f"{e.suite}/{e.name}" for e in entries]


def _one_pass(entry: RegisteredMetric, batches: list[dict], device: torch.device) -> dict[str, float]:
    metric = make_metric(entry, device)
    for batch in batches:
        metric.update(**batch)
    return flat(metric, metric.compute())


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_declared_contract(entry: RegisteredMetric, device: torch.device) -> None:
    """Sum-reduced fixed-size float64/int64 tensor states on the inputs' device; full_state_update False."""
    metric = make_metric(entry, device)
    assert metric.full_state_update is False
    assert metric._reductions, "a metric needs states"
    for name, default in metric._defaults.items():
        assert isinstance(default, torch.Tensor), f"{name} is a list state"
        assert default.dtype in (torch.float64, torch.int64), f"{name} has dtype {default.dtype}"
        assert metric._reductions[name] is not None and metric._reductions[name].__name__ == "dim_zero_sum"
    shapes = {name: t.shape for name, t in metric.state_items()}
    for batch in example_batches(entry, [3, 5, 2], device=device):
        metric.update(**batch)
    assert shapes == {name: t.shape for name, t in metric.state_items()}, "state shapes depend on the data"
    moved = [name for name, t in metric.state_items() if t.device.type != device.type]
    assert not moved, f"states left {device}: {moved}"


@pytest.mark.parametrize("entry", SHARDABLE, ids=_ids(SHARDABLE))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sharding_invariance(entry: RegisteredMetric, device: torch.device, data: st.DataObject) -> None:
    """Any split of the same items into batches gives the same result as one pass."""
    # uneven shards of 0 to 17 items (an empty shard is a no-op for a shardable metric), at least one item
    shard = st.integers(0, 17)
    sizes = data.draw(st.lists(shard, min_size=1, max_size=5).filter(any), label="batch sizes")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    (whole,) = example_batches(entry, [sum(sizes)], seed=seed, device=device)
    one_pass = _one_pass(entry, [whole], device)
    sharded = _one_pass(entry, entry.example.split(whole, sizes), device)
    assert not compare(sharded, one_pass, rtol=entry.example.rtol)


@pytest.mark.parametrize("entry", SHARDABLE, ids=_ids(SHARDABLE))
def test_merge_is_addition(entry: RegisteredMetric, device: torch.device) -> None:
    """Summing the states of metrics fed disjoint parts equals one metric fed everything."""
    batches = example_batches(entry, [4, 3, 5, 2], device=device)
    parts = [make_metric(entry, device) for _ in range(3)]
    for i, batch in enumerate(batches):
        parts[i % 2].update(**batch)  # parts[2] never updates, like an idle rank
    merged = make_metric(entry, device)
    for name, _ in merged.state_items():
        setattr(merged, name, sum(getattr(p, name) for p in parts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not compare(
            flat(merged, merged.compute()), _one_pass(entry, batches, device), rtol=entry.example.rtol
        )


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_state_dict_and_pickle_mid_epoch(entry: RegisteredMetric, device: torch.device) -> None:
    """Saving mid-epoch and resuming gives the uninterrupted result."""
    batches = example_batches(entry, [3, 4, 2], device=device)
    uninterrupted = make_metric(entry, device)
    first = make_metric(entry, device)
    for batch in batches[:2]:
        uninterrupted.update(**batch)
        first.update(**batch)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_metric(entry, device)
    resumed.load_state_dict(torch.load(buffer))
    unpickled = pickle.loads(pickle.dumps(first))
    for metric in (uninterrupted, resumed, unpickled):
        metric.update(**batches[2])
    expected = flat(uninterrupted, uninterrupted.compute())
    assert not compare(flat(resumed, resumed.compute()), expected)
    assert not compare(flat(unpickled, unpickled.compute()), expected)


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_bad_input_raises_and_leaves_state_unchanged(entry: RegisteredMetric, device: torch.device) -> None:
    rejected = bad_inputs_and_arguments(entry, device)
    assert rejected, "register at least one bad input"
    metric = make_metric(entry, device)
    metric.update(**example_batches(entry, [3], device=device)[0])
    before = state_snapshot(metric)
    count = metric.update_count
    for i, (changed, bad) in enumerate(rejected):
        with pytest.raises((ValueError, TypeError)) as info:
            metric.update(**bad)
        assert names_the_argument(str(info.value), changed, metric.update, bad), (
            f"bad input {i}: the message should name `{'`/`'.join(sorted(changed))}`: {info.value}"
        )
        assert states_equal(state_snapshot(metric), before), f"bad input {i} changed the state"
    # the metric still works after the rejected updates, which counted as no update
    metric.update(**example_batches(entry, [2], seed=5, device=device)[0])
    assert metric.update_count == count + 1


def _requiring_grad(batch: dict) -> dict:
    """``batch`` with every float tensor a leaf that requires grad (as activations in training do)."""
    return {
        k: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in batch.items()
    }


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_rejected_forward_keeps_state_and_later_results(
    entry: RegisteredMetric, device: torch.device
) -> None:
    """forward() with bad input raises, leaves the state bit-identical, and the next forward()/update()
    and compute() give what they give without the bad call; no state ever requires grad."""
    b1, b2, b3 = example_batches(entry, [3, 4, 2], seed=5, device=device)
    reference = make_metric(entry, device)
    reference.update(**b1)
    expected_batch = flat(reference, reference(**b2))
    reference.update(**b3)
    expected = flat(reference, reference.compute())

    metric = make_metric(entry, device)
    metric.update(**b1)
    before = state_snapshot(metric)
    for i, (changed, bad) in enumerate(bad_inputs_and_arguments(entry, device)):
        with pytest.raises((ValueError, TypeError)) as info:
            metric(**bad)
        assert names_the_argument(str(info.value), changed, metric.update, bad), (
            f"bad input {i}: {info.value}"
        )
        assert states_equal(state_snapshot(metric), before), f"bad input {i} changed the state"
    assert not compare(flat(metric, metric(**_requiring_grad(b2))), expected_batch, rtol=entry.example.rtol)
    metric.update(**_requiring_grad(b3))
    assert not compare(flat(metric, metric.compute()), expected, rtol=entry.example.rtol)
    assert metric.update_count == 3
    assert not [name for name, t in metric.state_items() if t.requires_grad]


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_merge_and_load_check_shapes_and_keep_dtypes(entry: RegisteredMetric, device: torch.device) -> None:
    """A state of another shape is refused (naming the state and both shapes, nothing changed); a
    float32 checkpoint is loaded into the declared float64/int64 states."""
    metric = make_metric(entry, device)
    metric.update(**example_batches(entry, [3], device=device)[0])
    before = state_snapshot(metric)
    name, state = metric.state_items()[-1]
    wrong = {**before, name: torch.zeros((*state.shape, 2), dtype=state.dtype)}
    shapes = rf"\[{', '.join(map(str, state.shape))}\].*\[{', '.join(map(str, (*state.shape, 2)))}\]"
    with pytest.raises(ValueError, match=rf"`{name}`.*{shapes}"):
        metric.merge_state(wrong)
    with pytest.raises(ValueError, match=rf"`{name}`.*{shapes}"):
        metric.load_state_dict(wrong, strict=False)
    assert states_equal(state_snapshot(metric), before)

    resumed = make_metric(entry, device)
    resumed.load_state_dict({k: v.float() for k, v in before.items()}, strict=False)
    assert {k: t.dtype for k, t in resumed.state_items()} == {k: t.dtype for k, t in before.items()}
    merged = make_metric(entry, device)
    merged.merge_state({k: v.float() for k, v in before.items()})
    assert {k: t.dtype for k, t in merged.state_items()} == {k: t.dtype for k, t in before.items()}


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_forward_returns_batch_value_and_accumulates(entry: RegisteredMetric, device: torch.device) -> None:
    b1, b2 = example_batches(entry, [3, 4], device=device)
    metric = make_metric(entry, device)
    batch_value = metric(**b1)
    fresh = make_metric(entry, device)
    fresh.update(**b1)
    assert not compare(flat(metric, batch_value), flat(fresh, fresh.compute()))
    metric(**b2)
    assert not compare(
        flat(metric, metric.compute()), _one_pass(entry, [b1, b2], device), rtol=entry.example.rtol
    )


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_no_data_gives_nan_not_an_error(entry: RegisteredMetric, device: torch.device) -> None:
    metric = make_metric(entry, device)
    with pytest.warns(UserWarning, match="before the ``update``"):
        value = flat(metric, metric.compute())
    assert value, "compute() returned nothing"
    assert all(math.isnan(v) for v in value.values()), f"expected NaN for no data: {value}"


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_reset_returns_to_empty(entry: RegisteredMetric, device: torch.device) -> None:
    metric = make_metric(entry, device)
    empty = state_snapshot(metric)
    metric.update(**example_batches(entry, [3], device=device)[0])
    metric.reset()
    assert states_equal(state_snapshot(metric), empty)


def _float_batch_keys(entry: RegisteredMetric, batch: dict) -> list[str]:
    keys = entry.example.batch_keys or tuple(batch)
    return [k for k in keys if isinstance(batch[k], torch.Tensor) and batch[k].is_floating_point()]


FLOAT_INPUT = [e for e in ENTRIES if _float_batch_keys(e, example_batches(e, [2])[0])]


@pytest.mark.parametrize("entry", FLOAT_INPUT, ids=_ids(FLOAT_INPUT))
def test_nan_strategy_on_every_metric(entry: RegisteredMetric, device: torch.device) -> None:
    """skip: counted, result stays finite where the clean result is; error: raises, state kept;
    propagate: the NaN reaches the result."""
    (batch,) = example_batches(entry, [4], seed=3, device=device)
    key = _float_batch_keys(entry, batch)[0]
    poisoned = dict(batch)
    poisoned[key] = batch[key].clone()
    poisoned[key].view(-1)[0] = float("nan")

    clean = make_metric(entry, device)
    clean.update(**batch)
    clean_value = flat(clean, clean.compute())

    skip = make_metric(entry, device)
    skip.update(**poisoned)
    assert int(skip.nonfinite_count) >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipped_value = flat(skip, skip.compute())
    for k, v in clean_value.items():
        assert math.isnan(v) or not math.isnan(skipped_value[k]), f"{k} became NaN under nan_strategy='skip'"

    error = make_metric(entry, device, nan_strategy="error")
    error.update(**batch)
    before = state_snapshot(error)
    with pytest.raises(ValueError, match="NaN"):
        error.update(**poisoned)
    assert states_equal(state_snapshot(error), before)

    propagate = make_metric(entry, device, nan_strategy="propagate")
    propagate.update(**poisoned)
    assert int(propagate.nonfinite_count) == 0
    propagated = flat(propagate, propagate.compute())
    assert any(math.isnan(v) for v in propagated.values()), f"the NaN did not reach the result: {propagated}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("entry", FLOAT_INPUT, ids=_ids(FLOAT_INPUT))
def test_half_precision_inputs(entry: RegisteredMetric, device: torch.device, dtype: torch.dtype) -> None:
    """Half inputs give the float32 result of the same (rounded) values."""
    (batch,) = example_batches(entry, [5], seed=4, device=device)
    keys = _float_batch_keys(entry, batch)
    half = {k: (v.to(dtype) if k in keys else v) for k, v in batch.items()}
    upcast = {k: (v.float() if k in keys else v) for k, v in half.items()}
    a, b = make_metric(entry, device), make_metric(entry, device)
    a.update(**half)
    b.update(**upcast)
    assert not compare(flat(a, a.compute()), flat(b, b.compute()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", SHARDABLE, ids=_ids(SHARDABLE))
def test_empty_batch_is_a_no_op(entry: RegisteredMetric, device: torch.device) -> None:
    """A batch with zero items (e.g. the tail of a sharded loader) adds nothing and does not raise."""
    metric = make_metric(entry, device)
    metric.update(**example_batches(entry, [3], device=device)[0])
    before = state_snapshot(metric)
    (empty,) = example_batches(entry, [0], device=device)
    metric.update(**empty)
    assert states_equal(state_snapshot(metric), before)


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_copies_sent_through_torch_multiprocessing_do_not_share_states(
    entry: RegisteredMetric, device: torch.device
) -> None:
    """ddp_spawn pickles the module with torch's ForkingPickler, which puts tensors in shared memory:
    two ranks must not accumulate into the same state tensors."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions)

    metric = make_metric(entry, device)
    before = state_snapshot(metric)
    copy = pickle.loads(ForkingPickler.dumps(metric))
    copy.update(**example_batches(entry, [3], device=device)[0])
    assert states_equal(state_snapshot(metric), before)


def _to_meta(value: object) -> object:
    """``value`` with every tensor (also inside a dict or a module) moved to the meta device."""
    if isinstance(value, torch.Tensor | torch.nn.Module):
        return value.to("meta")
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_input_on_another_device_raises_and_leaves_state_unchanged(entry: RegisteredMetric) -> None:
    """Every metric: an input off the states' device is a ValueError naming it and both devices."""
    metric = make_metric(entry)
    metric.update(**example_batches(entry, [3])[0])
    before = state_snapshot(metric)
    batch = example_batches(entry, [2], seed=2)[0]
    tensor_keys = [k for k, v in batch.items() if _to_meta(v) is not v]
    assert tensor_keys
    for key in tensor_keys:
        moved = dict(batch, **{key: _to_meta(batch[key])})
        with pytest.raises(ValueError, match=rf"`{key}(\[[^]]+\])?` is on device meta, .* on cpu"):
            metric.update(**moved)
        assert states_equal(state_snapshot(metric), before), f"`{key}` on meta changed the state"
    metric.update(**batch)  # the metric still works, and the rejected updates counted as none
    assert metric.update_count == 2


class _PoisonedOutput:
    """A callable input whose output is NaN for the first item (row 0), as a broken loss would be."""

    def __init__(self, fn: object) -> None:
        self.fn = fn

    def __call__(self, *args: object) -> torch.Tensor:
        out = self.fn(*args).clone()  # type: ignore[operator]
        out.view(-1)[0] = float("nan")
        return out


def _poison_cases() -> list[tuple[RegisteredMetric, str]]:
    cases = []
    for entry in ENTRIES:
        batch = example_batches(entry, [2])[0]
        for key, value in batch.items():
            floating = isinstance(value, torch.Tensor) and value.is_floating_point()
            if floating or (callable(value) and not isinstance(value, torch.Tensor)):
                cases.append((entry, key))
    return cases


POISON_CASES = _poison_cases()


@pytest.mark.parametrize(
    ("entry", "key"), POISON_CASES, ids=[f"{e.suite}/{e.name}-{k}" for e, k in POISON_CASES]
)
def test_nan_in_every_float_input_and_callable_output_is_seen(entry: RegisteredMetric, key: str) -> None:
    """Each float input, and each callable's output, poisoned in turn: skip counts it, error names it."""
    (batch,) = example_batches(entry, [4], seed=3)
    value = batch[key]
    if isinstance(value, torch.Tensor):
        value = value.clone()
        value.view(-1)[0] = float("nan")
    else:
        value = _PoisonedOutput(value)
    poisoned = dict(batch, **{key: value})
    skip = make_metric(entry)
    skip.update(**poisoned)
    assert int(skip.nonfinite_count) >= 1, f"NaN in `{key}` went unnoticed"
    error = make_metric(entry, nan_strategy="error")
    with pytest.raises(ValueError, match=rf"`[^`]*{key}"):
        error.update(**poisoned)
    assert int(error.nonfinite_count) == 0 and error.update_count == 0


# What one item of each metric's standard errors is: a dim-0 row of the example batch, or one token
# (a ``[b, t]`` position of every batch tensor). Every ``*_stderr`` output must be listed here.
STDERR_ITEMS: dict[str, dict[str, str]] = {
    "reconstruction_score": {"": "row"},
    "changed_tokens": {"sequence_mean": "row", "token_rate": "token"},
    "activations": {"mse": "token", "cosine_similarity": "token"},
    "feature_sparsity": {"l0": "row", "l1": "row"},  # [n, C, F]: a row holds one vector per component
    "downstream": {s: "token" for s in ("kl_spliced", "kl_ablated", "ce_clean", "ce_spliced", "ce_ablated")},
    "next_token": {  # divergences per sequence (the default reduction); top-1 agreement over tokens
        **{s: "row" for s in ("kl_clean_noisy", "kl_noisy_clean", "jeffreys", "jensen_shannon")},
        **{s: "row" for s in ("total_variation", "squared_hellinger")},
        "top1_agreement": "token",
    },
    "cross_entropy": {"cross_entropy": "token"},
    "noise": {
        f"{kind}_{stat}": "token"
        for kind in ("mean", "noise")
        for stat in ("cosine_similarity", "domination_percent", "domination_ratio")
    }
    | {s: "token" for s in ("input_norm", "mean_norm", "mean_shifted_noise_norm", "unshifted_noise_norm")},
    "cosine": {"": "row"},
    "nudging": {"delta": "row", "improved_fraction": "row"},
    "bridge_residual": {"": "row"},
}
# constructor arguments a metric needs for ``with_stderr=True``; and the metrics with a per-token
# reduction, whose standard errors are then all over tokens
STDERR_KWARGS = {"reconstruction_score": {"reduction": "itemwise_mean"}}
TOKEN_REDUCTION = {"next_token": {"reduction": "token"}}


def _items(entry: RegisteredMetric, batch: dict, kind: str) -> list[dict]:
    """``batch`` split into its rows, or into its single tokens (``[1, 1, ...]`` slices)."""
    keys = entry.example.batch_keys or [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
    rows = len(batch[keys[0]])
    if kind == "row":
        return entry.example.split(batch, [1] * rows)
    tokens = batch[keys[0]].shape[1]
    return [
        dict(batch, **{k: batch[k][b : b + 1, t : t + 1] for k in keys})
        for b in range(rows)
        for t in range(tokens)
    ]


def _value_key(stderr_key: str) -> str:
    """The flat key of the mean whose standard error ``stderr_key`` is (``delta_stderr/layer_0`` ->
    ``delta/layer_0``, ``stderr/component_1`` -> ``component_1``, ``stderr`` -> ``""``)."""
    key = stderr_key.replace("_stderr", "")
    return "" if key == "stderr" else key.removeprefix("stderr/")


def _stat(value_key: str) -> str:
    """The statistic of a flat key without its per-layer/per-component part (``delta/layer_0`` -> ``delta``)."""
    return "/".join(p for p in value_key.split("/") if not re.fullmatch(r"(layer|component)_\d+", p))


STDERR_CASES = [
    (entry, kwargs)
    for entry in ENTRIES
    if entry.name in STDERR_ITEMS
    for kwargs in (
        STDERR_KWARGS.get(entry.name, {}),
        *([TOKEN_REDUCTION[entry.name]] if entry.name in TOKEN_REDUCTION else []),
    )
]


def test_every_metric_with_a_standard_error_is_in_the_stderr_table() -> None:
    for entry in ENTRIES:
        try:
            make_metric(entry, with_stderr=True, **STDERR_KWARGS.get(entry.name, {}))
        except ValueError:
            assert entry.name not in STDERR_ITEMS, entry.name
        else:
            assert entry.name in STDERR_ITEMS, f"add {entry.name} to STDERR_ITEMS"


@pytest.mark.parametrize(
    ("entry", "kwargs"),
    STDERR_CASES,
    ids=[f"{e.name}-{'-'.join(map(str, k.values()))}" for e, k in STDERR_CASES],
)
def test_every_stderr_equals_scipy_sem_of_items_measured_one_by_one(
    entry: RegisteredMetric, kwargs: dict
) -> None:
    """Each ``*_stderr`` output against scipy.stats.sem of its items (rows or tokens) measured one at
    a time (items without a value, e.g. fully masked, are NaN there and left out)."""
    import numpy as np
    import scipy.stats

    (batch,) = example_batches(entry, [9], seed=11)
    metric = make_metric(entry, with_stderr=True, **kwargs)
    metric.update(**batch)
    out = flat(metric, metric.compute())
    stderr_keys = [k for k in out if "stderr" in k]
    item_kind = STDERR_ITEMS[entry.name]
    token_reduction = kwargs == TOKEN_REDUCTION.get(entry.name)
    stats = {k: _stat(_value_key(k)) for k in stderr_keys}
    assert set(stats.values()) == set(item_kind), sorted(out)
    singles: dict[str, list[dict[str, float]]] = {}
    for key in stderr_keys:
        kind = "token" if token_reduction else item_kind[stats[key]]
        if kind not in singles:
            singles[kind] = []
            for item in _items(entry, batch, kind):
                single = make_metric(entry, **STDERR_KWARGS.get(entry.name, {}))
                single.update(**item)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    singles[kind].append(flat(single, single.compute()))
        values = np.array([s[_value_key(key)] for s in singles[kind]])
        finite = values[~np.isnan(values)]
        if not len(finite) and math.isnan(out[key]):
            continue  # a layer no item reached
        assert len(finite) > 2, key
        assert out[key] == pytest.approx(scipy.stats.sem(finite), rel=1e-9), key


def _layer_key(key: str) -> tuple[str, int] | None:
    """``("delta", 2)`` for the flat key ``delta/layer_2`` (``("", 2)`` for ``layer_2``), else None."""
    match = re.fullmatch(r"(?:(.*)/)?layer_(\d+)", key)
    return (match.group(1) or "", int(match.group(2))) if match else None


LAYERED = [
    e
    for e in ENTRIES
    if "layer" in example_batches(e, [1])[0] and e.example.init_kwargs.get("num_layers", 1) > 1
]


@pytest.mark.parametrize("entry", LAYERED, ids=_ids(LAYERED))
def test_each_batch_lands_on_its_layer(entry: RegisteredMetric, device: torch.device) -> None:
    """Batches sent to different layers of one metric: layer ℓ holds what a one-layer metric fed only
    the batches of ℓ gives; a layer no batch reached is NaN."""
    num_layers = entry.example.init_kwargs["num_layers"]
    batches = example_batches(entry, [4, 3, 5, 2], seed=7, device=device)
    layers = [1, 0, 1, 0]  # layers 2 and above get no batch
    metric = make_metric(entry, device)
    for batch, layer in zip(batches, layers):
        metric.update(**dict(batch, layer=layer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flat(metric, metric.compute())
    by_layer = {_layer_key(key): v for key, v in out.items()}
    assert None not in by_layer, f"a key without a layer: {sorted(out)}"
    for layer in range(num_layers):
        single = make_metric(entry, device, num_layers=1)
        for batch in (b for b, to in zip(batches, layers) if to == layer):
            single.update(**dict(batch, layer=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = flat(single, single.compute())
        got = {stat: v for (stat, to), v in by_layer.items() if to == layer}
        assert got.keys() == expected.keys(), sorted(out)
        assert not compare(got, expected, rtol=entry.example.rtol), f"layer {layer}"
