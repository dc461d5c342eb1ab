"""DownstreamReconstruction against full-tensor torch references (the SAELens-style computation)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import metrics_suite as ms
from metrics_suite import DownstreamReconstruction, ReconstructionScore
from metrics_suite.functional import top_k_support_mask
from metrics_suite.functional.reconstruction import downstream_reconstruction


def _data(g: torch.Generator, b: int = 3, t: int = 7, v: int = 50, dtype: torch.dtype = torch.float64):
    clean = torch.randn(b, t, v, generator=g, dtype=dtype) * 2.0
    spliced = clean + 0.5 * torch.randn(b, t, v, generator=g, dtype=dtype)
    ablated = 0.3 * clean + torch.randn(b, t, v, generator=g, dtype=dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[torch.rand(b, t, generator=g) < 0.2] = -100
    mask = torch.rand(b, t, generator=g) < 0.8
    return clean, spliced, ablated, targets, mask


def _reference(clean, spliced, ablated, targets, mask, num_logits=None, ignore_index=-100):
    """Three full log_softmax tensors, F.kl_div and F.cross_entropy, then ratios of masked sums."""
    clean, spliced, ablated = (x.to(torch.float64) for x in (clean, spliced, ablated))
    kls = []
    for other in (spliced, ablated):
        c, o = clean, other
        if num_logits is not None:
            outside = ~top_k_support_mask(o, c, num_logits)
            c, o = c.masked_fill(outside, -math.inf), o.masked_fill(outside, -math.inf)
        lp, lq = F.log_softmax(c, -1), F.log_softmax(o, -1)
        terms = F.kl_div(lq, lp, log_target=True, reduction="none")
        kls.append(torch.where(lp > -math.inf, terms, 0.0).sum(-1))
    ces = [
        F.cross_entropy(x.transpose(1, 2), targets, ignore_index=ignore_index, reduction="none")
        for x in (clean, spliced, ablated)
    ]
    counted = mask & (targets != ignore_index)
    s_kl = [k[mask].sum() for k in kls]
    s_ce = [c[counted].sum() for c in ces]
    n, n_ce = mask.sum(), counted.sum()
    agree = (clean.argmax(-1) == spliced.argmax(-1))[mask].double().sum()
    return {
        "kl_spliced": s_kl[0] / n,
        "kl_ablated": s_kl[1] / n,
        "kl_score": (s_kl[1] - s_kl[0]) / s_kl[1],
        "top1_agreement": agree / n,
        "ce_clean": s_ce[0] / n_ce,
        "ce_spliced": s_ce[1] / n_ce,
        "ce_ablated": s_ce[2] / n_ce,
        "ce_score": (s_ce[2] - s_ce[1]) / (s_ce[2] - s_ce[0]),
    }


def _assert_close(out: dict, ref: dict, rtol: float) -> None:
    assert list(out) == list(ref)
    for k in ref:
        assert out[k].item() == pytest.approx(ref[k].item(), rel=rtol, abs=1e-12), k


@pytest.mark.parametrize("num_logits", [None, 5])
def test_matches_full_tensor_reference_across_batches_and_chunks(num_logits: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [_data(g, b=b) for b in (3, 1, 4)]
    metric = DownstreamReconstruction(num_logits=num_logits, ignore_index=-100, max_sequence_length=3)
    for clean, spliced, ablated, targets, mask in batches:
        metric.update(clean, spliced, ablated, targets, mask)
    joined = [torch.cat(parts) for parts in zip(*batches)]
    _assert_close(metric.compute(), _reference(*joined, num_logits=num_logits), 1e-10)
    # the functional form over the joined batch, at the default chunk size
    _assert_close(
        downstream_reconstruction(*joined, num_logits=num_logits, ignore_index=-100),
        _reference(*joined, num_logits=num_logits),
        1e-10,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_match_the_float64_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    clean, spliced, ablated, targets, mask = _data(g, dtype=dtype)
    metric = DownstreamReconstruction(ignore_index=-100)
    metric.update(clean, spliced, ablated, targets, mask)
    _assert_close(metric.compute(), _reference(clean, spliced, ablated, targets, mask), 1e-5)


def test_ce_score_equals_reconstruction_score_of_per_token_losses() -> None:
    g = torch.Generator().manual_seed(2)
    clean, spliced, ablated, targets, mask = _data(g)
    counted = mask & (targets != -100)
    losses = [
        F.cross_entropy(x.transpose(1, 2), targets, ignore_index=-100, reduction="none")[counted]
        for x in (clean, spliced, ablated)
    ]
    score = ReconstructionScore()
    score.update(*losses)
    metric = DownstreamReconstruction(ignore_index=-100)
    metric.update(clean, spliced, ablated, targets, mask)
    assert metric.compute()["ce_score"].item() == pytest.approx(score.compute().item(), rel=1e-12)


def test_ratio_of_sums_differs_from_mean_of_batch_ratios() -> None:
    g = torch.Generator().manual_seed(3)
    batches = [_data(g, b=1), _data(g, b=4)]
    metric = DownstreamReconstruction(ignore_index=-100)
    per_batch = []
    for batch in batches:
        per_batch.append(metric(*batch)["kl_score"].item())
    joined = [torch.cat(parts) for parts in zip(*batches)]
    global_score = metric.compute()["kl_score"].item()
    assert global_score == pytest.approx(_reference(*joined)["kl_score"].item(), rel=1e-10)
    assert abs(global_score - sum(per_batch) / 2) > 1e-3


def test_one_nan_position_drops_that_token_only() -> None:
    g = torch.Generator().manual_seed(4)
    clean, spliced, ablated, targets, mask = _data(g)
    mask[1, 2] = True
    poisoned = ablated.clone()
    poisoned[1, 2, 7] = math.nan
    metric = DownstreamReconstruction(ignore_index=-100)
    with pytest.warns(UserWarning, match="skipped 1 item"):
        metric.update(clean, spliced, poisoned, targets, mask)
        out = metric.compute()
    assert int(metric.nonfinite_count) == 1
    without = mask.clone()
    without[1, 2] = False
    _assert_close(out, _reference(clean, spliced, ablated, targets, without), 1e-10)


def test_minus_inf_logits() -> None:
    clean = torch.tensor([[[0.0, 1.0, -math.inf], [0.0, 1.0, 2.0]]])
    spliced = torch.tensor([[[0.0, 1.0, 5.0], [0.0, 1.0, -math.inf]]])
    ablated = torch.zeros(1, 2, 3)
    out = downstream_reconstruction(clean, spliced, ablated, target_ids=torch.tensor([[0, 1]]))
    # token 0: the clean −inf entry contributes 0; token 1: clean mass where spliced is −inf
    assert math.isinf(out["kl_spliced"].item())
    lp = F.log_softmax(clean[0, 0], -1)
    expected_abl = (lp[:2].exp() * (lp[:2] - math.log(1 / 3))).sum() + F.kl_div(
        torch.full((3,), math.log(1 / 3)), F.log_softmax(clean[0, 1], -1), log_target=True, reduction="sum"
    )
    assert out["kl_ablated"].item() == pytest.approx(expected_abl.item() / 2, rel=1e-6)


def test_without_targets_ce_is_nan_and_kl_still_counts() -> None:
    g = torch.Generator().manual_seed(5)
    clean, spliced, ablated, targets, mask = _data(g)
    metric = DownstreamReconstruction()
    metric.update(clean, spliced, ablated, attention_mask=mask)
    out = metric.compute()
    ref = _reference(clean, spliced, ablated, targets, mask)
    assert out["kl_score"].item() == pytest.approx(ref["kl_score"].item(), rel=1e-10)
    assert all(math.isnan(out[k].item()) for k in ("ce_clean", "ce_spliced", "ce_ablated", "ce_score"))


def test_registered_in_the_reconstruction_suite() -> None:
    g = torch.Generator().manual_seed(6)
    clean, spliced, ablated, targets, mask = _data(g)
    col = ms.suite("reconstruction", downstream={"ignore_index": -100})
    col.update(
        clean_logits=clean,
        spliced_logits=spliced,
        ablated_logits=ablated,
        target_ids=targets,
        attention_mask=mask,
    )
    out = col.compute()
    ref = _reference(clean, spliced, ablated, targets, mask)
    assert out["reconstruction/downstream/ce_score"].item() == pytest.approx(
        ref["ce_score"].item(), rel=1e-10
    )


@pytest.mark.parametrize("num_logits", [None, 5])
def test_rows_read_in_place_leave_the_inputs_alone(num_logits: int | None) -> None:
    """Consecutive attended rows are read straight from the inputs (no copy): the inputs stay as they
    were, and the values equal those of strided inputs, which are always copied."""
    g = torch.Generator().manual_seed(5)
    clean, spliced, ablated, targets, _ = _data(g, dtype=torch.float32)
    before = [x.clone() for x in (clean, spliced, ablated)]
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False  # consecutive runs within a chunk, and a chunk with a gap
    direct = DownstreamReconstruction(num_logits=num_logits, ignore_index=-100, max_sequence_length=3)
    direct.update(clean, spliced, ablated, targets, mask)
    for x, original in zip((clean, spliced, ablated), before):
        assert torch.equal(x, original)
    strided = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in (clean, spliced, ablated)]
    copied = DownstreamReconstruction(num_logits=num_logits, ignore_index=-100, max_sequence_length=3)
    copied.update(*strided, targets, mask)
    expected = copied.compute()
    assert all(torch.equal(v, expected[k]) for k, v in direct.compute().items())
    _assert_close(expected, _reference(clean, spliced, ablated, targets, mask, num_logits=num_logits), 1e-5)
