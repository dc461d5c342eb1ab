"""Credit suite: each metric against an independent reference (autograd, numpy/scipy, slow loops)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from torch import Tensor

import metrics_suite as ms
from metrics_suite import BridgeResidual, CreditCosine, FeatureDrift, NudgingDelta, PerturbationCorrelation
from metrics_suite.functional import (
    bridge_residual,
    bridge_target,
    bridge_values,
    credit_cosine,
    feature_drift,
    lq_costates,
    lq_forward,
    nudging_delta,
    perturbation_pairs,
)
from metrics_suite.functional import credit as credit_functional
from metrics_suite.registry import registered
from tests.helpers import bad_inputs_and_arguments, names_the_argument, to_device

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Quadratic:
    """Item-wise ½ (h − c)ᵀ Q (h − c) with a symmetric positive definite Q; exact gradient known."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        g = _gen(seed)
        m = torch.randn(dim, dim, generator=g, dtype=F64)
        self.Q = m @ m.T / dim + torch.eye(dim, dtype=F64)
        self.c = torch.randn(dim, generator=g, dtype=F64)
        self.calls: list[int] = []

    def __call__(self, h: Tensor) -> Tensor:
        self.calls.append(h.shape[0])
        diff = h - self.c.to(h)
        return 0.5 * ((diff @ self.Q.to(h)) * diff).sum(-1)

    def gradient(self, h: Tensor) -> Tensor:
        return (h - self.c.to(h)) @ self.Q.to(h)


def _states(metric: ms.DiagnosticMetric) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in metric.state_items()}


def _assert_states_equal(metric: ms.DiagnosticMetric, before: dict[str, Tensor]) -> None:
    for k, v in metric.state_items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------- LQ chain
@pytest.mark.parametrize("symmetric", [True, False])
def test_lq_costates_equal_autograd_gradients(symmetric: bool) -> None:
    g = _gen(0)
    dims = [5, 4, 6, 3]
    weights = [torch.randn(dims[i + 1], dims[i], generator=g, dtype=F64) for i in range(3)]
    Q = torch.randn(3, 3, generator=g, dtype=F64)
    Q = Q @ Q.T if symmetric else Q
    h0 = torch.randn(7, 5, generator=g, dtype=F64)

    hs = [h0.clone().requires_grad_(True)]
    for A in weights:
        hs.append(hs[-1] @ A.T)
        hs[-1].retain_grad()
    (0.5 * ((hs[-1] @ Q.T) * hs[-1]).sum()).backward()
    grads = [h.grad for h in hs]

    costates = lq_costates(weights, Q, h0)
    assert len(costates) == 4
    for p, grad in zip(costates, grads):
        torch.testing.assert_close(p, grad, rtol=1e-9, atol=1e-9)
    if symmetric:  # DESIGN: p_L = Q h_L
        torch.testing.assert_close(costates[-1], lq_forward(weights, h0)[-1] @ Q.T, rtol=1e-12, atol=0)


def test_lq_forward_matches_loop_and_checks_shapes() -> None:
    g = _gen(1)
    weights = torch.randn(3, 4, 4, generator=g, dtype=F64)  # a [L, d, d] tensor works as a sequence
    h0 = torch.randn(2, 4, generator=g, dtype=F64)
    hs = lq_forward(weights, h0)
    h = h0.numpy()
    for l in range(3):
        h = h @ weights[l].numpy().T
        np.testing.assert_allclose(hs[l + 1].numpy(), h, rtol=1e-12)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        lq_forward([torch.randn(4, 4), torch.randn(4, 3)], torch.randn(2, 4))
    with pytest.raises(ValueError, match="`Q` must have shape \\[4, 4\\]"):
        lq_costates([torch.randn(4, 4)], torch.randn(3, 3), torch.randn(2, 4))


