"""Conformance examples of the reconstruction suite: losses, token ids, activation vectors, feature activations.

Each ``UPPER_CASE`` constant is the [`ConformanceExample`][metrics_suite.conformance.ConformanceExample] that
[`metrics_suite.reconstruction`][metrics_suite.reconstruction] registers with the metric of that registry name; the conformance kit
(``tests/test_conformance.py``) builds random batches and invalid inputs from it.
"""

from __future__ import annotations

from typing import Any

import torch

from metrics_suite.conformance import ConformanceExample


def _score_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    clean = torch.rand(n, 2, generator=g) + 1.0
    zero = clean + 1.0 + torch.rand(n, 2, generator=g)
    recon = clean + (zero - clean) * torch.rand(n, 2, generator=g)
    return {
        "source_model_loss": clean,
        "source_model_loss_with_reconstruction": recon,
        "source_model_loss_with_zero_ablation": zero,
    }


def _score_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _score_batch(g, 4)
    return [
        {**good, "source_model_loss_with_reconstruction": good["source_model_loss"][:3]},  # N mismatch
        {**good, "source_model_loss": good["source_model_loss"][:, :1]},  # C mismatch
        {**good, "source_model_loss_with_zero_ablation": good["source_model_loss"].long()},  # dtype
        {k: v[:, 0] for k, v in good.items()},  # [N] without component_idx
    ]


def _changed_tokens_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    input_ids = torch.randint(0, 20, (n, 6), generator=g)
    change = torch.rand(n, 6, generator=g) < 0.4
    reconstructed_ids = torch.where(change, torch.randint(0, 20, (n, 6), generator=g), input_ids)
    noise_mask = torch.rand(n, 6, generator=g) < 0.7
    noise_mask[:, 0] &= torch.rand(n, generator=g) < 0.5  # some sequences select nothing at all
    noise_mask[torch.rand(n, generator=g) < 0.2] = False
    return {"input_ids": input_ids, "reconstructed_ids": reconstructed_ids, "noise_mask": noise_mask}


def _changed_tokens_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _changed_tokens_batch(g, 4)
    return [
        {**good, "reconstructed_ids": good["reconstructed_ids"][:, :5]},  # T mismatch
        {**good, "input_ids": good["input_ids"].float()},  # dtype
        {**good, "noise_mask": good["noise_mask"][:3]},  # mask shape
        {**good, "noise_mask": good["noise_mask"].long() * 2},  # mask values
        {k: v[0] for k, v in good.items()},  # 1-d
    ]


def _activation_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    # [n, T=2, C=3, D=8]: three components (e.g. SAEs at three layers) at once, signed activations
    # whose offset and reconstruction quality differ per component, a mask that varies per vector
    offset = torch.tensor([0.5, -1.5, 3.0])[:, None]
    target = torch.randn(n, 2, 3, 8, generator=g) * 2.0 + offset
    noise = torch.tensor([0.2, 0.7, 1.5])[:, None]
    reconstruction = target + noise * torch.randn(n, 2, 3, 8, generator=g)
    mask = torch.rand(n, 2, 3, generator=g) < 0.8
    return {"reconstruction": reconstruction, "target": target, "mask": mask}


def _activation_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _activation_batch(g, 4)
    one = {"reconstruction": good["reconstruction"][:, :, 0], "target": good["target"][:, :, 0]}
    return [
        {**good, "reconstruction": good["reconstruction"][..., :7]},  # D mismatch
        {**good, "target": good["target"][..., :7], "reconstruction": good["reconstruction"][..., :7]},  # D
        {**good, "target": good["target"].long()},  # dtype
        {**good, "mask": good["mask"][:, :, :2]},  # mask shape
        {**good, "mask": good["mask"].float()},  # mask dtype
        {k: v[:, :, :2] for k, v in good.items()},  # C mismatch
        one,  # one component's [..., D] without component_idx
        {**one, "component_idx": 3},  # component_idx out of range
        {**one, "component_idx": -1},
        {**one, "component_idx": 1.0},  # not an int
        {**one, "component_idx": torch.tensor([0, 1, 2, 0])},  # one index per update
    ]


