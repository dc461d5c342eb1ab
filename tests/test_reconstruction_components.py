"""Several components (SAEs, hook points) in one ActivationReconstruction / FeatureSparsity.

Per-component values against numpy formulas, ``[..., C, D]`` inputs against per-component updates
(``component_idx``), sharding and order invariance, real gloo DDP on 2 and 3 ranks, checkpoints, and
bad input leaving the states unchanged.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import metrics_suite as ms
from metrics_suite import ActivationReconstruction, FeatureSparsity
from metrics_suite.testing import run_distributed

ACTIVATION_KEYS = (
    "mse",
    "normalized_mse",
    "explained_variance",
    "cosine_similarity",
    "l2_norm_in",
    "l2_norm_out",
    "l2_ratio",
    "relative_reconstruction_bias",
)
THRESHOLDS = (0.0, 0.01, 0.1)


def _states(metric: ms.DiagnosticMetric) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in metric.state_items()}


def _assert_rejected(metric: ms.DiagnosticMetric, error: type[Exception], match: str, **inputs: Any) -> None:
    """``update(**inputs)`` raises ``error`` matching ``match`` and leaves every state unchanged."""
    before, count = _states(metric), metric.update_count
    with pytest.raises(error, match=match):
        metric.update(**inputs)
    after = _states(metric)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert metric.update_count == count


def _assert_outputs_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=0, equal_nan=True, msg=key)


# ---------------------------------------------------------------------------------- data
def _activation_data(seed: int, n: int = 40, c: int = 3, d: int = 6) -> dict[str, torch.Tensor]:
    """[n, 2, C, D] signed targets whose offset, spread and reconstruction noise differ per component,
    a mask that varies per vector, one zero target vector and one zero reconstruction."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.linspace(-2.0, 3.0, c)[:, None]
    spread = torch.linspace(0.5, 2.0, c)[:, None]
    target = torch.randn(n, 2, c, d, generator=g, dtype=torch.float64) * spread + offset
    noise = torch.linspace(0.1, 1.2, c)[:, None]
    reconstruction = target * torch.linspace(0.7, 1.1, c)[:, None] + noise * torch.randn(
        n, 2, c, d, generator=g, dtype=torch.float64
    )
    target[0, 0, 0] = 0.0  # left out of l2_ratio only
    reconstruction[1, 1, c - 1] = 0.0  # left out of cosine_similarity only
    mask = torch.rand(n, 2, c, generator=g) < 0.75
    mask[:2] = True
    return {"reconstruction": reconstruction, "target": target, "mask": mask}