# ---------------------------------------------------------------------------------------------- cosine
@pytest.mark.parametrize("chunk_elements", [None, 13])  # 13: two items per float64 chunk
def test_credit_cosine_matches_numpy_loop_and_skips_zero_norms(
    chunk_elements: int | None, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    if chunk_elements is not None:
        monkeypatch.setattr(credit_functional, "CHUNK_ELEMENTS", chunk_elements)
    g = _gen(2)
    credit = torch.randn(9, 3, 2, generator=g)
    reference = credit + torch.randn(9, 3, 2, generator=g)
    credit[4] = 0.0  # undefined cosine: left out
    cosines = []
    for a, r in zip(credit.double().numpy(), reference.double().numpy()):
        a, r = a.ravel(), r.ravel()
        if np.linalg.norm(a) and np.linalg.norm(r):
            cosines.append(a @ r / np.linalg.norm(a) / np.linalg.norm(r))
    expected = np.mean(cosines)

    credit, reference = to_device((credit, reference), device)
    metric = CreditCosine(num_layers=3, with_stderr=True).to(device)
    metric.update(credit[:5], reference[:5], layer=1)
    metric.update(credit[5:], reference[5:], layer=1)
    out = metric.compute()
    assert out["cosine"].shape == (3,)
    np.testing.assert_allclose(out["cosine"][1].item(), expected, rtol=1e-12)
    np.testing.assert_allclose(out["cosine_stderr"][1].item(), scipy.stats.sem(cosines), rtol=1e-9)
    assert torch.isnan(out["cosine"][[0, 2]]).all()  # layers never updated
    np.testing.assert_allclose(credit_cosine(credit, reference).item(), expected, rtol=1e-12)


def test_credit_cosine_against_exact_lq_costates() -> None:
    """Credit from perturbed weights vs the exact costates, against numpy cosines of autograd gradients."""
    g = _gen(3)
    weights = [torch.randn(4, 4, generator=g, dtype=F64) for _ in range(2)]
    Q, h0 = torch.eye(4, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64)
    nearby = [w + 0.3 * torch.randn(4, 4, generator=g, dtype=F64) for w in weights]
    metric = CreditCosine(num_layers=3)
    for layer, (p, p_near) in enumerate(zip(lq_costates(weights, Q, h0), lq_costates(nearby, Q, h0))):
        metric.update(p_near, p, layer=layer)

    hs = [h0.clone().requires_grad_(True)]
    for w in weights:
        nxt = hs[-1] @ w.T
        nxt.retain_grad()
        hs.append(nxt)
    (0.5 * ((hs[-1] @ Q) * hs[-1]).sum()).backward()
    expected = []
    for layer in range(3):
        h_near = h0.numpy()
        for w in nearby[:layer]:
            h_near = h_near @ w.numpy().T
        # costate of the nearby chain at layer l: (A'_{L-1} ... A'_l)^T Q h'_L, by numpy
        h_end = h_near
        for w in nearby[layer:]:
            h_end = h_end @ w.numpy().T
        p_near = h_end @ Q.numpy()
        for w in reversed(nearby[layer:]):
            p_near = p_near @ w.numpy()
        grad = hs[layer].grad.numpy()
        cos = (p_near * grad).sum(1) / np.linalg.norm(p_near, axis=1) / np.linalg.norm(grad, axis=1)
        expected.append(cos.mean())
    np.testing.assert_allclose(metric.compute().numpy(), expected, rtol=1e-12)
    assert not np.allclose(expected, 1.0)  # the nearby chain's credit is not the exact costate


# ---------------------------------------------------------------------------------------------- perturbation
def test_central_difference_with_exact_gradient_gives_rho_one() -> None:
    loss_fn = Quadratic(8)
    hidden = torch.randn(16, 8, generator=_gen(4), dtype=F64)
    metric = PerturbationCorrelation(difference="central", seed=0)
    metric.update(hidden, loss_fn.gradient(hidden), loss_fn)
    assert abs(metric.compute().item() - 1.0) < 1e-9


def test_forward_difference_with_exact_gradient_is_nearly_one() -> None:
    loss_fn = Quadratic(8)
    hidden = torch.randn(16, 8, generator=_gen(5), dtype=F64)
    metric = PerturbationCorrelation(epsilon=1e-2, seed=1)
    metric.update(hidden, loss_fn.gradient(hidden), loss_fn)
    assert 0.99 < metric.compute().item() < 1.0


def test_random_credit_has_small_correlation() -> None:
    loss_fn = Quadratic(8)
    hidden = torch.randn(128, 8, generator=_gen(6), dtype=F64)
    metric = PerturbationCorrelation(seed=2)
    metric.update(hidden, torch.randn(128, 8, generator=_gen(7), dtype=F64), loss_fn)
    assert abs(metric.compute().item()) < 0.06  # 4096 pairs: standard error about 0.016


def test_rho_equals_scipy_pearsonr_over_pooled_pairs(device: torch.device) -> None:
    loss_fn = Quadratic(6)
    g = _gen(8)
    batches = []
    for n in (10, 7):
        hidden = torch.randn(n, 6, generator=g, dtype=F64)
        credit = loss_fn.gradient(hidden) + 2 * torch.randn(n, 6, generator=g, dtype=F64)
        batches.append(to_device((hidden, credit), device))
    metric = PerturbationCorrelation(num_layers=2, num_directions=5, epsilon=0.05, seed=123).to(device)
    pairs = []
    for hidden, credit in batches:
        metric.update(hidden, credit, loss_fn, layer=1)
        pairs.append(perturbation_pairs(hidden, credit, loss_fn, 0.05, 5, seed=123))
    x = torch.cat([p[0] for p in pairs]).cpu().numpy().ravel()
    y = torch.cat([p[1] for p in pairs]).cpu().numpy().ravel()
    rho = metric.compute()
    assert torch.isnan(rho[0])
    assert 0.1 < rho[1].item() < 0.99  # informative but imperfect credit
    np.testing.assert_allclose(rho[1].item(), scipy.stats.pearsonr(x, y).statistic, rtol=1e-10)


def test_perturbation_pairs_match_a_per_direction_loop() -> None:
    """The batched pairs equal a straightforward loop over the same directions."""
    loss_fn = Quadratic(5)
    hidden = torch.randn(4, 5, generator=_gen(9), dtype=F64)
    credit = torch.randn(4, 5, generator=_gen(10), dtype=F64)
    for difference in ("forward", "central"):
        x, y = perturbation_pairs(hidden, credit, loss_fn, 0.1, 3, difference, generator=_gen(11))
        v = torch.randn(3, 4, 5, generator=_gen(11), dtype=F64)
        v = v / v.norm(dim=-1, keepdim=True)
        for m in range(3):
            step = 0.1 * v[m]
            lower = loss_fn(hidden - step) if difference == "central" else loss_fn(hidden)
            scale = 0.5 if difference == "central" else 1.0
            torch.testing.assert_close(x[:, m], (credit * step).sum(1), rtol=1e-12, atol=0)
            torch.testing.assert_close(
                y[:, m], scale * (loss_fn(hidden + step) - lower), rtol=1e-9, atol=1e-15
            )


def _keyed_directions(
    hidden: Tensor, seed: int, num_directions: int, chunk_size: int | None = None
) -> Tensor:
    """The unit directions ``[N, M, D]`` behind keyed pairs, read back through the public API.

    With credit ``e_k`` the predicted change is ``ε·v_k`` (the directions do not depend on the credit),
    so ``D`` calls recover every coordinate of every direction.
    """
    n, d = hidden.shape
    eps = 1.0  # x is the step actually taken, (h + εv) − h: ε·v up to float64 rounding
    columns = []
    for k in range(d):
        basis = torch.zeros(n, d, dtype=F64)
        basis[:, k] = 1.0
        x, _ = perturbation_pairs(
            hidden, basis, lambda h: h.sum(-1), eps, num_directions, seed=seed, chunk_size=chunk_size
        )
        columns.append(x)
    return torch.stack(columns, -1)


def test_keyed_pairs_match_a_per_direction_loop() -> None:
    """With a seed the pairs are a loop over each item's own directions, unit vectors."""
    loss_fn = Quadratic(5)
    hidden = torch.randn(4, 5, generator=_gen(9), dtype=F64)
    credit = torch.randn(4, 5, generator=_gen(10), dtype=F64)
    v = _keyed_directions(hidden, seed=7, num_directions=3)
    np.testing.assert_allclose(v.norm(dim=-1).numpy(), 1.0, rtol=1e-12)
    for difference in ("forward", "central"):
        x, y = perturbation_pairs(hidden, credit, loss_fn, 0.25, 3, difference, seed=7)  # type: ignore[arg-type]
        for m in range(3):
            step = 0.25 * v[:, m]
            lower = loss_fn(hidden - step) if difference == "central" else loss_fn(hidden)
            scale = 0.5 if difference == "central" else 1.0
            torch.testing.assert_close(x[:, m], (credit * step).sum(1), rtol=1e-9, atol=1e-15)
            torch.testing.assert_close(
                y[:, m], scale * (loss_fn(hidden + step) - lower), rtol=1e-9, atol=1e-15
            )


def test_keyed_directions_depend_only_on_the_item_and_seed() -> None:
    hidden = torch.randn(6, 4, generator=_gen(30), dtype=F64)
    hidden[5] = hidden[1]  # a duplicate item
    v = _keyed_directions(hidden, seed=3, num_directions=5)
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    torch.testing.assert_close(_keyed_directions(hidden[perm], 3, 5), v[perm], rtol=0, atol=0)
    torch.testing.assert_close(_keyed_directions(hidden[2:4], 3, 5), v[2:4], rtol=0, atol=0)
    # one direction per loss_fn call, or a few: each chunk computes its own part of every stream
    for chunk_size in (1, 7, 15):
        torch.testing.assert_close(_keyed_directions(hidden, 3, 5, chunk_size), v, rtol=0, atol=0)
    torch.testing.assert_close(v[5], v[1], rtol=0, atol=0)
    assert not torch.allclose(v[0], v[2])  # distinct items, distinct directions
    assert not torch.allclose(_keyed_directions(hidden, 4, 5), v)  # another seed
    negative_zero = torch.zeros(1, 4, dtype=F64).neg()
    torch.testing.assert_close(
        _keyed_directions(negative_zero, 3, 2), _keyed_directions(negative_zero.abs(), 3, 2), rtol=0, atol=0
    )
    # float32 items: the same values give the same directions as float16 inputs that cast to them
    half = hidden.half()
    x16, _ = perturbation_pairs(half, half, lambda h: h.sum(-1), 1.0, 3, seed=1)
    x32, _ = perturbation_pairs(half.float(), half.float(), lambda h: h.sum(-1), 1.0, 3, seed=1)
    torch.testing.assert_close(x16, x32, rtol=0, atol=0)


def test_keyed_directions_are_uniform_on_the_sphere() -> None:
    """Many items' directions are uniform on the sphere, from standard normal draws."""
    d = 3
    hidden = torch.randn(4000, d, generator=_gen(31), dtype=F64)
    v = _keyed_directions(hidden, seed=11, num_directions=2).reshape(-1, d).numpy()
    # uniform on the 2-sphere: each coordinate is uniform on [-1, 1] (Archimedes)
    for k in range(d):
        assert scipy.stats.kstest(v[:, k], "uniform", args=(-1, 2)).pvalue > 1e-3
    # isotropic: E[v vᵀ] = I/3; each entry's standard error is at most 0.0034 over 8000 directions
    np.testing.assert_allclose(v.T @ v / len(v), np.eye(d) / d, atol=0.02)
    # the normals behind them, in both working precisions (24 or 32 bits for the radius)
    keys = credit_functional._item_keys(hidden[:500], seed=0)
    for dtype in (torch.float32, F64):
        z = torch.empty(4, 500, 16, dtype=dtype)
        credit_functional._keyed_normals_(z, keys, first=0)
        assert scipy.stats.kstest(z.double().numpy().ravel(), "norm").pvalue > 1e-3


_U64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix64_reference(z: int) -> int:
    """SplitMix64's output function on a Python int, as published (Steele, Lea & Flood 2014)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def _keyed_normals_reference(row: np.ndarray, seed: int, num_directions: int) -> tuple[int, np.ndarray]:
    """The key and the ``[M, D]`` normals of one float64 item, slowly, in Python ints and floats."""
    pieces = [int(p) for p in np.frombuffer(row.astype("<f8").tobytes(), dtype="<i2")]
    weights = credit_functional._key_weights(len(pieces)).long().tolist()  # the fixed hash constants
    key = _mix64_reference((seed + _GAMMA) & _U64)
    for c in range(4):  # one block of pieces: four exact dot products
        dot = sum(p * w[c] for p, w in zip(pieces, weights))
        key = _mix64_reference(((key ^ (dot & _U64)) + _GAMMA) & _U64)
    dim = len(row)
    half = (dim + 1) // 2
    z = np.zeros((num_directions, 2 * half))
    for m in range(num_directions):
        for p in range(half):
            bits = _mix64_reference((key + (m * half + p + 1) * _GAMMA) & _U64)
            radius = math.sqrt(-2.0 * math.log(1.0 - (bits & 0xFFFFFFFF) / 2**32))
            angle = float(bits - (1 << 64) if bits >> 63 else bits) * (math.pi * 2.0**-63)
            z[m, p], z[m, half + p] = radius * math.cos(angle), radius * math.sin(angle)
    return key, z[:, :dim]


@pytest.mark.parametrize("dim", [3, 4])
def test_keyed_directions_match_a_slow_reference_of_the_hash(dim: int) -> None:
    """Keys bit for bit, and normals and directions, against SplitMix64 written with Python ints."""
    hidden = torch.randn(3, dim, generator=_gen(32), dtype=F64)
    keys = credit_functional._item_keys(hidden, seed=2**64 + 5)  # the seed is taken modulo 2**64
    z = torch.empty(4, 3, dim, dtype=F64)
    credit_functional._keyed_normals_(z, keys, first=0)
    v = _keyed_directions(hidden, seed=5, num_directions=4)
    for i, row in enumerate(hidden.numpy()):
        key, z_ref = _keyed_normals_reference(row, 5, 4)
        assert int(keys[i].item()) & _U64 == key
        np.testing.assert_allclose(z[:, i].numpy(), z_ref, rtol=1e-12, atol=1e-14)
        v_ref = z_ref / np.linalg.norm(z_ref, axis=1, keepdims=True)
        np.testing.assert_allclose(v[i].numpy(), v_ref, rtol=1e-9, atol=1e-12)
    # a later chunk of directions continues the streams
    tail = torch.empty(2, 3, dim, dtype=F64)
    credit_functional._keyed_normals_(tail, keys, first=2)
    torch.testing.assert_close(tail, z[2:], rtol=0, atol=0)


def test_numpy_and_torch_hashes_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's numpy rounds and the int64 tensor ops of other devices: same keys, same normals.

    The slow reference above checks the numpy path; here the torch path (forced, as on a GPU) must match
    it bit for bit, on states whose every bit pattern occurs (both signs, all shifts' sign bits), and
    the reference on a few values.
    """
    gen = _gen(41)
    hidden = torch.randn(37, 5, generator=gen, dtype=F64)
    states = torch.randint(-(2**63), 2**63 - 1, (4096,), generator=gen, dtype=torch.int64)
    states[:4] = torch.tensor([-(2**63), -1, 0, 2**63 - 1])
    numpy_keys = credit_functional._item_keys(hidden, seed=9)
    numpy_mixed = credit_functional._mix64_(states.clone())
    numpy_z = {dt: torch.empty(3, 37, 5, dtype=dt) for dt in (torch.float32, F64)}
    for z in numpy_z.values():
        credit_functional._keyed_normals_(z, numpy_keys, first=1)
    assert all(
        int(v) & _U64 == _mix64_reference(int(s) & _U64) for s, v in zip(states[:64], numpy_mixed[:64])
    )
    monkeypatch.setattr(credit_functional, "_uint64_words", lambda t: None)  # every device's path
    assert torch.equal(credit_functional._item_keys(hidden, seed=9), numpy_keys)
    assert torch.equal(credit_functional._mix64_(states.clone()), numpy_mixed)
    for dt, z in numpy_z.items():
        torch_z = torch.empty_like(z)
        credit_functional._keyed_normals_(torch_z, numpy_keys, first=1)
        assert torch.equal(torch_z, z), dt


def test_a_strided_state_is_mixed_by_tensor_ops() -> None:
    """A non-contiguous CPU state cannot be read as one numpy array: it takes the int64 path, same bits."""
    states = torch.randint(-(2**63), 2**63 - 1, (64, 2), generator=_gen(42), dtype=torch.int64)
    column = states[:, 0]
    assert not column.is_contiguous()
    expected = [_mix64_reference(int(s) & _U64) for s in column]
    credit_functional._mix64_(column)
    assert [int(v) & _U64 for v in states[:, 0]] == expected


@pytest.mark.parametrize("difference", ["forward", "central"])
def test_losses_that_are_views_of_the_input_survive_the_reused_buffer(difference: str) -> None:
    """``loss_fn`` may return a view of its input: the buffer is reused only after the losses are read."""
    hidden = torch.randn(6, 3, generator=_gen(43), dtype=F64)
    credit = torch.randn(6, 3, generator=_gen(44), dtype=F64)

    def as_view(h: Tensor) -> Tensor:
        return h[:, 0]  # float64 in, float64 out: the losses are the input's own memory

    def as_copy(h: Tensor) -> Tensor:
        return h[:, 0].clone()

    for chunk_size in (None, 6, 12):  # one call; one direction per call (and the base alone); two
        view_pairs = perturbation_pairs(
            hidden, credit, as_view, 0.1, 5, difference, seed=3, chunk_size=chunk_size
        )
        copy_pairs = perturbation_pairs(
            hidden, credit, as_copy, 0.1, 5, difference, seed=3, chunk_size=chunk_size
        )
        for got, expected in zip(view_pairs, copy_pairs):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # and against the definition: y = (h + εv)_0 − h_0 (forward) for a loss reading coordinate 0
    x, y = perturbation_pairs(hidden, torch.eye(3, dtype=F64)[[0] * 6], as_view, 0.1, 5, difference, seed=3)
    torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-15)