def _sparsity_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    # [n, C=2, F=12]: feature f of component c fires with probability ~ (0.6, 0.4)[c]**f (a spread
    # of densities, rare features, the last never fires); signed activations; a per-vector mask
    rates = torch.tensor([0.6, 0.4])[:, None] ** torch.arange(12.0)
    rates[:, -1] = 0.0
    fires = torch.rand(n, 2, 12, generator=g) < rates
    feature_activations = torch.where(fires, torch.randn(n, 2, 12, generator=g) * 3.0, 0.0)
    mask = torch.rand(n, 2, generator=g) < 0.85
    return {"feature_activations": feature_activations, "mask": mask}


def _sparsity_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _sparsity_batch(g, 4)
    one = good["feature_activations"][:, 0]
    return [
        {**good, "feature_activations": good["feature_activations"][..., :11]},  # F mismatch
        {**good, "feature_activations": good["feature_activations"].long()},  # dtype
        {**good, "mask": good["mask"][:, :1]},  # mask shape
        {"feature_activations": good["feature_activations"][0, 0, 0]},  # 0-d
        {"feature_activations": torch.cat([good["feature_activations"]] * 2, 1)},  # C mismatch
        {"feature_activations": one},  # one component's [..., F] without component_idx
        {"feature_activations": one, "component_idx": 2},  # component_idx out of range
        {"feature_activations": one, "component_idx": True},  # not an int
    ]


def _downstream_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    clean_logits = torch.randn(n, 5, 11, generator=g) * 2.0
    spliced_logits = clean_logits + 0.5 * torch.randn(n, 5, 11, generator=g)
    ablated_logits = 0.3 * clean_logits + torch.randn(n, 5, 11, generator=g)
    target_ids = torch.randint(0, 11, (n, 5), generator=g)
    target_ids[torch.rand(n, 5, generator=g) < 0.2] = -100
    attention_mask = torch.rand(n, 5, generator=g) < 0.8
    return {
        "clean_logits": clean_logits,
        "spliced_logits": spliced_logits,
        "ablated_logits": ablated_logits,
        "target_ids": target_ids,
        "attention_mask": attention_mask,
    }


def _downstream_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _downstream_batch(g, 3)
    out_of_range = good["target_ids"].clone()
    out_of_range[good["attention_mask"]] = 11
    return [
        {**good, "spliced_logits": good["spliced_logits"][..., :10]},  # V mismatch
        {**good, "ablated_logits": good["ablated_logits"][:, :4]},  # T mismatch
        {**good, "clean_logits": good["clean_logits"].long()},  # dtype
        {**good, "target_ids": good["target_ids"].float()},  # target dtype
        {**good, "target_ids": good["target_ids"][:, :4]},  # target shape
        {**good, "target_ids": out_of_range},  # target id outside the vocabulary
        {**good, "attention_mask": good["attention_mask"][:, :4]},  # mask shape
        {k: v[0] for k, v in good.items()},  # 2-d logits
    ]


RECONSTRUCTION_SCORE = ConformanceExample(
    make_batch=_score_batch, bad_inputs=_score_bad, init_kwargs={"num_components": 2}
)

CHANGED_TOKENS = ConformanceExample(make_batch=_changed_tokens_batch, bad_inputs=_changed_tokens_bad)

ACTIVATIONS = ConformanceExample(
    make_batch=_activation_batch,
    bad_inputs=_activation_bad,
    init_kwargs={"num_features": 8, "num_components": 3},
)

FEATURE_SPARSITY = ConformanceExample(
    make_batch=_sparsity_batch,
    bad_inputs=_sparsity_bad,
    init_kwargs={"num_features": 12, "dead_thresholds": (0.0, 0.01, 0.1), "num_components": 2},
)

DOWNSTREAM = ConformanceExample(
    make_batch=_downstream_batch,
    bad_inputs=_downstream_bad,
    init_kwargs={"num_logits": 4, "ignore_index": -100, "max_sequence_length": 2},
)
