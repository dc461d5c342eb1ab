"""Reconstruction suite: each metric against hand-computed values, DESIGN.md seeds and numpy references."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

import metrics_suite as ms
from metrics_suite import ActivationReconstruction, ChangedTokenRate, FeatureSparsity, ReconstructionScore
from metrics_suite.functional import (
    activation_reconstruction,
    changed_token_rate,
    feature_sparsity,
    percentage_changed_ids,
    reconstruction_score,
)
from metrics_suite.functional import reconstruction as functional_reconstruction
from tests.helpers import to_device


def _states(metric: ms.DiagnosticMetric) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in metric.state_items()}


def _assert_rejected(
    metric: ms.DiagnosticMetric, error: type[Exception], match: str, **inputs: object
) -> None:
    """``update(**inputs)`` raises ``error`` matching ``match`` and leaves every state bit-for-bit unchanged."""
    before = _states(metric)
    with pytest.raises(error, match=match):
        metric.update(**inputs)
    after = _states(metric)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def _split(n: int, sizes: list[int]) -> list[slice]:
    assert sum(sizes) == n
    starts = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(starts)]


# ====================================================================================== ReconstructionScore
@pytest.mark.parametrize("reduction", ["ratio_of_sums", "itemwise_mean"])
def test_score_design_example(reduction: str) -> None:
    loss = torch.full((3,), 2.0)
    metric = ReconstructionScore(reduction=reduction)
    metric.update(loss, loss + 1, loss + 3)
    assert metric.compute().item() == pytest.approx(2 / 3, abs=1e-12)
    assert reconstruction_score(loss, loss + 1, loss + 3, reduction=reduction).item() == pytest.approx(2 / 3)


def _score_data(g: torch.Generator, n: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    clean = torch.rand(n, c, generator=g, dtype=torch.float64) + 1.0
    zero = clean + 0.1 + 2.0 * torch.rand(n, c, generator=g, dtype=torch.float64)
    recon = clean + (zero - clean) * torch.rand(n, c, generator=g, dtype=torch.float64)
    return clean, recon, zero


def test_score_reductions_differ_and_match_numpy(device: torch.device) -> None:
    clean, recon, zero = _score_data(torch.Generator().manual_seed(1), 40, 3)
    l, r, z = clean.numpy(), recon.numpy(), zero.numpy()
    want_sums = (z.sum(0) - r.sum(0)) / (z.sum(0) - l.sum(0))
    want_mean = ((z - r) / (z - l)).mean(0)
    assert np.abs(want_sums - want_mean).min() > 1e-3  # the data tells the two reductions apart
    clean, recon, zero = to_device((clean, recon, zero), device)
    for reduction, want in (("ratio_of_sums", want_sums), ("itemwise_mean", want_mean)):
        metric = ReconstructionScore(num_components=3, reduction=reduction).to(device)
        for part in _split(40, [7, 20, 13]):
            metric.update(clean[part], recon[part], zero[part])
        np.testing.assert_allclose(metric.compute().cpu().numpy(), want, rtol=1e-12)


def test_score_component_idx_matches_nc_layout() -> None:
    clean, recon, zero = _score_data(torch.Generator().manual_seed(2), 12, 2)
    for reduction in ("ratio_of_sums", "itemwise_mean"):
        wide = ReconstructionScore(num_components=2, reduction=reduction)
        wide.update(clean, recon, zero)
        narrow = ReconstructionScore(num_components=2, reduction=reduction)
        narrow.update(clean[:, 0], recon[:, 0], zero[:, 0], component_idx=0)  # an int
        idx = torch.ones(12, dtype=torch.long)
        narrow.update(clean[:, 1], recon[:, 1], zero[:, 1], component_idx=idx)  # a tensor
        torch.testing.assert_close(narrow.compute(), wide.compute(), rtol=1e-12, atol=0)


def _score_loop_reference(
    clean: np.ndarray, recon: np.ndarray, zero: np.ndarray, idx: np.ndarray, c: int, reduction: str
) -> np.ndarray:
    """Per-component score by a slow loop over items."""
    want = []
    for component in range(c):
        sums, ratios = np.zeros(3), []
        for l, r, z, i in zip(clean, recon, zero, idx):
            if i == component:
                sums += (l, r, z)
                ratios.append((z - r) / (z - l))
        if reduction == "ratio_of_sums":
            want.append((sums[2] - sums[1]) / (sums[2] - sums[0]) if ratios else math.nan)
        else:
            want.append(np.mean(ratios) if ratios else math.nan)
    return np.array(want)


@pytest.mark.parametrize("reduction", ["ratio_of_sums", "itemwise_mean"])
def test_score_mixed_component_idx_in_one_batch_vs_loop(reduction: str) -> None:
    g = torch.Generator().manual_seed(9)
    clean, recon, zero = (x[:, 0] for x in _score_data(g, 61, 1))
    idx = torch.randint(0, 4, (61,), generator=g)  # every batch mixes components; component 3 ...
    idx[idx == 3] = 2  # ... gets no item at all: NaN
    metric = ReconstructionScore(num_components=4, reduction=reduction)
    for part in _split(61, [17, 1, 0, 30, 13]):
        metric.update(clean[part], recon[part], zero[part], component_idx=idx[part])
    want = _score_loop_reference(clean.numpy(), recon.numpy(), zero.numpy(), idx.numpy(), 4, reduction)
    np.testing.assert_allclose(metric.compute().numpy(), want, rtol=1e-12)
    assert np.isnan(want[3]) and len(set(np.round(want[:3], 6))) == 3  # components tell apart


def test_score_nonfinite_loss_leaves_out_only_its_component() -> None:
    clean = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    recon = torch.tensor([[2.0, float("nan")], [2.0, 2.0]])
    zero = torch.tensor([[3.0, 3.0], [5.0, 3.0]])
    # component 0 keeps both items: (8 - 4) / (8 - 2) and (1/2 + 3/4) / 2; component 1 only item 1
    for reduction, want in (("ratio_of_sums", [2 / 3, 0.5]), ("itemwise_mean", [0.625, 0.5])):
        wide = ReconstructionScore(num_components=2, reduction=reduction)
        wide.update(clean, recon, zero)
        narrow = ReconstructionScore(num_components=2, reduction=reduction)
        for c in range(2):
            narrow.update(clean[:, c], recon[:, c], zero[:, c], component_idx=c)
        for metric in (wide, narrow):
            with pytest.warns(UserWarning, match="skipped 1 item"):
                np.testing.assert_allclose(metric.compute().numpy(), want, rtol=1e-12)
            assert metric.nonfinite_count.item() == 1  # one (item, component) pair
    # a component that is NaN everywhere (a diverged SAE) leaves the other one intact
    diverged = ReconstructionScore(num_components=2)
    diverged.update(clean, torch.stack([recon[:, 0], torch.full((2,), float("nan"))], 1), zero)
    assert diverged.nonfinite_count.item() == 2
    with pytest.warns(UserWarning):
        score = diverged.compute()
    assert score[0].item() == pytest.approx(2 / 3) and math.isnan(score[1].item())


def test_score_nan_strategy_error_and_propagate() -> None:
    clean, recon, zero = _score_data(torch.Generator().manual_seed(10), 6, 2)
    recon[2, 1] = float("nan")
    strict = ReconstructionScore(num_components=2, nan_strategy="error")
    _assert_rejected(
        strict,
        ValueError,
        "source_model_loss.*NaN or inf in 1 item",
        source_model_loss=clean,
        source_model_loss_with_reconstruction=recon,
        source_model_loss_with_zero_ablation=zero,
    )
    want_0 = _score_loop_reference(
        *(x[:, 0].numpy() for x in (clean, recon, zero)), np.zeros(6), 1, "ratio_of_sums"
    )
    for wide in (True, False):
        metric = ReconstructionScore(num_components=2, nan_strategy="propagate")
        if wide:
            metric.update(clean, recon, zero)
        else:  # [N] losses with mixed components in one batch: the NaN must not leak into component 0
            idx = torch.arange(12) % 2
            flat = [x.reshape(-1) for x in (clean, recon, zero)]
            metric.update(*flat, component_idx=idx)
        score = metric.compute()
        assert metric.nonfinite_count.item() == 0
        assert score[0].item() == pytest.approx(want_0[0], rel=1e-12) and math.isnan(score[1].item())


@pytest.mark.parametrize("num_components", [1, 2])
def test_score_stderr_keeps_the_collection_key(num_components: int) -> None:
    clean, recon, zero = _score_data(torch.Generator().manual_seed(11), 9, num_components)
    col = ms.suite(
        "reconstruction",
        reconstruction_score={
            "num_components": num_components,
            "reduction": "itemwise_mean",
            "with_stderr": True,
        },
        changed_tokens=False,
        downstream=False,
    )
    col.update(
        source_model_loss=clean,
        source_model_loss_with_reconstruction=recon,
        source_model_loss_with_zero_ablation=zero,
    )
    out = col.compute()
    ratios = ((zero - recon) / (zero - clean)).numpy()
    prefix = "reconstruction/reconstruction_score"
    suffixes = [""] if num_components == 1 else [f"/component_{c}" for c in range(num_components)]
    assert set(out) == {
        f"{prefix}/nonfinite_count",
        *(f"{prefix}{s}" for s in suffixes),  # the same keys as without stderr
        *(f"{prefix}/stderr{s}" for s in suffixes),
    }
    for c, s in enumerate(suffixes):
        assert out[f"{prefix}{s}"].item() == pytest.approx(ratios[:, c].mean(), rel=1e-12)
        stderr = out[f"{prefix}/stderr{s}"].item()
        assert stderr == pytest.approx(scipy.stats.sem(ratios[:, c]), rel=1e-9)
    plain = ReconstructionScore(num_components=num_components, reduction="itemwise_mean")
    plain.update(clean, recon, zero)
    value = col["reconstruction/reconstruction_score"].compute()
    assert set(value) == {"reconstruction_score", "reconstruction_score_stderr"}
    torch.testing.assert_close(value["reconstruction_score"], plain.compute(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"with_stderr.*itemwise_mean"):
        ReconstructionScore(with_stderr=True)


def test_score_itemwise_leaves_out_items_without_gap() -> None:
    metric = ReconstructionScore(reduction="itemwise_mean")
    # item 2 has l_zero == l: its ratio is undefined and left out -> mean of 0.5 and 0.25
    metric.update(torch.tensor([1.0, 1.0, 3.0]), torch.tensor([2.0, 2.5, 9.0]), torch.tensor([3.0, 3.0, 3.0]))
    assert metric.compute().item() == pytest.approx((0.5 + 0.25) / 2)


def test_score_no_data_is_nan() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(ReconstructionScore().compute().item())


def test_score_bad_input_leaves_state_unchanged() -> None:
    clean, recon, zero = _score_data(torch.Generator().manual_seed(3), 6, 2)
    metric = ReconstructionScore(num_components=2)
    metric.update(clean, recon, zero)
    _assert_rejected(
        metric,
        ValueError,
        "source_model_loss_with_reconstruction",
        source_model_loss=clean,
        source_model_loss_with_reconstruction=recon[:5],
        source_model_loss_with_zero_ablation=zero,
    )
    _assert_rejected(
        metric,
        TypeError,
        "floating",
        source_model_loss=clean,
        source_model_loss_with_reconstruction=recon,
        source_model_loss_with_zero_ablation=zero.long(),
    )
    _assert_rejected(
        metric,
        ValueError,
        "component_idx",
        source_model_loss=clean[:, 0],
        source_model_loss_with_reconstruction=recon[:, 0],
        source_model_loss_with_zero_ablation=zero[:, 0],
        component_idx=torch.full((6,), 2),
    )
    with pytest.raises(ValueError):
        ReconstructionScore(num_components=0)
    with pytest.raises(ValueError):
        ReconstructionScore(reduction="mean")


# ====================================================================================== ChangedTokenRate
def test_changed_tokens_design_example() -> None:
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    rec = torch.tensor([[1, 2, 3], [1, 2, 6]])
    mask = torch.tensor([[True, False, True], [True, True, True]])
    per_sequence = percentage_changed_ids(ids, rec, mask)
    np.testing.assert_allclose(per_sequence.numpy(), [0.0, 2 / 3])
    metric = ChangedTokenRate()
    metric.update(ids, rec, mask)
    out = metric.compute()
    assert out["sequence_mean"].item() == pytest.approx(1 / 3)
    assert out["token_rate"].item() == pytest.approx(2 / 5)
    functional = changed_token_rate(ids, rec, mask)
    assert functional.keys() == out.keys()
    for key in out:
        assert functional[key].item() == pytest.approx(out[key].item())


def _loop_reference(ids: np.ndarray, rec: np.ndarray, mask: np.ndarray) -> tuple[list[float], float]:
    rates, changed, selected = [], 0, 0
    for b in range(ids.shape[0]):
        n_sel = n_chg = 0
        for t in range(ids.shape[1]):
            if mask[b, t]:
                n_sel += 1
                n_chg += int(ids[b, t] != rec[b, t])
        if n_sel:
            rates.append(n_chg / n_sel)
        changed += n_chg
        selected += n_sel
    return rates, changed / selected


def test_changed_tokens_streamed_vs_loop(device: torch.device) -> None:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 8, (30, 7), generator=g)
    rec = torch.where(torch.rand(30, 7, generator=g) < 0.3, torch.randint(0, 8, (30, 7), generator=g), ids)
    mask = (torch.rand(30, 7, generator=g) < 0.5).to(torch.int32)  # 0/1 integers are accepted
    mask[:4] = 0  # sequences without selected tokens are left out of sequence_mean
    rates, token_rate = _loop_reference(ids.numpy(), rec.numpy(), mask.numpy())
    ids, rec, mask = to_device((ids, rec, mask), device)
    metric = ChangedTokenRate(with_stderr=True).to(device)
    for part in _split(30, [1, 11, 0, 18]):
        metric.update(ids[part], rec[part], mask[part])
    out = metric.compute()
    assert out["sequence_mean"].item() == pytest.approx(np.mean(rates), rel=1e-12)
    assert out["token_rate"].item() == pytest.approx(token_rate, rel=1e-12)
    want_stderr = np.std(rates, ddof=1) / np.sqrt(len(rates))
    assert out["sequence_mean_stderr"].item() == pytest.approx(want_stderr, rel=1e-9)
    # the two statistics weight sequences differently: this data tells them apart
    assert abs(out["sequence_mean"].item() - out["token_rate"].item()) > 1e-3


def test_changed_tokens_default_mask_and_empty() -> None:
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    rec = torch.tensor([[1, 0, 3, 4], [0, 0, 0, 8]])
    metric = ChangedTokenRate()
    metric.update(ids, rec)
    out = metric.compute()
    assert out["sequence_mean"].item() == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert out["token_rate"].item() == pytest.approx(4 / 8)
    none_selected = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.isnan(percentage_changed_ids(ids, rec, none_selected)).all()
    empty = ChangedTokenRate()
    empty.update(ids, rec, none_selected)
    assert all(math.isnan(v.item()) for v in empty.compute().values())


def test_changed_tokens_broadcast_mask_vs_loop(device: torch.device) -> None:
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, 5, (6, 4), generator=g)
    rec = torch.where(torch.rand(6, 4, generator=g) < 0.4, torch.randint(0, 5, (6, 4), generator=g), ids)
    per_token = torch.tensor([True, False, True, True])
    per_sequence = torch.tensor([[1], [0], [1], [1], [0], [1]], dtype=torch.uint8)
    for mask in (per_token, per_sequence, torch.tensor(True)):
        full = np.broadcast_to(mask.numpy(), (6, 4))
        rates, token_rate = _loop_reference(ids.numpy(), rec.numpy(), full)
        inputs = to_device((ids, rec, mask), device)
        metric = ChangedTokenRate().to(device)
        metric.update(*inputs)
        out = metric.compute()
        assert out["sequence_mean"].item() == pytest.approx(np.mean(rates), rel=1e-12)
        assert out["token_rate"].item() == pytest.approx(token_rate, rel=1e-12)
        per_sequence_rates = percentage_changed_ids(*inputs).cpu().numpy()
        np.testing.assert_allclose(per_sequence_rates[full.any(1)], rates, rtol=1e-12)


def test_changed_tokens_and_noise_in_one_collection_share_a_token_mask() -> None:
    g = torch.Generator().manual_seed(13)
    x, ids = torch.randn(2, 3, 4, generator=g), torch.tensor([[1, 2, 3], [4, 5, 6]])
    col = ms.suite("reconstruction", "noise", reconstruction_score=False)
    mask = torch.tensor([True, False, True])  # [T]: NoiseStatistics and ChangedTokenRate both take it
    col.update(input=x, mean=x, noise=x, input_ids=ids, reconstructed_ids=ids.flip(1), noise_mask=mask)
    out = col.compute()
    # selected tokens: positions 0 and 2 of each sequence; flipping changes both of them
    assert out["reconstruction/changed_tokens/token_rate"].item() == 1.0
    assert out["noise/noise/input_norm"].item() == pytest.approx(x[:, [0, 2]].norm(dim=-1).mean().item())


def test_changed_tokens_bad_input() -> None:
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    metric = ChangedTokenRate()
    metric.update(ids, ids.flip(1))
    _assert_rejected(
        metric,
        ValueError,
        r"reconstructed_ids.*\[2, 3\].*\[2, 2\]",
        input_ids=ids,
        reconstructed_ids=ids[:, :2],
    )
    _assert_rejected(metric, TypeError, "input_ids", input_ids=ids.float(), reconstructed_ids=ids)
    _assert_rejected(metric, ValueError, "input_ids.*2-d", input_ids=ids[0], reconstructed_ids=ids[0])
    _assert_rejected(
        metric,
        ValueError,
        r"noise_mask.*broadcast.*\[2, 3\].*\[2\]",
        input_ids=ids,
        reconstructed_ids=ids,
        noise_mask=torch.ones(2, dtype=torch.bool),
    )
    _assert_rejected(
        metric,
        ValueError,
        "noise_mask.*0 and 1",
        input_ids=ids,
        reconstructed_ids=ids,
        noise_mask=torch.full((2, 3), 2),
    )


# ====================================================================================== ActivationReconstruction
def _activation_reference(rec: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """float64 numpy reference over rows of [n, D] arrays."""
    rec, target = rec.astype(np.float64), target.astype(np.float64)
    err = ((rec - target) ** 2).sum(1)
    centred = target - target.mean(0)
    total_variance = (centred**2).sum()
    norms = np.linalg.norm(rec, axis=1) * np.linalg.norm(target, axis=1)
    valid = norms > 0
    cos = (rec * target).sum(1)[valid] / norms[valid]
    return {
        "mse": float(((rec - target) ** 2).mean(1).mean()),
        "normalized_mse": float(err.sum() / (target**2).sum()),
        "explained_variance": float(1 - err.sum() / total_variance) if total_variance > 0 else math.nan,
        "cosine_similarity": float(cos.mean()),
    }


def test_activations_hand_computed() -> None:
    target = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    rec = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
    # x̄ = (4/3, 1): Σ‖x − x̄‖² = 60/9; SSE = 2; Σ‖x‖² = 15
    want = {
        "mse": (0.5 + 0.5 + 0.0) / 3,
        "normalized_mse": 2 / 15,
        "explained_variance": 1 - 2 / (60 / 9),
        "cosine_similarity": (3 / math.sqrt(10) + 1 + 1) / 3,
        "l2_norm_in": (math.sqrt(5) + 3 + 1) / 3,
        "l2_norm_out": (math.sqrt(2) + 2 + 1) / 3,
        "l2_ratio": (math.sqrt(2 / 5) + 2 / 3 + 1) / 3,
        "relative_reconstruction_bias": (2 + 4 + 1) / (3 + 6 + 1),
    }
    metric = ActivationReconstruction(num_features=2)
    metric.update(rec, target)
    for out in (metric.compute(), activation_reconstruction(rec, target)):
        assert out.keys() == want.keys()
        for key, value in want.items():
            assert out[key].item() == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize("chunk_elements", [None, 40])
def test_activations_offset_data_streamed_vs_float64_numpy(
    chunk_elements: int | None, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    """Mean 1000, std 1: the variance is 1e-6 of Σ‖x‖², so float32 sums would lose it."""
    if chunk_elements is not None:  # many row chunks per update, including a ragged last one
        monkeypatch.setattr(functional_reconstruction, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(5)
    target = (1000.0 + torch.randn(997, 16, generator=g)).float()
    rec = (target + 0.3 * torch.randn(997, 16, generator=g)).float()
    want = _activation_reference(rec.numpy(), target.numpy())
    rec, target = to_device((rec, target), device)
    metric = ActivationReconstruction(num_features=16).to(device)
    for part in _split(997, [1, 300, 5, 0, 455, 236]):
        metric.update(rec[part], target[part])
    out = metric.compute()
    assert want["explained_variance"] == pytest.approx(1 - 0.09, abs=0.02)  # sanity of the data
    for key, value in want.items():
        assert out[key].item() == pytest.approx(value, rel=1e-6), key


def test_activations_mask_over_leading_shape_and_stderr(device: torch.device) -> None:
    g = torch.Generator().manual_seed(6)
    target = torch.randn(4, 5, 6, generator=g) * 3 + 1
    rec = target + torch.randn(4, 5, 6, generator=g)
    rec[0, 0] = 0.0  # a zero reconstruction: left out of the cosine only
    mask = torch.rand(4, 5, generator=g) < 0.6
    mask[0, 0] = True
    masked_out = ~mask
    rec[masked_out] = float("nan")  # masked-out vectors never reach the sums
    metric = ActivationReconstruction(num_features=6, with_stderr=True).to(device)
    metric.update(
        *to_device((rec.half().float(), target, mask), device)
    )  # any float dtype; exact values here
    sel_rec, sel_target = rec.half().float()[mask].numpy(), target[mask].numpy()
    want = _activation_reference(sel_rec, sel_target)
    out = metric.compute()
    for key, value in want.items():
        assert out[key].item() == pytest.approx(value, rel=1e-9), key
    per_vector = ((sel_rec.astype(np.float64) - sel_target) ** 2).mean(1)
    assert out["mse_stderr"].item() == pytest.approx(per_vector.std(ddof=1) / np.sqrt(len(per_vector)))
    assert metric.nonfinite_count.item() == 0


def test_activations_single_vector_nonfinite_and_degenerate() -> None:
    metric = ActivationReconstruction(num_features=3)
    metric.update(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))  # one [D] vector
    bad = torch.tensor([[float("nan"), 0.0, 0.0], [1.0, 1.0, 1.0]])
    metric.update(bad, torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    assert metric.nonfinite_count.item() == 1
    with pytest.warns(UserWarning, match="skipped 1 item"):
        out = metric.compute()
    want = _activation_reference(
        np.array([[1.0, 2.0, 2.0], [1.0, 1.0, 1.0]]), np.array([[1.0, 2, 3], [1, 2, 3]])
    )
    # identical targets: zero variance -> explained variance is NaN, never inf
    assert math.isnan(out["explained_variance"].item())
    for key in ("mse", "normalized_mse", "cosine_similarity"):
        assert out[key].item() == pytest.approx(want[key], rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(math.isnan(v.item()) for v in ActivationReconstruction(num_features=3).compute().values())


def test_activations_constant_target_streamed_is_nan_not_a_huge_score() -> None:
    metric = ActivationReconstruction(num_features=3)
    target = torch.full((7, 3), 0.1, dtype=torch.float64)  # 0.1 is not exact: sums round
    for part in _split(7, [2, 3, 2]):
        metric.update(target[part] + 0.01, target[part])
    out = metric.compute()
    assert math.isnan(out["explained_variance"].item())
    assert out["mse"].item() == pytest.approx(1e-4)
    # a small but real variance (7e-11 of Σ‖x‖²) is still resolved
    spread = ActivationReconstruction(num_features=1)
    values = torch.tensor([[1000.0], [1000.0 + 1e-2], [1000.0 - 1e-2]], dtype=torch.float64)
    spread.update(values + torch.tensor([[1e-3], [0.0], [0.0]], dtype=torch.float64), values)
    assert spread.compute()["explained_variance"].item() == pytest.approx(1 - 1e-6 / 2e-4, rel=1e-6)


@pytest.mark.parametrize("scale", [1e-6, 1e-14, 1e-17, 1e-30])
def test_activations_cosine_of_a_tiny_reconstruction(scale: float) -> None:
    """‖x̂‖ ≪ ‖x‖: the cosine from the norms by polarisation would cancel to 0."""
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0]])
    rec = torch.tensor([[1.0, 1.0, 0.0, 0.0], [3.0, -1.0, 0.5, 0.0]]) * scale
    want = _activation_reference(rec.numpy(), target.numpy())["cosine_similarity"]
    assert want == pytest.approx((1 / math.sqrt(2) - 2 / math.sqrt(10.25 * 5)) / 2)  # hand-computed
    metric = ActivationReconstruction(num_features=4)
    metric.update(rec, target)
    for out in (metric.compute(), activation_reconstruction(rec, target)):
        assert out["cosine_similarity"].item() == pytest.approx(want, rel=1e-12)


def test_activations_bad_input() -> None:
    x = torch.randn(2, 3, 4)
    metric = ActivationReconstruction(num_features=4)
    metric.update(x, x + 1)
    _assert_rejected(
        metric,
        ValueError,
        r"target.*\[\.\.\., 4\].*\[2, 3, 5\]",
        reconstruction=torch.randn(2, 3, 5),
        target=torch.randn(2, 3, 5),
    )
    _assert_rejected(metric, ValueError, "reconstruction.*same shape", reconstruction=x[:1], target=x)
    _assert_rejected(metric, TypeError, "target", reconstruction=x, target=x.long())
    _assert_rejected(
        metric,
        ValueError,
        r"mask.*\[2, 3\]",
        reconstruction=x,
        target=x,
        mask=torch.ones(2, 4, dtype=torch.bool),
    )
    with pytest.raises(ValueError):
        ActivationReconstruction(num_features=0)


# ====================================================================================== FeatureSparsity
def _sparse_acts(g: torch.Generator, n: int, f: int) -> torch.Tensor:
    rates = 0.5 ** torch.arange(float(f))
    fires = torch.rand(n, f, generator=g) < rates
    return torch.where(fires, torch.randn(n, f, generator=g), 0.0)


def _sparsity_reference(
    acts: np.ndarray, thresholds: tuple[float, ...], edges: np.ndarray
) -> dict[str, object]:
    fires = acts != 0
    freq = fires.mean(0)
    out: dict[str, object] = {"l0": fires.sum(1).mean(), "l1": np.abs(acts).sum(1).mean()}
    for thr in thresholds:
        out[f"dead_fraction@{thr:g}"] = (freq <= thr).mean()
    counts, _ = np.histogram(np.log10(freq[freq > 0]), bins=edges)
    out["density_histogram"] = np.concatenate([[np.sum(freq == 0)], counts])
    out["frequency"] = freq
    return out


@pytest.mark.parametrize("chunk_elements", [None, 40])
def test_sparsity_streamed_with_mask_vs_numpy(
    chunk_elements: int | None, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    if chunk_elements is not None:
        monkeypatch.setattr(functional_reconstruction, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(7)
    acts = _sparse_acts(g, 3 * 331, 16).reshape(331, 3, 16)
    mask = torch.rand(331, 3, generator=g) < 0.9
    thresholds = (0.0, 0.002, 0.01, 0.1)
    metric = FeatureSparsity(num_features=16, dead_thresholds=thresholds, with_stderr=True).to(device)
    on_device = to_device((acts, mask), device)
    for part in _split(331, [100, 1, 0, 230]):
        metric.update(on_device[0][part], on_device[1][part])
    edges = np.array(metric.density_edges_log10)
    want = _sparsity_reference(acts[mask].numpy().astype(np.float64), thresholds, edges)
    out = metric.compute()
    assert out["l0"].item() == pytest.approx(want["l0"], rel=1e-12)
    assert out["l1"].item() == pytest.approx(want["l1"], rel=1e-12)  # per-vector L1 in float64
    for thr in thresholds:
        assert out[f"dead_fraction@{thr:g}"].item() == pytest.approx(want[f"dead_fraction@{thr:g}"])
    np.testing.assert_array_equal(out["density_histogram"].cpu().numpy(), want["density_histogram"])
    np.testing.assert_allclose(metric.firing_frequency().cpu().numpy(), want["frequency"], rtol=1e-12)
    # the data spreads over several bins and thresholds, so the checks above can tell formulas apart
    assert (want["density_histogram"] > 0).sum() >= 4
    assert len({round(out[f"dead_fraction@{t:g}"].item(), 6) for t in thresholds}) >= 3
    l0_per_vector = (acts[mask] != 0).sum(1).double().numpy()
    assert out["l0_stderr"].item() == pytest.approx(l0_per_vector.std(ddof=1) / np.sqrt(len(l0_per_vector)))
    functional = feature_sparsity(*on_device, dead_thresholds=thresholds)
    for key, value in functional.items():
        torch.testing.assert_close(value, out[key], rtol=1e-12, atol=0)


def test_sparsity_histogram_bins_at_decade_edges() -> None:
    n = 1000
    acts = torch.zeros(n, 6)
    for feature, count in enumerate([0, 1, 10, 100, 999, 1000]):
        acts[:count, feature] = 1.0
    metric = FeatureSparsity(num_features=6)
    metric.update(acts)
    # densities 0, 1e-3, 1e-2, 1e-1, 0.999, 1: bins are [a, b), the last one [-1, 0] closed
    want = [1, 0, 0, 0, 0, 0, 1, 1, 3]
    assert metric.compute()["density_histogram"].tolist() == want


def test_sparsity_merged_states_feature_firing_on_one_rank_is_not_dead() -> None:
    g = torch.Generator().manual_seed(8)
    first = _sparse_acts(g, 200, 8)
    first[:, 5] = 0.0  # feature 5 never fires on "rank 0"
    second = _sparse_acts(g, 150, 8)
    second[:, 5] = 0.0
    second[17, 5] = 2.5  # ... and exactly once on "rank 1"
    rank0, rank1 = FeatureSparsity(num_features=8), FeatureSparsity(num_features=8)
    rank0.update(first)
    rank1.update(second)
    assert rank0.firing_frequency()[5].item() == 0.0
    merged = FeatureSparsity(num_features=8)
    for name, _ in merged.state_items():
        setattr(merged, name, getattr(rank0, name) + getattr(rank1, name))
    one_pass = FeatureSparsity(num_features=8)
    one_pass.update(torch.cat([first, second]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*called before the ``update``")  # states set directly
        out = merged.compute()
    want = one_pass.compute()
    assert out.keys() == want.keys()
    for key in out:
        torch.testing.assert_close(out[key], want[key], rtol=1e-12, atol=0)
    assert merged.firing_frequency()[5].item() == pytest.approx(1 / 350)
    assert merged.firing_frequency()[5].item() > 0
    dead_0 = rank0.compute()["dead_fraction@0"].item()
    assert out["dead_fraction@0"].item() == pytest.approx(dead_0 - 1 / 8)


def test_sparsity_collection_keys_flatten_to_scalars() -> None:
    col = ms.suite(
        "reconstruction",
        feature_sparsity={"num_features": 4},
        reconstruction_score=False,
        changed_tokens=False,
    )
    col.update(feature_activations=torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0]]))
    out = col.compute()
    prefix = "reconstruction/feature_sparsity/"
    assert {
        f"{prefix}dead_fraction@0",
        f"{prefix}dead_fraction@1e-06",
        f"{prefix}dead_fraction@1e-05",
    } <= out.keys()
    bins = [out[f"{prefix}density_histogram/bin_{i}"].item() for i in range(9)]
    assert bins == [2, 0, 0, 0, 0, 0, 0, 0, 2]  # features 0, 2 never fire; densities 1 and 0.5
    assert all(v.ndim == 0 for v in out.values())


def test_sparsity_constructor_and_bad_input() -> None:
    with pytest.raises(ValueError, match="dead_thresholds"):
        FeatureSparsity(num_features=4, dead_thresholds=(1e-6, 0.000001))
    with pytest.raises(ValueError):
        FeatureSparsity(num_features=4, dead_thresholds=(1.5,))
    with pytest.raises(ValueError):
        FeatureSparsity(num_features=-1)
    acts = torch.rand(3, 4)
    metric = FeatureSparsity(num_features=4)
    metric.update(acts)
    _assert_rejected(
        metric, ValueError, r"feature_activations.*\[\.\.\., 4\]", feature_activations=torch.rand(3, 5)
    )
    _assert_rejected(metric, TypeError, "feature_activations", feature_activations=acts.long())
    _assert_rejected(
        metric, ValueError, r"mask.*\[3\]", feature_activations=acts, mask=torch.ones(4, dtype=torch.bool)
    )
    metric.update(torch.tensor([[float("inf"), 0.0, 0.0, 0.0]]))
    assert metric.nonfinite_count.item() == 1
    assert metric.vector_count.item() == 3


def test_feature_sparsity_large_finite_activations_are_finite() -> None:
    # a float32 L1 of three 3e38 values overflows; the activations themselves are finite
    acts = torch.full((2, 3), 3e38)
    metric = FeatureSparsity(num_features=3)
    metric.update(acts)
    out = metric.compute()
    assert metric.nonfinite_count.item() == 0
    assert out["l1"].item() == pytest.approx(3 * float(torch.tensor(3e38)), rel=1e-15)
    assert out["l0"].item() == 3.0
    acts[1, 2] = float("nan")
    skipping = FeatureSparsity(num_features=3)
    with pytest.warns(UserWarning, match="skipped 1 item"):
        skipping.update(acts)
        assert skipping.compute()["l1"].item() == pytest.approx(3 * float(torch.tensor(3e38)), rel=1e-15)


# ---------------------------------------------------------------------------------- norms and firing threshold
def test_activation_norm_statistics_vs_numpy_and_sharding(device: torch.device) -> None:
    g = torch.Generator().manual_seed(11)
    target = torch.randn(40, 6, generator=g, dtype=torch.float64) * 2.0 + 0.3
    target[3] = 0.0  # a zero target: left out of l2_ratio only
    reconstruction = 0.8 * target + 0.3 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(40, generator=g) < 0.8
    mask[3] = True
    x, x_hat = target[mask].numpy(), reconstruction[mask].numpy()
    n_in, n_out = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
    nz = n_in > 0
    expected = {
        "l2_norm_in": n_in.mean(),
        "l2_norm_out": n_out.mean(),
        "l2_ratio": (n_out[nz] / n_in[nz]).mean(),
        "relative_reconstruction_bias": (n_out**2).sum() / (x * x_hat).sum(),
    }
    assert np.isfinite(expected["l2_ratio"]) and nz.sum() == len(nz) - 1
    reconstruction, target, mask = to_device((reconstruction, target, mask), device)
    metric = ActivationReconstruction(num_features=6).to(device)
    for rows in _split(40, [7, 20, 13]):
        metric.update(reconstruction[rows], target[rows], mask[rows])
    out = metric.compute()
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-12), key
    # the bias is a ratio of global sums, not the mean of per-batch ratios
    halves = [slice(0, 5), slice(5, 40)]
    per_batch = [
        functional_reconstruction.activation_reconstruction(reconstruction[h], target[h], mask[h])[
            "relative_reconstruction_bias"
        ].item()
        for h in halves
    ]
    assert abs(np.mean(per_batch) - expected["relative_reconstruction_bias"]) > 1e-4


def test_activation_norms_of_zero_targets_only_are_nan_ratio() -> None:
    metric = ActivationReconstruction(num_features=2)
    metric.update(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2))
    out = metric.compute()
    assert out["l2_norm_in"].item() == 0.0 and out["l2_norm_out"].item() == 1.0
    assert math.isnan(out["l2_ratio"].item()) and math.isnan(out["relative_reconstruction_bias"].item())


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_firing_threshold_vs_numpy(threshold: float, device: torch.device) -> None:
    g = torch.Generator().manual_seed(12)
    acts = torch.randn(30, 9, generator=g) * (torch.rand(30, 9, generator=g) < 0.4)
    acts[0, 0] = 0.5  # exactly at the threshold: does not fire
    acts[1, 1] = -0.7  # a signed activation fires on |a|
    metric = FeatureSparsity(num_features=9, dead_thresholds=(0.0, 0.1), firing_threshold=threshold).to(
        device
    )
    a = acts.numpy()
    acts = acts.to(device)
    for rows in _split(30, [11, 19]):
        metric.update(acts[rows])
    fires = np.abs(a) > threshold
    frequency = fires.mean(0)
    out = metric.compute()
    assert out["l0"].item() == pytest.approx(fires.sum(1).mean(), rel=1e-12)
    assert out["l1"].item() == pytest.approx(np.abs(a).sum(1).mean(), rel=1e-6)
    assert out["dead_fraction@0.1"].item() == pytest.approx((frequency <= 0.1).mean(), rel=1e-12)
    assert metric.firing_frequency().cpu().numpy() == pytest.approx(frequency, rel=1e-12)
    functional = functional_reconstruction.feature_sparsity(acts, firing_threshold=threshold)
    assert functional["l0"].item() == pytest.approx(fires.sum(1).mean(), rel=1e-12)


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan, "0.5", True])
def test_firing_threshold_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValueError, match="firing_threshold"):
        FeatureSparsity(num_features=3, firing_threshold=bad)