def test_keyed_path_has_no_per_item_loop() -> None:
    """The same torch ops, as many, for 2 items as for 40: nothing runs once per item."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    def run(n: int) -> None:
        hidden = torch.randn(n, 5, generator=_gen(33))
        perturbation_pairs(hidden, hidden, lambda h: h.square().sum(-1), 1e-2, 6, "central", seed=1)

    run(1)  # builds the cached hash weights of this width once
    counts = []
    for n in (2, 40):
        with CountOps() as mode:
            run(n)
        counts.append(mode.ops)
    assert counts[0] == counts[1]
    assert not any("uniform" in op or "normal" in op or "random" in op for op in counts[0])


def test_seed_and_generator_are_exclusive() -> None:
    hidden = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"either `generator`.*or `seed`"):
        perturbation_pairs(hidden, hidden, Quadratic(2), generator=_gen(0), seed=1)
    with pytest.raises(ValueError, match="`seed` must be >= 0"):
        perturbation_pairs(hidden, hidden, Quadratic(2), seed=-1)


@pytest.mark.parametrize(
    ("difference", "chunk_size", "calls"),
    [
        ("forward", None, [44]),  # N = 4 unperturbed rows + 10 directions x 4 rows, one call
        ("central", None, [80]),
        ("forward", 8, [8, 8, 8, 8, 8, 4]),  # the unperturbed rows share the first call
        ("forward", 4, [4] * 11),
        ("central", 17, [16] * 5),
        ("central", 3, [8] * 10),  # at least one direction per call
    ],
)
def test_directions_are_evaluated_in_batched_calls(
    difference: str, chunk_size: int | None, calls: list[int]
) -> None:
    loss_fn = Quadratic(3)
    hidden = torch.randn(4, 3, generator=_gen(12), dtype=F64)
    x, y = perturbation_pairs(hidden, hidden, loss_fn, 1e-3, 10, difference, _gen(0), chunk_size)  # type: ignore[arg-type]
    assert x.shape == y.shape == (4, 10)
    assert loss_fn.calls == calls


def test_perturbation_degenerate_data_gives_nan() -> None:
    loss_fn = Quadratic(4)
    hidden = torch.randn(8, 4, generator=_gen(13), dtype=F64)
    metric = PerturbationCorrelation(seed=0)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(metric.compute())  # no data
    metric.update(hidden, torch.zeros_like(hidden), loss_fn)  # predicted changes all zero
    assert torch.isnan(metric.compute())


def test_perturbation_seed_none_follows_global_rng() -> None:
    torch.manual_seed(31)
    a = PerturbationCorrelation()
    torch.manual_seed(31)
    b = PerturbationCorrelation()
    assert a.seed == b.seed
    loss_fn = Quadratic(4)
    hidden = torch.randn(8, 4, generator=_gen(14), dtype=F64)
    credit = torch.randn(8, 4, generator=_gen(15), dtype=F64)
    a.update(hidden, credit, loss_fn)
    b.update(hidden, credit, loss_fn)
    assert torch.equal(a.compute(), b.compute())


def test_rejected_perturbation_update_keeps_state() -> None:
    loss_fn = Quadratic(4)
    hidden = torch.randn(8, 4, generator=_gen(16), dtype=F64)
    metric = PerturbationCorrelation(seed=3)
    metric.update(hidden, hidden, loss_fn)
    before = _states(metric)
    with pytest.raises(ValueError, match=r"`loss_fn` must map .* returned \[264, 1\]"):
        metric.update(hidden, hidden, lambda h: loss_fn(h)[:, None])
    with pytest.raises(ValueError, match="nan_strategy='error'"):
        metric.nan_strategy = "error"
        metric.update(hidden.clone().index_fill_(0, torch.tensor([2]), float("nan")), hidden, loss_fn)
    _assert_states_equal(metric, before)


def test_perturbation_skips_nonfinite_items_and_feeds_float32() -> None:
    seen: list[torch.dtype] = []

    def loss_fn(h: Tensor) -> Tensor:
        seen.append(h.dtype)
        return 0.5 * h.float().square().sum(-1)

    hidden = torch.randn(6, 4, generator=_gen(17)).half()
    hidden[1, 2] = float("inf")
    metric = PerturbationCorrelation(difference="central", epsilon=1e-2, seed=0)
    metric.update(hidden, hidden, loss_fn)
    assert seen == [torch.float32]
    assert metric.nonfinite_count.item() == 1
    assert metric.pair_sums[0, 0].item() == 5 * 32
    with pytest.warns(UserWarning, match="skipped 1 item"):
        assert metric.compute().item() > 0.999


# ---------------------------------------------------------------------------------------------- nudging
def test_nudging_true_gradient_lowers_the_loss_and_its_negation_raises_it() -> None:
    loss_fn = Quadratic(6)
    hidden = torch.randn(20, 6, generator=_gen(18), dtype=F64)
    grad = loss_fn.gradient(hidden)
    metric = NudgingDelta(num_layers=3, eta=0.01)
    metric.update(hidden, grad, loss_fn, layer=0)
    metric.update(hidden, -grad, loss_fn, layer=2)
    out = metric.compute()
    assert out["improved_fraction"][0].item() == 1.0 and out["delta"][0].item() < 0
    assert out["improved_fraction"][2].item() == 0.0 and out["delta"][2].item() > 0
    assert torch.isnan(out["delta"][1]) and torch.isnan(out["improved_fraction"][1])


def test_nudging_delta_matches_a_per_item_reference(device: torch.device) -> None:
    hidden = torch.randn(5, 2, 3, generator=_gen(19), dtype=F64)  # items may have several dims
    credit = torch.randn(5, 2, 3, generator=_gen(20), dtype=F64)
    flat_loss = Quadratic(6, seed=1)
    expected = []
    for h, a in zip(hidden.reshape(5, 6).numpy(), credit.reshape(5, 6).numpy()):
        a_hat = a / (np.sqrt(np.mean(a**2)) + 1e-6)
        new = flat_loss(torch.from_numpy(h - 0.05 * a_hat)[None])
        expected.append((new - flat_loss(torch.from_numpy(h)[None])).item())
    hidden, credit = to_device((hidden, credit), device)
    delta = nudging_delta(hidden, credit, lambda h: flat_loss(h.reshape(h.shape[0], 6)), eta=0.05)
    np.testing.assert_allclose(delta.cpu().numpy(), expected, rtol=1e-9)

    metric = NudgingDelta(eta=0.05, with_stderr=True).to(device)
    metric.update(hidden[:2], credit[:2], lambda h: flat_loss(h.reshape(h.shape[0], 6)))
    metric.update(hidden[2:], credit[2:], lambda h: flat_loss(h.reshape(h.shape[0], 6)))
    out = metric.compute()
    np.testing.assert_allclose(out["delta"].item(), np.mean(expected), rtol=1e-9)
    np.testing.assert_allclose(out["delta_stderr"].item(), scipy.stats.sem(expected), rtol=1e-9)
    np.testing.assert_allclose(out["improved_fraction"].item(), np.mean(np.array(expected) < 0))


# ---------------------------------------------------------------------------------------------- bridge
def test_bridge_residual_matches_scipy_logsumexp(device: torch.device) -> None:
    g = _gen(21)
    next_values = torch.randn(12, 5, generator=g) * 2
    value = torch.randn(12, generator=g)
    lam = 0.3
    target = -lam * scipy.special.logsumexp(-next_values.double().numpy() / lam, axis=1) + lam * np.log(5)
    expected = np.abs(value.double().numpy() - target)

    value, next_values = to_device((value, next_values), device)
    np.testing.assert_allclose(bridge_target(next_values, lam).cpu().numpy(), target, rtol=1e-12)
    np.testing.assert_allclose(bridge_residual(value, next_values, lam).item(), expected.mean(), rtol=1e-12)
    metric = BridgeResidual(num_layers=2, lam=lam).to(device)
    metric.update(value[:7], next_values[:7], layer=1)
    metric.update(value[7:], next_values[7:], layer=1)
    out = metric.compute()
    assert torch.isnan(out[0])
    np.testing.assert_allclose(out[1].item(), expected.mean(), rtol=1e-12)


@pytest.mark.parametrize("lam", [1e-3, 0.1, 10.0, 1e4])
def test_bridge_target_lies_between_min_and_mean(lam: float) -> None:
    next_values = torch.randn(50, 7, generator=_gen(22), dtype=F64) * 3
    target = bridge_target(next_values, lam)
    assert (target >= next_values.min(1).values - 1e-12).all()
    assert (target <= next_values.mean(1) + 1e-12).all()


def test_bridge_values_evaluates_both_networks() -> None:
    torch.manual_seed(0)
    value_net, target_net = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    states = torch.randn(4, 3)
    next_states = states[:, None] + 0.1 * torch.randn(4, 5, 3)
    value, next_values = bridge_values(value_net, target_net, states, next_states)
    assert not value.requires_grad and not next_values.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(value, value_net(states)[:, 0])
        for k in range(5):
            torch.testing.assert_close(next_values[:, k], target_net(next_states[:, k])[:, 0])
    with pytest.raises(ValueError, match=r"`next_states` must have shape \[4, \*, 3\]"):
        bridge_values(value_net, target_net, states, next_states[:3])


# ---------------------------------------------------------------------------------------------- drift
def _drift_setup() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    g = _gen(23)
    reference = {
        "enc.weight": torch.randn(4, 3, generator=g),
        "enc.bias": torch.randn(4, generator=g),
        "scale": torch.randn(2, generator=g, dtype=F64),
    }
    params = {k: w + 0.2 * torch.randn(w.shape, generator=g, dtype=w.dtype) for k, w in reference.items()}
    return reference, params


def test_feature_drift_matches_hand_norms(device: torch.device) -> None:
    reference, params = _drift_setup()
    per_param = {
        k: np.linalg.norm(params[k].double().numpy() - w.double().numpy())
        / np.linalg.norm(w.double().numpy())
        for k, w in reference.items()
    }
    reference, params = to_device((reference, params), device)
    metric = FeatureDrift(reference).to(device)
    metric.update(params)
    out = metric.compute()
    assert list(out) == ["enc.weight", "enc.bias", "scale"]
    for k, v in per_param.items():
        np.testing.assert_allclose(out[k].item(), v, rtol=1e-12)
        np.testing.assert_allclose(feature_drift(params, reference)[k].item(), v, rtol=1e-12)

    def sq(x: Tensor) -> float:
        return float(x.double().square().sum())

    enc = math.sqrt(
        (sq(params["enc.weight"] - reference["enc.weight"]) + sq(params["enc.bias"] - reference["enc.bias"]))
        / (sq(reference["enc.weight"]) + sq(reference["enc.bias"]))
    )
    grouped = FeatureDrift(reference, group_by_module=True).to(device)
    grouped.update(params)
    out = grouped.compute()
    assert list(out) == ["enc", "root"]
    np.testing.assert_allclose(out["enc"].item(), enc, rtol=1e-12)
    np.testing.assert_allclose(out["root"].item(), per_param["scale"], rtol=1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_feature_drift_summed_states_of_replicated_ranks_equal_one_process() -> None:
    reference, params = _drift_setup()
    single = FeatureDrift(reference)
    single.update(params)
    ranks = [FeatureDrift(reference) for _ in range(3)]
    ranks[0].update(params)
    ranks[1].update(params)  # ranks[2] never updated: contributes 0/0
    merged = FeatureDrift(reference)
    for name, _ in merged.state_items():
        setattr(merged, name, sum(getattr(r, name) for r in ranks))
    for k, v in single.compute().items():
        torch.testing.assert_close(merged.compute()[k], v, rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_feature_drift_reports_the_latest_update() -> None:
    reference, params = _drift_setup()
    later = {k: 2 * v for k, v in params.items()}
    expected = feature_drift(later, reference)
    metric = FeatureDrift(reference)
    metric.update(params)
    metric.update(later)
    assert all(torch.equal(metric.compute()[k], v) for k, v in expected.items())
    fwd = FeatureDrift(reference)
    fwd(params)
    batch_value = fwd(later)
    assert all(
        torch.equal(batch_value[k], v) and torch.equal(fwd.compute()[k], v) for k, v in expected.items()
    )
    assert all(torch.isnan(v) for v in FeatureDrift(reference).compute().values())


def test_feature_drift_takes_modules_and_copies_the_reference() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    w0, b0 = model[2].weight.detach().clone(), model[2].bias.detach().clone()
    metric = FeatureDrift(model[2], group_by_module=True)  # reference: the head only
    with torch.no_grad():
        model[2].weight.add_(0.5)  # must not move the copied reference
    # extra names (the rest of the model) are ignored
    metric.update(dict(model.named_parameters()) | dict(model[2].named_parameters()))
    expected = math.sqrt(w0.numel() * 0.25 / (w0.double().square().sum() + b0.double().square().sum()).item())
    np.testing.assert_allclose(metric.compute()["root"].item(), expected, rtol=1e-6)
    clone = pickle.loads(pickle.dumps(metric))
    clone.update(model[2])
    assert torch.equal(clone.compute()["root"], metric.compute()["root"])


def test_feature_drift_nonfinite_parameter_is_nan_and_counted() -> None:
    reference, params = _drift_setup()
    params["enc.bias"] = params["enc.bias"].clone()
    params["enc.bias"][0] = float("nan")
    metric = FeatureDrift(reference)
    metric.update(params)
    with pytest.warns(UserWarning, match="skipped 1 item"):
        out = metric.compute()
    assert torch.isnan(out["enc.bias"]) and torch.isfinite(out["enc.weight"])
    assert metric.nonfinite_count.item() == 1


# ---------------------------------------------------------------------------------------------- contract
def test_credit_suite_registry_and_collection_keys() -> None:
    assert ms.available()["credit"] == [
        "cosine",
        "perturbation_correlation",
        "nudging",
        "bridge_residual",
        "feature_drift",
    ]
    reference, params = _drift_setup()
    col = ms.suite("credit", cosine={"num_layers": 2}, feature_drift={"reference": reference})
    g = _gen(24)
    credit = torch.randn(6, 4, generator=g)
    col.update(credit=credit, reference=credit + torch.randn(6, 4, generator=g), layer=1)
    col.update(params=params)
    with pytest.warns(UserWarning, match="never updated"):
        out = col.compute()
    assert torch.isnan(out["credit/cosine/layer_0"]) and torch.isfinite(out["credit/cosine/layer_1"])
    assert torch.isfinite(out["credit/feature_drift/enc.weight"])
    assert torch.isnan(out["credit/bridge_residual"])


@pytest.mark.parametrize("entry", [e for e in registered() if e.suite == "credit"], ids=lambda e: e.name)
def test_bad_inputs_raise_and_leave_state_unchanged(entry) -> None:  # type: ignore[no-untyped-def]
    ex = entry.example
    metric = entry.cls(**ex.init_kwargs)
    metric.update(**ex.make_batch(_gen(25), 6))
    before = _states(metric)
    rejected = bad_inputs_and_arguments(entry)
    assert rejected
    for changed, bad in rejected:
        with pytest.raises((ValueError, TypeError)) as info:
            metric.update(**bad)
        assert names_the_argument(str(info.value), changed, metric.update, bad), info.value
        _assert_states_equal(metric, before)


@pytest.mark.parametrize(
    "entry", [e for e in registered() if e.suite == "credit" and e.example.shardable], ids=lambda e: e.name
)
def test_shardable_metrics_are_split_invariant(entry) -> None:  # type: ignore[no-untyped-def]
    ex = entry.example
    batch = ex.make_batch(_gen(27), 11)
    whole, parts = entry.cls(**ex.init_kwargs), entry.cls(**ex.init_kwargs)
    whole.update(**batch)
    for part in ex.split(batch, [4, 0, 7]):
        parts.update(**part)
    a, b = whole.compute(), parts.compute()
    for k in a if isinstance(a, dict) else [None]:
        torch.testing.assert_close(a[k] if k else a, b[k] if k else b, rtol=1e-9, atol=0, equal_nan=True)


def test_constructor_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        CreditCosine(num_layers=0)
    with pytest.raises(ValueError, match="difference"):
        PerturbationCorrelation(difference="backward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lam"):
        BridgeResidual(lam=0.0)
    with pytest.raises(ValueError, match="no parameters"):
        FeatureDrift({})
    with pytest.raises(TypeError, match="reference"):
        FeatureDrift({"w": torch.zeros(2, dtype=torch.int64)})


def test_perturbation_checkpoint_resumes_the_direction_stream() -> None:
    loss_fn = Quadratic(4)
    g = _gen(28)
    batches = [
        (torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64))
        for _ in range(2)
    ]
    uninterrupted = PerturbationCorrelation(seed=4)
    uninterrupted.update(*batches[0], loss_fn)
    resumed = PerturbationCorrelation(seed=99)  # another seed: the checkpoint must carry the seed
    resumed.load_state_dict(uninterrupted.state_dict())
    for metric in (uninterrupted, resumed):
        metric.update(*batches[1], loss_fn)
    assert torch.equal(resumed.compute(), uninterrupted.compute())


# ---------------------------------------------------------------------------------------------- edge cases
def test_credit_cosine_takes_inputs_that_require_grad() -> None:
    g = _gen(40)
    net = torch.nn.Linear(5, 5).double()
    reference = torch.randn(7, 5, generator=g, dtype=F64)
    credit = net(torch.randn(7, 5, generator=g, dtype=F64))  # a learned credit signal: requires grad
    c, r = credit.detach().numpy(), reference.numpy()
    expected = np.mean((c * r).sum(1) / np.linalg.norm(c, axis=1) / np.linalg.norm(r, axis=1))
    np.testing.assert_allclose(credit_cosine(credit, reference).item(), expected, rtol=1e-12)
    metric = CreditCosine()
    np.testing.assert_allclose(metric(credit, reference).item(), expected, rtol=1e-12)
    np.testing.assert_allclose(metric.compute().item(), expected, rtol=1e-12)
    assert not any(v.requires_grad for _, v in metric.state_items())
    col = ms.suite("credit")
    col(credit=credit, reference=reference)
    assert not any(v.requires_grad for m in col.values() for _, v in m.state_items())


def test_rejected_forward_keeps_the_accumulated_state() -> None:
    metric = BridgeResidual(lam=0.5)
    metric.update(torch.tensor([0.5, 1.0]), torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    before = _states(metric)
    with pytest.raises(ValueError, match="next_values"):
        metric(torch.tensor([0.5]), torch.zeros(2, 2))
    _assert_states_equal(metric, before)
    value = torch.tensor([0.2], requires_grad=True)
    metric.update(value, torch.tensor([[1.0, 0.0]]))
    assert not any(v.requires_grad for _, v in metric.state_items())
    targets = scipy.special.logsumexp(-np.array([[0.0, 1.0], [2.0, 3.0], [1.0, 0.0]]) / 0.5, axis=1)
    targets = -0.5 * targets + 0.5 * np.log(2)
    expected = np.mean(np.abs(np.array([0.5, 1.0, 0.2]) - targets))
    np.testing.assert_allclose(metric.compute().item(), expected, rtol=1e-6)


def test_perturbation_float32_uses_the_step_actually_taken() -> None:
    """Large float32 activations round h + εv; the exact gradient of a linear loss still scores 1."""
    g = _gen(41)
    hidden = 1000 + torch.randn(64, 16, generator=g)
    w = torch.randn(16, generator=g)
    origin = hidden.double()

    def linear_loss(h: Tensor) -> Tensor:  # ⟨w, h − h0⟩ in float64, h0 the item's own unperturbed state
        return ((h.double() - origin.repeat(h.shape[0] // 64, 1)) * w.double()).sum(-1)

    for difference in ("forward", "central"):
        x, y = perturbation_pairs(
            hidden, w.expand(64, 16), linear_loss, 1e-3, 8, difference, generator=_gen(42)
        )
        assert scipy.stats.pearsonr(x.flatten().numpy(), y.flatten().numpy())[0] > 1 - 1e-9
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-5, atol=1e-9)


def test_nudging_propagate_gives_nan_improved_fraction() -> None:
    hidden = torch.randn(4, 3, generator=_gen(43))
    hidden[1, 0] = float("nan")
    metric = NudgingDelta(nan_strategy="propagate")
    metric.update(hidden, hidden, lambda h: 0.5 * h.square().sum(-1))
    out = metric.compute()
    assert torch.isnan(out["delta"]) and torch.isnan(out["improved_fraction"])


def test_nudging_rms_does_not_overflow_in_float32() -> None:
    hidden = torch.randn(6, 4, generator=_gen(44))
    credit = torch.randn(6, 4, generator=_gen(45))

    def loss_fn(h: Tensor) -> Tensor:
        return 0.5 * h.double().square().sum(-1)

    reference = nudging_delta(hidden, credit, loss_fn)  # â does not depend on the credit's scale
    huge = nudging_delta(hidden, credit * 1e19, loss_fn)  # squares of 1e19 overflow float32
    np.testing.assert_allclose(huge.numpy(), reference.numpy(), rtol=1e-4, atol=1e-9)
    assert (reference.abs() > 1e-6).all()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda h, f: perturbation_pairs(h, h, f, difference="centre"), ValueError, "`difference`"),  # type: ignore[arg-type]
        (lambda h, f: perturbation_pairs(h, h, f, epsilon=-1.0), ValueError, r"`epsilon` must be > 0"),
        (lambda h, f: perturbation_pairs(h, h, f, epsilon=0.0), ValueError, r"`epsilon` must be > 0"),
        (lambda h, f: perturbation_pairs(h, h, f, num_directions=-3), ValueError, "`num_directions`"),
        (lambda h, f: perturbation_pairs(h, h, f, num_directions=2.5), TypeError, "`num_directions`"),  # type: ignore[arg-type]
        (lambda h, f: nudging_delta(h, h, f, eta=-1.0), ValueError, "`eta`"),
        (lambda h, f: nudging_delta(h, h, lambda x: f(x).long()), TypeError, "floating-point losses"),
        (lambda h, f: bridge_target(torch.zeros(3, 0)), ValueError, r"`next_values`.*\[3, 0\]"),
        (lambda h, f: bridge_target(torch.zeros(3, 2), lam=0.0), ValueError, "`lam`"),
        (lambda h, f: bridge_residual(torch.zeros(3), torch.zeros(3, 2), lam=-1.0), ValueError, "`lam`"),
    ],
)
def test_functional_arguments_are_checked(call, error, match) -> None:  # type: ignore[no-untyped-def]
    hidden = torch.randn(4, 3, generator=_gen(46))
    with pytest.raises(error, match=match):
        call(hidden, lambda h: 0.5 * h.square().sum(-1))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_feature_drift_nonfinite_count_of_replicated_ranks_is_counted_once() -> None:
    reference, params = _drift_setup()
    params["scale"] = torch.full_like(params["scale"], float("nan"))
    single = FeatureDrift(reference)
    single.update(params)
    ranks = [FeatureDrift(reference) for _ in range(3)]
    ranks[0].update(params)
    ranks[1].update(params)  # ranks[2] never updated
    merged = FeatureDrift(reference)
    for name, _ in merged.state_items():
        setattr(merged, name, sum(getattr(r, name) for r in ranks))
    assert single.skipped_items().item() == merged.skipped_items().item() == 1
    with pytest.warns(UserWarning, match="skipped 1 item"):
        merged.compute()


def test_feature_drift_reference_keeps_its_precision_under_a_dtype_cast() -> None:
    reference, params = _drift_setup()
    expected = feature_drift(params, reference)
    metric = FeatureDrift(reference)
    torch.nn.ModuleDict({"drift": metric}).to(torch.bfloat16)  # e.g. Lightning precision="bf16-true"
    metric.update(params)
    for k, v in metric.compute().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-12, atol=0)
    metric.update(reference)
    assert all(v.item() == 0 for v in metric.compute().values())


def test_feature_drift_rejects_a_submodule_named_root_when_grouping() -> None:
    with pytest.raises(ValueError, match="'root'"):
        FeatureDrift({"root.weight": torch.ones(2), "scale": torch.ones(1)}, group_by_module=True)


def test_seed_none_does_not_advance_the_global_rng() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    ms.suite("credit")
    PerturbationCorrelation()
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_stderr_keeps_the_collection_keys_of_tensor_valued_metrics(num_layers: int) -> None:
    g = _gen(47)
    credit, reference = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    value, next_values = torch.randn(9, generator=g), torch.randn(9, 3, generator=g)
    settings = {"num_layers": num_layers}
    plain = ms.suite("credit", cosine=settings, bridge_residual=settings)
    with_se = ms.suite(
        "credit", cosine={**settings, "with_stderr": True}, bridge_residual={**settings, "with_stderr": True}
    )
    for col in (plain, with_se):
        col.update(credit=credit, reference=reference, value=value, next_values=next_values)
    with pytest.warns(UserWarning, match="never updated"):
        out, out_se = plain.compute(), with_se.compute()
    suffixes = [""] if num_layers == 1 else ["/layer_0", "/layer_1"]
    stderr_keys = {f"credit/{m}/stderr{s}" for m in ("cosine", "bridge_residual") for s in suffixes}
    assert set(out_se) == set(out) | stderr_keys  # stderr adds keys, renames none
    c, r = credit.double().numpy(), reference.double().numpy()
    cosines = (c * r).sum(1) / np.linalg.norm(c, axis=1) / np.linalg.norm(r, axis=1)
    key = "credit/cosine/stderr" + suffixes[0]
    np.testing.assert_allclose(out_se[key].item(), scipy.stats.sem(cosines), rtol=1e-9)
    np.testing.assert_allclose(out_se["credit/cosine" + suffixes[0]].item(), cosines.mean(), rtol=1e-12)


def test_credit_cosine_of_a_vector_with_itself_is_exactly_one() -> None:
    # unclamped, rounding gave 1 + 2**-52 for about a third of random vectors
    g = torch.Generator().manual_seed(9)
    v = torch.randn(200, 7, dtype=torch.float64, generator=g)
    cosine, _ = credit_functional._per_item_cosine(v, v)
    assert cosine.tolist() == [1.0] * 200
    assert credit_functional._per_item_cosine(v, -v)[0].tolist() == [-1.0] * 200
    metric = CreditCosine()
    for row in v[:50]:
        metric.update(row[None], row[None])
    assert metric.compute().item() <= 1.0


@pytest.mark.parametrize("cls", [PerturbationCorrelation, NudgingDelta])
def test_nan_loss_skips_only_its_item(cls: type) -> None:
    # a NaN loss for one item: that sample is skipped and counted, the others give the value
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(8, 4, dtype=torch.float64, generator=g)
    credit = hidden + 0.3 * torch.randn(8, 4, dtype=torch.float64, generator=g)
    hidden[0, 0] = 100.0  # the marker of the item whose loss is NaN

    def loss_fn(h: Tensor) -> Tensor:
        return torch.where(h[:, 0] > 50, float("nan"), 0.5 * (h**2).sum(-1))

    kwargs = {"seed": 0} if cls is PerturbationCorrelation else {}
    metric, clean = cls(**kwargs), cls(**kwargs)
    with pytest.warns(UserWarning, match="skipped 1 item"):
        metric.update(hidden, credit, loss_fn)
        out = metric.compute()
    clean.update(hidden[1:], credit[1:], lambda h: 0.5 * (h**2).sum(-1))
    assert metric.nonfinite_count.item() == 1
    expected = clean.compute()
    pairs = out.items() if isinstance(out, dict) else [("", out)]
    for key, value in pairs:
        reference = expected[key] if isinstance(expected, dict) else expected
        assert torch.isfinite(value) and torch.allclose(value, reference, rtol=1e-12), key
    with pytest.raises(ValueError, match="loss_fn"):
        cls(nan_strategy="error", **kwargs).update(hidden, credit, loss_fn)


def test_nudging_zero_credit_is_not_improved() -> None:
    # a zero credit leaves the hidden state where it is: delta is exactly 0, which is no improvement
    hidden = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    metric = NudgingDelta(eta=0.1, with_stderr=True)
    metric.update(hidden, torch.zeros_like(hidden), lambda h: 0.5 * (h**2).sum(-1))
    out = metric.compute()
    assert out["delta"].item() == 0.0
    assert out["improved_fraction"].item() == 0.0


@pytest.mark.parametrize("cls", [CreditCosine, PerturbationCorrelation, NudgingDelta])
def test_zero_width_items_are_rejected_by_name(cls: type) -> None:
    metric = cls()
    first = "credit" if cls is CreditCosine else "hidden"
    args = [torch.zeros(3, 0), torch.zeros(3, 0)] + ([] if cls is CreditCosine else [lambda h: h.sum(-1)])
    with pytest.raises(ValueError, match=rf"`{first}` must hold at least one element per item .* \[3, 0\]"):
        metric.update(*args)
    assert metric.update_count == 0