def _sparsity_data(seed: int, n: int = 60, c: int = 2, f: int = 10) -> dict[str, torch.Tensor]:
    """[n, C, F] signed activations; feature f of component c fires with probability (0.7, 0.35)[c]**f."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.7, 0.35, c)[:, None] ** torch.arange(float(f))
    rates[:, -1] = 0.0
    fires = torch.rand(n, c, f, generator=g) < rates
    values = torch.randn(n, c, f, generator=g, dtype=torch.float64) * 2.0
    acts = torch.where(fires, values, 0.0)
    mask = torch.rand(n, c, generator=g) < 0.8
    return {"feature_activations": acts, "mask": mask}


# ---------------------------------------------------------------------------------- numpy references
def _activation_numpy(rec: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """The eight statistics over the rows of [n, D] float64 arrays, straight from their definitions."""
    sq_err = ((rec - target) ** 2).sum(1)
    norm_in, norm_out = np.linalg.norm(target, axis=1), np.linalg.norm(rec, axis=1)
    dot = (rec * target).sum(1)
    has_cos = (norm_in > 0) & (norm_out > 0)
    has_ratio = norm_in > 0
    return {
        "mse": float(((rec - target) ** 2).mean(1).mean()),
        "normalized_mse": float(sq_err.sum() / (target**2).sum()),
        "explained_variance": float(1 - sq_err.sum() / ((target - target.mean(0)) ** 2).sum()),
        "cosine_similarity": float((dot[has_cos] / (norm_in * norm_out)[has_cos]).mean()),
        "l2_norm_in": float(norm_in.mean()),
        "l2_norm_out": float(norm_out.mean()),
        "l2_ratio": float((norm_out[has_ratio] / norm_in[has_ratio]).mean()),
        "relative_reconstruction_bias": float((norm_out**2).sum() / dot.sum()),
    }


def _sparsity_numpy(acts: np.ndarray, threshold: float, edges: np.ndarray) -> dict[str, Any]:
    """l0, l1, dead fractions, density histogram and firing frequency of the rows of [n, F]."""
    fires = np.abs(acts) > threshold
    freq = fires.mean(0)
    counts, _ = np.histogram(np.log10(freq[freq > 0]), bins=edges)
    out: dict[str, Any] = {"l0": fires.sum(1).mean(), "l1": np.abs(acts).sum(1).mean()}
    for t in THRESHOLDS:
        out[f"dead_fraction@{t:g}"] = (freq <= t).mean()
    out["density_histogram"] = np.concatenate([[np.sum(freq == 0)], counts])
    out["frequency"] = freq
    return out


# ---------------------------------------------------------------------------------- values per component
def test_activations_per_component_vs_numpy() -> None:
    data = _activation_data(seed=1)
    metric = ActivationReconstruction(num_features=6, num_components=3, with_stderr=True)
    metric.update(**data)
    out = metric.compute()
    rec, target, mask = (data[k].numpy() for k in ("reconstruction", "target", "mask"))
    for c in range(3):
        want = _activation_numpy(rec[:, :, c][mask[:, :, c]], target[:, :, c][mask[:, :, c]])
        for key in ACTIVATION_KEYS:
            assert out[key].shape == (3,), key
            assert out[key][c].item() == pytest.approx(want[key], rel=1e-10), (key, c)
        per_vector = ((rec[:, :, c] - target[:, :, c]) ** 2).mean(-1)[mask[:, :, c]]
        assert out["mse_stderr"][c].item() == pytest.approx(
            per_vector.std(ddof=1) / math.sqrt(per_vector.size)
        )
    # the components differ, so a value taken from the wrong component cannot pass
    for key in ACTIVATION_KEYS:
        assert len({round(v, 6) for v in out[key].tolist()}) == 3, key
    # also equal to one single-component metric per component
    for c in range(3):
        single = ActivationReconstruction(num_features=6)
        single.update(data["reconstruction"][:, :, c], data["target"][:, :, c], data["mask"][:, :, c])
        for key, value in single.compute().items():
            assert out[key][c].item() == pytest.approx(value.item(), rel=1e-12), (key, c)


@pytest.mark.parametrize("firing_threshold", [0.0, 0.5])
def test_sparsity_per_component_vs_numpy(firing_threshold: float) -> None:
    data = _sparsity_data(seed=2)
    metric = FeatureSparsity(
        num_features=10, dead_thresholds=THRESHOLDS, firing_threshold=firing_threshold, num_components=2
    )
    half = 30
    metric.update(data["feature_activations"][:half], data["mask"][:half])
    metric.update(data["feature_activations"][half:], data["mask"][half:])
    out = metric.compute()
    acts, mask = data["feature_activations"].numpy(), data["mask"].numpy()
    edges = np.array(metric.density_edges_log10)
    frequency = metric.firing_frequency()
    assert out["density_histogram"].shape == (2, 9)
    assert frequency.shape == (2, 10)
    for c in range(2):
        want = _sparsity_numpy(acts[:, c][mask[:, c]], firing_threshold, edges)
        for key in ("l0", "l1", *(f"dead_fraction@{t:g}" for t in THRESHOLDS)):
            assert out[key][c].item() == pytest.approx(want[key], rel=1e-12), (key, c)
        np.testing.assert_array_equal(out["density_histogram"][c].numpy(), want["density_histogram"])
        np.testing.assert_allclose(frequency[c].numpy(), want["frequency"], rtol=1e-12)
    assert out["l0"][0] > out["l0"][1]  # component 0 fires more: a swap of components would show
    assert not torch.equal(out["density_histogram"][0], out["density_histogram"][1])


def test_component_never_updated_is_nan_others_are_not() -> None:
    data = _sparsity_data(seed=3, c=3)
    sparsity = FeatureSparsity(num_features=10, num_components=3)
    sparsity.update(data["feature_activations"][:, 1], component_idx=1)
    out = sparsity.compute()
    for key, value in out.items():
        assert torch.isnan(value[0]).all() and torch.isnan(value[2]).all(), key
        assert not torch.isnan(value[1]).any(), key
    act = _activation_data(seed=3)
    activations = ActivationReconstruction(num_features=6, num_components=3)
    activations.update(act["reconstruction"][:, :, 2], act["target"][:, :, 2], component_idx=2)
    for key, value in activations.compute().items():
        assert value[:2].isnan().all() and not value[2].isnan(), key


# ---------------------------------------------------------------------------------- input layouts
def test_all_at_once_equals_per_component_updates() -> None:
    act = _activation_data(seed=4)
    together = ActivationReconstruction(num_features=6, num_components=3)
    together.update(**act)
    separate = ActivationReconstruction(num_features=6, num_components=3)
    # an int, a numpy int and a 0-d integer tensor name the component
    for c, index in zip(range(3), (0, np.int64(1), torch.tensor(2))):
        separate.update(
            act["reconstruction"][:, :, c], act["target"][:, :, c], act["mask"][:, :, c], component_idx=index
        )
    _assert_outputs_close(separate.compute(), together.compute(), rtol=1e-12)

    sparse = _sparsity_data(seed=4, c=3)
    together_s = FeatureSparsity(num_features=10, num_components=3)
    together_s.update(**sparse)
    separate_s = FeatureSparsity(num_features=10, num_components=3)
    for c in (2, 0, 1):  # any order
        separate_s.update(sparse["feature_activations"][:, c], sparse["mask"][:, c], component_idx=c)
    _assert_outputs_close(separate_s.compute(), together_s.compute(), rtol=1e-12)
    assert torch.equal(separate_s.firing_counts, together_s.firing_counts)  # integer counts: exact


def test_mask_without_the_component_dim_selects_the_same_vectors_in_every_component() -> None:
    act = _activation_data(seed=5)
    shared = act["mask"][..., 0]  # [n, 2]
    a = ActivationReconstruction(num_features=6, num_components=3)
    a.update(act["reconstruction"], act["target"], shared)
    b = ActivationReconstruction(num_features=6, num_components=3)
    b.update(act["reconstruction"], act["target"], shared[..., None].expand(-1, -1, 3))
    _assert_outputs_close(a.compute(), b.compute(), rtol=0)
    sparse = _sparsity_data(seed=5)
    row_mask = sparse["mask"][:, 0].long()  # an int 0/1 mask is accepted too
    s = FeatureSparsity(num_features=10, num_components=2)
    s.update(sparse["feature_activations"], row_mask)
    want = _sparsity_numpy(
        sparse["feature_activations"][:, 1][row_mask.bool()].numpy(), 0.0, np.arange(-8, 1)
    )
    assert s.compute()["l1"][1].item() == pytest.approx(want["l1"], rel=1e-12)


def test_one_component_keeps_the_layout_and_accepts_component_idx_zero() -> None:
    """C == 1: the states of a metric without components (old checkpoints load), scalar outputs."""
    activations = ActivationReconstruction(num_features=5)
    assert {n: tuple(t.shape) for n, t in activations.state_items()} == {
        "nonfinite_count": (),
        "mse_stats": (3,),
        "cosine_stats": (3,),
        "norm_sums": (2,),
        "target_sum": (5,),
        "l2_stats": (3, 3),
        "bias_sums": (2,),
    }
    sparsity = FeatureSparsity(num_features=7)
    assert {n: tuple(t.shape) for n, t in sparsity.state_items()} == {
        "nonfinite_count": (),
        "firing_counts": (7,),
        "vector_count": (),
        "l0_stats": (3,),
        "l1_stats": (3,),
    }
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    plain, indexed = ActivationReconstruction(num_features=5), ActivationReconstruction(num_features=5)
    plain.update(x * 0.9, x)
    indexed.update(x * 0.9, x, component_idx=0)
    _assert_outputs_close(indexed.compute(), plain.compute(), rtol=0)
    assert plain.compute()["mse"].ndim == 0
    _assert_rejected(
        indexed,
        ValueError,
        r"`component_idx` values must be in \[0, 1\)",
        reconstruction=x,
        target=x,
        component_idx=1,
    )


# ---------------------------------------------------------------------------------- sharding, order, NaN
def _activation_pass(batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    metric = ActivationReconstruction(num_features=6, num_components=3)
    for batch in batches:
        metric.update(**batch)
    return metric.compute()


def _per_component(batch: dict[str, torch.Tensor], c: int) -> dict[str, Any]:
    return {
        "reconstruction": batch["reconstruction"][:, :, c],
        "target": batch["target"][:, :, c],
        "mask": batch["mask"][:, :, c],
        "component_idx": c,
    }


@pytest.mark.parametrize("seed", range(6))
def test_sharding_and_order_invariance(seed: int) -> None:
    """Any split into batches, in any order, each fed all at once or one component at a time."""
    rng = random.Random(seed)
    data = _activation_data(seed=10 + seed, n=37)
    whole = _activation_pass([data])
    cuts = sorted(rng.sample(range(1, 37), 4))
    parts = [{k: v[a:b] for k, v in data.items()} for a, b in zip([0, *cuts], [*cuts, 37])]
    batches: list[dict[str, Any]] = []
    for part in parts:
        batches += [part] if rng.random() < 0.5 else [_per_component(part, c) for c in range(3)]
    rng.shuffle(batches)
    _assert_outputs_close(_activation_pass(batches), whole, rtol=1e-9)

    sparse = _sparsity_data(seed=10 + seed, c=3)
    sparse_whole = FeatureSparsity(num_features=10, num_components=3)
    sparse_whole.update(**sparse)
    sharded = FeatureSparsity(num_features=10, num_components=3)
    order = list(range(0, 60, 7))
    rng.shuffle(order)
    for start in order:
        part = {k: v[start : start + 7] for k, v in sparse.items()}
        sharded.update(**part)
    _assert_outputs_close(sharded.compute(), sparse_whole.compute(), rtol=1e-9)


def test_nonfinite_vector_skips_that_vector_of_that_component_only() -> None:
    data = _activation_data(seed=6)
    poisoned = {k: v.clone() for k, v in data.items()}
    poisoned["target"][3, 1, 1, 2] = math.nan
    poisoned["mask"][3, 1] = True
    metric = ActivationReconstruction(num_features=6, num_components=3)
    with pytest.warns(UserWarning, match="skipped 1 item"):
        metric.update(**poisoned)
        out = metric.compute()
    assert int(metric.nonfinite_count) == 1
    reference_mask = poisoned["mask"].clone()
    reference_mask[3, 1, 1] = False
    want = _activation_pass([{**data, "mask": reference_mask}])
    _assert_outputs_close(out, want, rtol=1e-12)
    sparsity = FeatureSparsity(num_features=10, num_components=2, nan_strategy="error")
    acts = _sparsity_data(seed=6)["feature_activations"].clone()
    acts[0, 1, 0] = math.inf
    _assert_rejected(sparsity, ValueError, "`feature_activations` holds NaN", feature_activations=acts)


# ---------------------------------------------------------------------------------- collection, checkpoint
def test_collection_flattens_per_component_keys() -> None:
    col = ms.suite(
        "reconstruction",
        reconstruction_score=False,
        changed_tokens=False,
        downstream=False,
        activations={"num_features": 6, "num_components": 3},
        feature_sparsity={"num_features": 10, "num_components": 2, "dead_thresholds": THRESHOLDS},
    )
    act, sparse = _activation_data(seed=7), _sparsity_data(seed=7)
    col["reconstruction/activations"].update(**act)
    col["reconstruction/feature_sparsity"].update(**sparse)
    out = col.compute()
    activations = _activation_pass([act])
    for key in ACTIVATION_KEYS:
        for c in range(3):
            assert out[f"reconstruction/activations/{key}/component_{c}"].item() == pytest.approx(
                activations[key][c].item(), rel=1e-12
            )
    sparsity = FeatureSparsity(num_features=10, num_components=2, dead_thresholds=THRESHOLDS)
    sparsity.update(**sparse)
    want = sparsity.compute()
    for c in range(2):
        assert out[
            f"reconstruction/feature_sparsity/dead_fraction@0.01/component_{c}"
        ].item() == pytest.approx(want["dead_fraction@0.01"][c].item())
        bins = [
            out[f"reconstruction/feature_sparsity/density_histogram/component_{c}/bin_{i}"].item()
            for i in range(9)
        ]
        assert bins == want["density_histogram"][c].tolist()
    assert all(v.ndim == 0 for v in out.values())
    assert len([k for k in out if k.startswith("reconstruction/feature_sparsity/density_histogram/")]) == 18


def test_state_dict_round_trip_and_mismatched_components() -> None:
    first, second = _activation_data(seed=8), _activation_data(seed=9)
    saved = ActivationReconstruction(num_features=6, num_components=3)
    saved.update(**first)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    resumed = ActivationReconstruction(num_features=6, num_components=3)
    resumed.load_state_dict(state)
    resumed.update(**second)
    _assert_outputs_close(resumed.compute(), _activation_pass([first, second]), rtol=1e-12)
    with pytest.raises(ValueError, match="must have shape"):
        ActivationReconstruction(num_features=6, num_components=2).load_state_dict(state)

    sparse = _sparsity_data(seed=8)
    s = FeatureSparsity(num_features=10, num_components=2)
    s.update(**sparse)
    restored = FeatureSparsity(num_features=10, num_components=2)
    restored.load_state_dict(s.state_dict())
    _assert_outputs_close(restored.compute(), s.compute(), rtol=0)
    with pytest.raises(ValueError, match="firing_threshold"):
        FeatureSparsity(num_features=10, num_components=2, firing_threshold=0.5).load_state_dict(
            s.state_dict()
        )


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("validate_args", [True, False])
def test_bad_component_input_raises_and_leaves_state_unchanged(validate_args: bool) -> None:
    data = _activation_data(seed=11)
    metric = ActivationReconstruction(num_features=6, num_components=3, validate_args=validate_args)
    metric.update(**data)
    one = _per_component(data, 0)
    rec, target = one["reconstruction"], one["target"]
    # checked even with validate_args=False: a wrong index or layout would silently mix components
    for index, error, match in [
        (3, ValueError, r"`component_idx` values must be in \[0, 3\), got \[3\]"),
        (-1, ValueError, r"`component_idx` values must be in \[0, 3\), got \[-1\]"),
        (np.int32(5), ValueError, r"`component_idx` values must be in \[0, 3\)"),
        (True, TypeError, "`component_idx` must be an int or an integer tensor, got bool"),
        (1.0, TypeError, "`component_idx` must be an int or an integer tensor, got float"),
        ("1", TypeError, "`component_idx` must be an int or an integer tensor, got str"),
        (
            torch.tensor([0, 1]),
            ValueError,
            r"`component_idx` must be one index .* got a tensor of shape \[2\]",
        ),
        (torch.tensor(1.0), TypeError, "`component_idx`"),
    ]:
        _assert_rejected(metric, error, match, reconstruction=rec, target=target, component_idx=index)
    _assert_rejected(
        metric,
        ValueError,
        r"`target` must have shape \[\.\.\., 3, D\] .* got \[40, 2, 6\]",
        reconstruction=rec,
        target=target,
    )
    _assert_rejected(
        metric,
        ValueError,
        r"`target` must have shape \[\.\.\., 3, D\] .* got \[40, 2, 2, 6\]",
        reconstruction=data["reconstruction"][:, :, :2],
        target=data["target"][:, :, :2],
    )
    sparsity = FeatureSparsity(num_features=10, num_components=2, validate_args=validate_args)
    sparse = _sparsity_data(seed=11)
    sparsity.update(**sparse)
    _assert_rejected(
        sparsity,
        ValueError,
        r"`feature_activations` must have shape \[\.\.\., 2, D\] .* got \[60, 10\]",
        feature_activations=sparse["feature_activations"][:, 0],
    )
    _assert_rejected(
        sparsity,
        ValueError,
        r"`component_idx` values must be in \[0, 2\)",
        feature_activations=sparse["feature_activations"][:, 0],
        component_idx=2,
    )
    if validate_args:
        _assert_rejected(
            metric,
            ValueError,
            r"`mask` must have shape \[40, 2, 3\] \(one per vector\) or \[40, 2\] .* got \[40, 3\]",
            **{**data, "mask": data["mask"][:, 0]},
        )
        _assert_rejected(
            sparsity,
            ValueError,
            r"`mask` must have shape \[60, 2\] .* got \[60, 3\]",
            feature_activations=sparse["feature_activations"],
            mask=torch.ones(60, 3, dtype=torch.bool),
        )
        _assert_rejected(
            sparsity,
            ValueError,
            r"`feature_activations` must have shape \[\.\.\., 10\]",
            feature_activations=sparse["feature_activations"][..., :9],
        )


# ---------------------------------------------------------------------------------- DDP
def _ddp_scenarios(rank: int, world_size: int) -> list[str]:
    """Every rank takes its share of each scenario; the synced values must equal one process's."""
    problems: list[str] = []
    act, sparse = _activation_data(seed=20, n=23), _sparsity_data(seed=20, n=23, c=3)

    def check(tag: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
        for key in want:
            if not torch.allclose(got[key], want[key], rtol=1e-9, atol=0, equal_nan=True):
                problems.append(f"{tag} rank {rank}: {key} {got[key].tolist()} != {want[key].tolist()}")

    single_a = _activation_pass([act])
    single_s = FeatureSparsity(num_features=10, num_components=3, dead_thresholds=THRESHOLDS)
    single_s.update(**sparse)
    want_s = single_s.compute()
    want_frequency = single_s.firing_frequency()
    # (first row, component or None for all): one update of rows [first, first + 5); each scenario
    # covers every (row, component) once, and says which rank takes each update
    per_component = [(r, c) for r in range(0, 23, 5) for c in range(3)]
    scenarios: dict[str, tuple[list[tuple[int, int | None]], Any]] = {
        "interleaved rows, all at once": ([(r, None) for r in range(0, 23, 5)], lambda i, u: i),
        # each rank feeds its own components: a component is summed from one rank
        "components split over ranks": (per_component, lambda i, u: u[1]),
        "mixed layouts": (
            list(dict.fromkeys((r, None) if r % 10 == 0 else (r, c) for r, c in per_component)),
            lambda i, u: i,
        ),
    }
    for name, (updates, owner) in scenarios.items():
        for idle in (False, True):  # ... also with the last rank never updating
            ranks = world_size - 1 if idle else world_size
            mine = [u for i, u in enumerate(updates) if owner(i, u) % ranks == rank]
            activations = ActivationReconstruction(num_features=6, num_components=3)
            sparsity = FeatureSparsity(num_features=10, num_components=3, dead_thresholds=THRESHOLDS)
            for first, component in mine:
                rows = slice(first, first + 5)
                a = {k: v[rows] for k, v in act.items()}
                s = {k: v[rows] for k, v in sparse.items()}
                if component is None:
                    activations.update(**a)
                    sparsity.update(**s)
                else:
                    activations.update(**_per_component(a, component))
                    sparsity.update(
                        s["feature_activations"][:, component], s["mask"][:, component], component
                    )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check(f"{name}/idle={idle} activations", activations.compute(), single_a)
                check(f"{name}/idle={idle} sparsity", sparsity.compute(), want_s)
                check(
                    f"{name}/idle={idle} frequency", {"f": sparsity.firing_frequency()}, {"f": want_frequency}
                )
    # one collection: both metrics in the one fused sync
    col = ms.DiagnosticCollection(
        {
            "a/activations": ActivationReconstruction(num_features=6, num_components=3),
            "a/feature_sparsity": FeatureSparsity(
                num_features=10, num_components=3, dead_thresholds=THRESHOLDS
            ),
        }
    )
    for first in range(rank * 5, 23, 5 * world_size):
        col["a/activations"].update(**{k: v[first : first + 5] for k, v in act.items()})
        col["a/feature_sparsity"].update(**{k: v[first : first + 5] for k, v in sparse.items()})
    out = col.compute()
    for key in ACTIVATION_KEYS:
        for c in range(3):
            got = out[f"a/activations/{key}/component_{c}"].item()
            if not math.isclose(got, single_a[key][c].item(), rel_tol=1e-9):
                problems.append(f"collection rank {rank}: {key}/component_{c} {got}")
    return problems


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_equals_one_process(world_size: int) -> None:
    per_rank = run_distributed(_ddp_scenarios, world_size, timeout=300)
    assert per_rank == [[]] * world_size, per_rank


def test_plot_labels_the_histogram_bins_with_one_or_several_components() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    data = _sparsity_data(seed=12)
    one = FeatureSparsity(num_features=10)
    one.update(data["feature_activations"][:, 0])
    two = FeatureSparsity(num_features=10, num_components=2)
    two.update(data["feature_activations"])
    try:
        assert one.plot()[1].get_xlabel() == "bin"  # as before components existed
        assert two.plot()[1].get_xlabel() == "bin / component"
    finally:
        plt.close("all")
