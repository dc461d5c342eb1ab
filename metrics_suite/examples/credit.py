"""Conformance examples of the credit suite: hidden states with a picklable quadratic loss, values, parameters.

Each ``UPPER_CASE`` constant is the [`ConformanceExample`][metrics_suite.conformance.ConformanceExample] that
[`metrics_suite.credit`][metrics_suite.credit] registers with the metric of that registry name; the conformance kit
(``tests/test_conformance.py``) builds random batches and invalid inputs from it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metrics_suite.conformance import ConformanceExample


class _QuadraticLoss:
    """Item-wise loss ½ Σ_j w_j (h_j − c_j)² (plus a cross term), picklable for spawned DDP workers."""

    def __init__(self, center: Tensor, scale: Tensor) -> None:
        self.center = center
        self.scale = scale

    def gradient(self, hidden: Tensor) -> Tensor:
        diff = hidden - self.center.to(hidden)
        return self.scale.to(hidden) * diff + 0.2 * diff.sum(-1, keepdim=True)

    def __call__(self, hidden: Tensor) -> Tensor:
        diff = hidden - self.center.to(hidden)
        return 0.5 * (self.scale.to(hidden) * diff.square()).sum(-1) + 0.1 * diff.sum(-1).square()


def _example_loss(dim: int = 6) -> _QuadraticLoss:
    return _QuadraticLoss(torch.linspace(-1.0, 1.0, dim, dtype=torch.float64), torch.linspace(0.5, 2.0, dim))


#: layers of the per-layer credit examples: each batch goes to a random one of them, so the kit sees
#: several layers filled (and one index off would move values to another layer)
_LAYERS = 3


def _layer(g: torch.Generator) -> int:
    return int(torch.randint(0, _LAYERS, (), generator=g))


def _credit_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    """Hidden states, a noisy gradient as credit, and the quadratic loss."""
    loss_fn = _example_loss()
    hidden = torch.randn(n, 6, generator=g, dtype=torch.float64)
    credit = loss_fn.gradient(hidden) + torch.randn(n, 6, generator=g, dtype=torch.float64)
    return {"hidden": hidden, "credit": credit, "loss_fn": loss_fn, "layer": _layer(g)}


def _credit_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _credit_batch(g, 4)
    return [
        {**good, "credit": good["credit"][:, :5]},  # shape mismatch
        {**good, "hidden": good["hidden"].long()},  # dtype
        {**good, "loss_fn": good["hidden"]},  # not callable
        {**good, "layer": _LAYERS},  # out of range
        {**good, "layer": "0"},  # not an int
    ]


def _cosine_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    reference = torch.randn(n, 3, 2, generator=g, dtype=torch.float64)
    credit = reference + torch.randn(n, 3, 2, generator=g, dtype=torch.float64)
    return {"credit": credit.float(), "reference": reference, "layer": _layer(g)}


def _cosine_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _cosine_batch(g, 4)
    return [
        {**good, "reference": good["reference"][:3]},  # N mismatch
        {**good, "reference": good["reference"].reshape(4, 6)},  # shape mismatch
        {**good, "credit": good["credit"].long()},  # dtype
        {**good, "layer": -1},  # out of range
    ]


def _bridge_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    next_values = torch.randn(n, 5, generator=g) + torch.linspace(0.0, 1.0, 5)
    value = next_values.mean(1) + 0.3 * torch.randn(n, generator=g)
    return {"value": value, "next_values": next_values, "layer": _layer(g)}


def _bridge_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _bridge_batch(g, 4)
    return [
        {**good, "value": good["value"][:, None]},  # [B, 1]
        {**good, "next_values": good["next_values"][:3]},  # B mismatch
        {**good, "next_values": good["next_values"][:, :0]},  # K = 0
        {**good, "value": good["value"].long()},  # dtype
        {**good, "layer": _LAYERS},  # out of range
    ]


def _drift_reference() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "encoder.weight": torch.randn(4, 3, generator=g),
        "encoder.bias": torch.randn(4, generator=g),
        "head.weight": torch.randn(2, 4, generator=g, dtype=torch.float64),
    }


def _drift_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    params = {
        k: w + 0.1 * torch.randn(w.shape, generator=g, dtype=w.dtype) for k, w in _drift_reference().items()
    }
    return {"params": params}


def _drift_bad(g: torch.Generator) -> list[dict[str, Any]]:
    params = _drift_batch(g, 1)["params"]
    return [
        {"params": {k: v for k, v in params.items() if k != "head.weight"}},  # missing
        {"params": {**params, "encoder.bias": params["encoder.bias"][:3]}},  # shape
        {"params": {**params, "encoder.weight": params["encoder.weight"].long()}},  # dtype
        {"params": list(params.values())},  # not a mapping
    ]


COSINE = ConformanceExample(
    make_batch=_cosine_batch, bad_inputs=_cosine_bad, init_kwargs={"num_layers": _LAYERS}
)

PERTURBATION_CORRELATION = ConformanceExample(
    make_batch=_credit_batch,
    bad_inputs=_credit_bad,
    init_kwargs={"num_layers": _LAYERS, "num_directions": 4, "seed": 0},
    batch_keys=("hidden", "credit"),
)

NUDGING = ConformanceExample(
    make_batch=_credit_batch,
    bad_inputs=_credit_bad,
    init_kwargs={"num_layers": _LAYERS, "eta": 0.05},
    batch_keys=("hidden", "credit"),
)

BRIDGE_RESIDUAL = ConformanceExample(
    make_batch=_bridge_batch, bad_inputs=_bridge_bad, init_kwargs={"num_layers": _LAYERS}
)

FEATURE_DRIFT = ConformanceExample(
    make_batch=_drift_batch,
    bad_inputs=_drift_bad,
    init_kwargs={"reference": _drift_reference()},
    batch_keys=(),
    shardable=False,
)
