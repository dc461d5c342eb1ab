"""Per-step cost of a full four-suite ``update`` vs the same math written as bare torch code.

One training/validation step's worth of inputs for every suite (B=8 sequences of T=64 tokens,
V=2048 vocabulary, D=64 embeddings, F=256 SAE features, d=32 hidden, L=2 credit layers) goes
through ``DiagnosticCollection.update`` (routing, validation, NaN policy, float64 sums, the
rollback snapshot) and through a hand-written loop doing the same arithmetic into plain float64
accumulators. Prints JSON with the median step times and their ratio (ours / bare; 1.0 = free).

Usage: python benchmarks/bench_step_overhead.py [--repeats 30] [--out FILE] [--device cpu]

With ``--device cuda`` inputs, metrics and the bare accumulators live on the GPU and every timing
synchronises the device.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _device import add_device_argument, timed

import metrics_suite as ms

B, T, V, D, F_, HID, K, M, LAYERS = 8, 64, 2048, 64, 256, 32, 8, 8, 2


class QuadraticLoss:
    """Per-sample loss ½‖h − c‖² (gradient h − c)."""

    def __init__(self, center: torch.Tensor) -> None:
        self.center = center

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return 0.5 * (h - self.center).pow(2).sum(-1)


def make_inputs(g: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Drawn on the CPU (the same numbers on any device), then moved to ``device``."""
    clean = torch.randn(B, T, V, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 48:] = False
    hidden = torch.randn(B, HID, generator=g)
    center = torch.randn(HID, generator=g)
    loss = torch.rand(B, generator=g) + 1
    emb = torch.randn(B, T, D, generator=g)
    inputs = {
        # utility
        "clean_logits": clean,
        "noisy_logits": clean + 0.3 * torch.randn(B, T, V, generator=g),
        "attention_mask": mask,
        "logits": clean,
        "target_ids": torch.randint(0, V, (B, T), generator=g),
        # noise
        "input": emb,
        "mean": 0.1 * torch.randn(B, T, D, generator=g),
        "noise": 0.5 * torch.randn(B, T, D, generator=g),
        # reconstruction
        "source_model_loss": loss,
        "source_model_loss_with_reconstruction": loss + torch.rand(B, generator=g),
        "source_model_loss_with_zero_ablation": loss + 2,
        "input_ids": torch.randint(0, V, (B, T), generator=g),
        "reconstructed_ids": torch.randint(0, V, (B, T), generator=g),
        "reconstruction": emb + 0.1 * torch.randn(B, T, D, generator=g),
        "target": emb,
        "feature_activations": torch.relu(torch.randn(B, T, F_, generator=g) - 1),
        # credit
        "hidden": hidden,
        "credit": hidden - center + 0.1 * torch.randn(B, HID, generator=g),
        "reference": hidden - center,
        "loss_fn": QuadraticLoss(center.to(device)),
        "value": torch.randn(B, generator=g),
        "next_values": torch.randn(B, K, generator=g),
        "layer": 1,
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def build_collection() -> ms.DiagnosticCollection:
    return ms.suite(
        reconstruction_score=True,
        activations={"num_features": D},
        feature_sparsity={"num_features": F_},
        cosine={"num_layers": LAYERS},
        perturbation_correlation={"num_layers": LAYERS, "num_directions": M, "seed": 0},
        nudging={"num_layers": LAYERS},
        bridge_residual={"num_layers": LAYERS},
    )


class Bare:
    """The same per-step arithmetic with plain float64 accumulators: no routing, checks or Metric."""

    def __init__(self) -> None:
        self.acc: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        self.acc[name] = self.acc[name] + value if name in self.acc else value

    def step(self, x: dict[str, Any]) -> None:
        mask = x["attention_mask"]
        # next-token divergences on attended rows, chunk = the whole step
        lp = F.log_softmax(x["clean_logits"][mask].float(), -1)
        lq = F.log_softmax(x["noisy_logits"][mask].float(), -1)
        p, q = lp.exp(), lq.exp()
        lm = torch.logaddexp(lp, lq) - math.log(2)
        per_token = torch.stack(
            [
                ((p - q) * (lp - lq)).sum(-1),
                0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1),
                0.5 * (p - q).abs().sum(-1),
                0.5 * (p.sqrt() - q.sqrt()).pow(2).sum(-1),
            ],
            -1,
        )
        self.add("divergence", per_token.sum(0))
        ce = F.cross_entropy(x["logits"][mask].float(), x["target_ids"][mask], reduction="sum")
        self.add("ce", torch.stack([ce, mask.sum().float()]))
        # noise statistics
        inp, mean, noise = x["input"].float(), x["mean"].float(), x["noise"].float()
        shifted = mean + noise
        n_in, n_mean, n_noise, n_shift = (t.norm(dim=-1) for t in (inp, mean, noise, shifted))
        stats = torch.stack(
            [
                n_in,
                n_mean,
                n_noise,
                n_shift,
                n_mean / (n_mean + n_noise),
                n_mean / n_noise,
                F.cosine_similarity(inp, mean, dim=-1),
                n_shift / (n_in + n_shift),
                n_shift / n_in,
                F.cosine_similarity(inp, shifted, dim=-1),
            ],
            -1,
        )
        self.add("noise", stats.reshape(-1, 10).sum(0))
        # reconstruction score, changed tokens, activations, sparsity
        l, lr, lz = (
            x[k].double()
            for k in (
                "source_model_loss",
                "source_model_loss_with_reconstruction",
                "source_model_loss_with_zero_ablation",
            )
        )
        self.add("score", torch.stack([l.sum(), lr.sum(), lz.sum(), ((lz - lr) / (lz - l)).sum()]))
        changed = (x["input_ids"] != x["reconstructed_ids"]).double()
        self.add("changed", torch.stack([changed.sum(), (changed.mean(1)).sum()]))
        rec, tgt = x["reconstruction"].reshape(-1, D).double(), x["target"].reshape(-1, D).double()
        err = (rec - tgt).pow(2).sum(-1)
        self.add(
            "act", torch.stack([err.sum(), tgt.pow(2).sum(), F.cosine_similarity(rec, tgt, dim=-1).sum()])
        )
        self.add("act_sum", tgt.sum(0))
        feats = x["feature_activations"].reshape(-1, F_)
        fired = feats != 0
        self.add("fired", fired.sum(0))
        self.add("sparsity", torch.stack([fired.sum().double(), feats.abs().sum().double()]))
        # credit
        h, a, loss_fn = x["hidden"].float(), x["credit"].float(), x["loss_fn"]
        self.add("cos", F.cosine_similarity(a, x["reference"].float(), dim=-1).sum())
        v = torch.randn(M, B, HID, device=h.device)
        v = v / v.norm(dim=-1, keepdim=True)
        eps = 1e-3
        true = loss_fn((h + eps * v).reshape(-1, HID)).reshape(M, B) - loss_fn(h)
        pred = eps * (v * a).sum(-1)
        self.add(
            "pearson",
            torch.stack(
                [pred.sum(), true.sum(), (pred * pred).sum(), (true * true).sum(), (pred * true).sum()]
            ),
        )
        a_hat = a / (a.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)
        delta = loss_fn(h - 0.01 * a_hat) - loss_fn(h)
        self.add("nudge", torch.stack([delta.sum(), (delta < 0).sum().float()]))
        lam, nv = 0.1, x["next_values"].float()
        v_target = -lam * torch.logsumexp(-nv / lam, -1) + lam * math.log(K)
        self.add("bridge", (x["value"].float() - v_target).abs().sum())


def _median_ms(fn: Any, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn, device) * 1e3 for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    add_device_argument(parser)
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    inputs = make_inputs(torch.Generator().manual_seed(0), device)
    collection = build_collection().to(device)
    bare = Bare()
    ours_ms = _median_ms(lambda: collection.update(**inputs), args.repeats, device)
    bare_ms = _median_ms(lambda: bare.step(inputs), args.repeats, device)
    unchecked = build_collection().to(device)
    for metric in unchecked.values(copy_state=False):
        metric.validate_args = False
    unchecked.atomic_update = False
    unchecked_ms = _median_ms(lambda: unchecked.update(**inputs), args.repeats, device)
    result = {
        "benchmark": "step_overhead",
        "device": str(device),
        "shape": {"B": B, "T": T, "V": V, "D": D, "F": F_, "hidden": HID, "directions": M},
        "metrics": len(collection),
        "ours_update_median_ms": round(ours_ms, 3),
        "ours_unchecked_update_median_ms": round(unchecked_ms, 3),
        "bare_torch_median_ms": round(bare_ms, 3),
        "ratio_ours_vs_bare": round(ours_ms / bare_ms, 2),
        "ratio_unchecked_vs_bare": round(unchecked_ms / bare_ms, 2),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
