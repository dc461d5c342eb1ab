"""Conformance examples of the utility suite: next-token logits with attention masks, targets, class predictions.

Each ``UPPER_CASE`` constant is the [`ConformanceExample`][metrics_suite.conformance.ConformanceExample] that
[`metrics_suite.utility`][metrics_suite.examples.utility] registers with the metric of that registry name; the conformance kit
(``tests/test_conformance.py``) builds random batches and invalid inputs from it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metrics_suite.conformance import ConformanceExample

_VOCAB = 37


_SEQ = 5


def _attention_mask(g: torch.Generator, n: int) -> Tensor:
    """Random attention mask ``[n, T]`` where about a quarter of the sequences are fully masked."""
    mask = torch.rand(n, _SEQ, generator=g) > 0.3
    mask[torch.rand(n, generator=g) < 0.25] = False
    return mask


def _divergence_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    # float64 logits: per-token values then agree to float64 rounding however the batch is chunked
    clean = 2.0 * torch.randn(n, _SEQ, _VOCAB, generator=g, dtype=torch.float64)
    noisy = clean + 0.7 * torch.randn(n, _SEQ, _VOCAB, generator=g, dtype=torch.float64)
    return {"clean_logits": clean, "noisy_logits": noisy, "attention_mask": _attention_mask(g, n)}


def _divergence_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _divergence_batch(g, 3)
    clean, noisy, mask = good["clean_logits"], good["noisy_logits"], good["attention_mask"]
    return [
        {**good, "noisy_logits": noisy[..., :-1]},  # vocabulary mismatch
        {**good, "noisy_logits": noisy[:2]},  # batch mismatch
        {**good, "attention_mask": mask[:, :-1]},  # mask shape
        {**good, "attention_mask": mask.to(torch.float32)},  # mask dtype
        {**good, "clean_logits": clean[0]},  # [T, V] instead of [B, T, V]
        {**good, "clean_logits": clean.to(torch.int64)},  # integer logits
    ]


def _cross_entropy_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    logits = 2.0 * torch.randn(n, _SEQ, _VOCAB, generator=g, dtype=torch.float64)
    target = torch.randint(0, _VOCAB, (n, _SEQ), generator=g)
    target[torch.rand(n, _SEQ, generator=g) < 0.2] = -100
    return {"logits": logits, "target_ids": target, "attention_mask": _attention_mask(g, n)}


def _cross_entropy_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _cross_entropy_batch(g, 3)
    out_of_vocab = good["target_ids"].clone()
    out_of_vocab[0, 0] = _VOCAB
    good["attention_mask"][0, 0] = True
    return [
        {**good, "target_ids": out_of_vocab},  # id >= V at an attended position
        {**good, "target_ids": good["target_ids"].to(torch.float32)},  # non-integer targets
        {**good, "target_ids": good["target_ids"][:, :-1]},  # target shape
        {**good, "attention_mask": good["attention_mask"][:2]},  # mask shape
        {**good, "logits": good["logits"][0]},  # [T, V] logits
    ]


def _prediction_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    original = torch.randint(0, 4, (n, 6), generator=g)
    changed = torch.rand(n, 6, generator=g) < 0.35
    modified = torch.where(changed, torch.randint(0, 4, (n, 6), generator=g), original)
    return {
        "original_preds": original,
        "modified_preds": modified,
        "mask": torch.rand(n, 6, generator=g) > 0.2,
    }


def _prediction_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _prediction_batch(g, 3)
    too_large = good["modified_preds"].clone()
    too_large[0, 0] = 4
    negative = good["original_preds"].clone()
    negative[1, 2] = -1
    good["mask"][0, 0] = good["mask"][1, 2] = True
    return [
        {**good, "modified_preds": too_large},  # class id >= num_classes
        {**good, "original_preds": negative},  # negative class id
        {**good, "original_preds": good["original_preds"].to(torch.float32)},  # non-integer preds
        {**good, "modified_preds": good["modified_preds"][:, :-1]},  # shape mismatch
        {**good, "mask": good["mask"][:2]},  # mask shape
    ]


NEXT_TOKEN = ConformanceExample(
    make_batch=_divergence_batch,
    bad_inputs=_divergence_bad,
    # quantiles on: the kit's sharding, DDP, merge and state_dict checks then cover the sketch state
    init_kwargs={"max_batch_size": 2, "max_sequence_length": 3, "quantiles": (0.5, 0.9, 0.99)},
)

CROSS_ENTROPY = ConformanceExample(
    make_batch=_cross_entropy_batch,
    bad_inputs=_cross_entropy_bad,
    init_kwargs={"ignore_index": -100, "max_sequence_length": 2},
)

PREDICTION_CHANGE = ConformanceExample(
    make_batch=_prediction_batch, bad_inputs=_prediction_bad, init_kwargs={"num_classes": 4}
)
