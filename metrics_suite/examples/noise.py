"""Conformance examples of the noise suite: embeddings, noise means and draws, a shared noise mask.

Each ``UPPER_CASE`` constant is the [`ConformanceExample`][metrics_suite.conformance.ConformanceExample] that
[`metrics_suite.noise`][metrics_suite.noise] registers with the metric of that registry name; the conformance kit
(``tests/test_conformance.py``) builds random batches and invalid inputs from it.
"""

from __future__ import annotations

from typing import Any

import torch

from metrics_suite.conformance import ConformanceExample


def _noise_batch(g: torch.Generator, n: int) -> dict[str, Any]:
    embeddings = torch.randn(n, 5, 6, generator=g)
    mean = 0.5 * torch.randn(n, 5, 6, generator=g) + 0.3
    noise = torch.rand(n, 5, 1, generator=g) * torch.randn(n, 5, 6, generator=g)
    # a mask per sequence (the kit's masks vary between items; the [T] form broadcast over the batch
    # is tested in tests/test_noise.py); some sequences select nothing
    noise_mask = torch.rand(n, 5, generator=g) < 0.7
    noise_mask[torch.rand(n, generator=g) < 0.2] = False
    noise_mask[:1, 0] = True  # the kit's NaN checks poison the first element: a masked one is no item
    return {"input": embeddings, "mean": mean, "noise": noise, "noise_mask": noise_mask}


def _noise_bad(g: torch.Generator) -> list[dict[str, Any]]:
    good = _noise_batch(g, 4)
    return [
        {**good, "mean": good["mean"][:, :4]},  # shape
        {**good, "noise": good["noise"][..., :5]},  # shape
        {**good, "input": good["input"].long()},  # dtype
        {**good, "noise_mask": torch.ones(3, dtype=torch.bool)},  # mask does not broadcast
        {**good, "noise_mask": good["noise_mask"][:3]},  # mask of another batch size
        {**good, "noise_mask": torch.ones(4, 5, 6, dtype=torch.bool)},  # mask over features
        {**good, "noise_mask": torch.full((5,), 2)},  # mask values
        {**good, "noise_mask": torch.ones(5)},  # mask dtype
    ]


NOISE = ConformanceExample(
    make_batch=_noise_batch, bad_inputs=_noise_bad, batch_keys=("input", "mean", "noise", "noise_mask")
)
