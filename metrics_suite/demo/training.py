"""The demo's LightningModule and run: train a noisy-embedding language model, evaluate all four suites.

Every validation epoch the module feeds one [`DiagnosticCollection`][metrics_suite.collection.DiagnosticCollection] (all four
suites, synced with one collective) and a [`DiagnosticsCallback`][metrics_suite.integrations.lightning.DiagnosticsCallback]
computes, logs and resets it:

* **utility** — clean vs noisy logits (``next_token``), cross-entropy of the noisy model
  (``cross_entropy``), argmax changes (``prediction_change``);
* **noise** — the transform's input, mean and noise ([`NoiseStatistics`][metrics_suite.noise.NoiseStatistics]),
  captured with [`ForwardCapture`][metrics_suite.capture.ForwardCapture];
* **reconstruction** — nearest-embedding inversion of the noisy embeddings (``changed_tokens``),
  noisy vs clean embeddings (``activations``), and the reconstruction score with the transform
  zero-ablated: clean loss, loss with the noisy embeddings as the "reconstruction", loss with the
  embeddings zeroed;
* **credit** — a toy linear-quadratic chain whose exact costates ([`lq_costates`][metrics_suite.functional.credit.lq_costates])
  are compared per layer with costates propagated through noisy feedback weights (``cosine``);
  the backprop gradient at each transformer block's input as credit for ``perturbation_correlation``
  and ``nudging``; the drift of a few weight matrices from initialisation (``feature_drift``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

import metrics_suite as ms
from metrics_suite.capture import ForwardCapture
from metrics_suite.collection import DiagnosticCollection
from metrics_suite.demo.data import markov_dataset
from metrics_suite.demo.model import TinyCausalLM, nearest_token_ids, sequence_loss
from metrics_suite.functional.credit import lq_costates, lq_forward
from metrics_suite.integrations.lightning import DiagnosticsCallback, StageDiagnostics

__all__ = ["DemoConfig", "DemoModule", "ResultsWriter", "build_diagnostics", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of one demo run (the CLI exposes ``out``, ``epochs``, ``seed``, ``devices``)."""

    out: str = "demo_out"
    epochs: int = 6
    seed: int = 0
    devices: int = 2
    vocab_size: int = 32
    dim: int = 32
    num_layers: int = 2
    num_heads: int = 2
    seq_len: int = 16
    train_sequences: int = 1024
    val_sequences: int = 256
    batch_size: int = 32
    lr: float = 3e-3
    #: weight of the reward for a larger noise scale: loss = CE − noise_reward · mean(log σ)
    noise_reward: float = 0.3
    init_log_sigma: float = 0.5
    lq_layers: int = 4
    lq_dim: int = 8
    #: relative size of the error in the feedback weights of the toy chain at the start
    lq_feedback_noise: float = 1.0
    #: share of the feedback error removed after each training epoch (feedback alignment)
    lq_alignment_rate: float = 0.3
    num_directions: int = 16
    progress: bool = True


def build_diagnostics(model: TinyCausalLM, config: DemoConfig) -> DiagnosticCollection:
    """All four suites, configured for the demo model."""
    reference = {
        name: p.detach()
        for name, p in model.named_parameters()
        if name in _drift_parameters(config.num_layers)
    }
    return ms.suite(
        activations={"num_features": config.dim},
        prediction_change={"num_classes": config.vocab_size},
        cosine={"num_layers": config.lq_layers},
        perturbation_correlation={
            "num_layers": config.num_layers,
            "num_directions": config.num_directions,
            "epsilon": 1e-2,
            "difference": "central",
            "seed": config.seed,
        },
        nudging={"num_layers": config.num_layers, "eta": 0.05},
        bridge_residual=False,  # no value function in this model
        feature_drift={"reference": reference},
    )


def _drift_parameters(num_layers: int) -> list[str]:
    return ["embed.weight", *(f"blocks.{i}.qkv.weight" for i in range(num_layers)), "head.weight"]


class _LossFromLayer:
    """Per-sequence loss of the model run from block ``layer`` on (``[R, T, D]`` → ``[R]``)."""

    def __init__(self, model: TinyCausalLM, layer: int, target_ids: Tensor) -> None:
        self.model, self.layer, self.target_ids = model, layer, target_ids

    def __call__(self, h: Tensor) -> Tensor:
        targets = self.target_ids.repeat(h.shape[0] // self.target_ids.shape[0], 1)
        return sequence_loss(self.model.from_layer(h, self.layer), targets)


class DemoModule(pl.LightningModule):
    """Trains [`TinyCausalLM`][metrics_suite.demo.model.TinyCausalLM] with a noise transform; diagnoses it.

    Training loss: cross-entropy of the noisy model minus ``noise_reward · mean(log σ)``, so the
    transform learns as much noise as the task tolerates.
    """

    lq_weights: Tensor
    lq_feedback: Tensor
    lq_cost: Tensor

    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.config = config
        torch.manual_seed(config.seed)
        self.model = TinyCausalLM(
            config.vocab_size,
            config.dim,
            config.num_layers,
            config.num_heads,
            config.seq_len,
            config.init_log_sigma,
        )
        self.diagnostics = StageDiagnostics(
            train=ms.suite("utility", next_token=False), val=build_diagnostics(self.model, config)
        )
        # toy linear-quadratic chain: weights A_l, feedback weights A_l + noise, terminal cost Q
        g = torch.Generator().manual_seed(config.seed + 1)
        d, L = config.lq_dim, config.lq_layers
        weights = torch.linalg.qr(torch.randn(L, d, d, generator=g)).Q * 1.1
        feedback = weights + config.lq_feedback_noise * torch.randn(L, d, d, generator=g) / math.sqrt(d)
        spd = torch.randn(d, d, generator=g)
        self.register_buffer("lq_weights", weights, persistent=False)
        self.register_buffer("lq_feedback", feedback)
        self.register_buffer("lq_cost", spd @ spd.T / d + torch.eye(d), persistent=False)
        self.train_data = markov_dataset(
            config.vocab_size, config.train_sequences, config.seq_len, config.seed, 0
        )
        self.val_data = markov_dataset(
            config.vocab_size, config.val_sequences, config.seq_len, config.seed, 1
        )

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            torch.set_num_threads(1)  # one process per core
        _quiet()

    # ------------------------------------------------------------------ data
    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.config.seed)
        return DataLoader(self.train_data, batch_size=self.config.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_data, batch_size=self.config.batch_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.config.lr, weight_decay=0.0)

    def on_train_epoch_end(self) -> None:
        # the toy chain's feedback weights move towards the forward weights (a Kolen-Pollack-like decay
        # of their difference), so the credit they carry aligns with the exact costates epoch by epoch
        self.lq_feedback.lerp_(self.lq_weights, self.config.lq_alignment_rate)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        ids = batch[0]
        input_ids, target_ids = ids[:, :-1], ids[:, 1:]
        logits = self.model(input_ids, noise=True)
        ce = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten())
        self.diagnostics["train"].update(logits=logits.detach(), target_ids=target_ids)
        self.log("loss", ce, prog_bar=True, on_step=True, on_epoch=False)
        return ce - self.config.noise_reward * self.model.noise.log_sigma.mean()

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        ids = batch[0]
        input_ids, target_ids = ids[:, :-1], ids[:, 1:]
        model, diagnostics = self.model, self.diagnostics["val"]

        embeddings = model.embed(input_ids)
        with ForwardCapture(model.noise, inputs={"input": "x"}, names=("input", "mean", "noise")) as capture:
            noisy = model.noise(embeddings)
        clean_logits = model.from_layer(model.residual_input(embeddings), 0)
        noisy_logits = model.from_layer(model.residual_input(noisy), 0)
        zero_logits = model.from_layer(model.residual_input(torch.zeros_like(embeddings)), 0)
        diagnostics.update(
            # utility
            clean_logits=clean_logits,
            noisy_logits=noisy_logits,
            logits=noisy_logits,
            target_ids=target_ids,
            original_preds=clean_logits.argmax(-1),
            modified_preds=noisy_logits.argmax(-1),
            # noise
            **capture.pop(),
            # reconstruction
            input_ids=input_ids,
            reconstructed_ids=nearest_token_ids(noisy, model.embed.weight),
            reconstruction=noisy,
            target=embeddings,
            source_model_loss=sequence_loss(clean_logits, target_ids),
            source_model_loss_with_reconstruction=sequence_loss(noisy_logits, target_ids),
            source_model_loss_with_zero_ablation=sequence_loss(zero_logits, target_ids),
        )
        self._credit_updates(diagnostics, noisy, target_ids, batch_idx)
        diagnostics.update(params=model)

    def _credit_updates(
        self, diagnostics: DiagnosticCollection, noisy: Tensor, target_ids: Tensor, batch_idx: int
    ) -> None:
        # toy LQ chain: exact costates vs costates sent back through noisy feedback weights
        g = torch.Generator().manual_seed(self.config.seed * 7919 + batch_idx * 2 + self.global_rank)
        h0 = torch.randn(target_ids.shape[0], self.config.lq_dim, generator=g).to(self.device)
        weights = list(self.lq_weights)
        exact = lq_costates(weights, self.lq_cost, h0)
        approx = [lq_forward(weights, h0)[-1] @ self.lq_cost]
        for B in reversed(self.lq_feedback):
            approx.insert(0, approx[0] @ B)
        for layer in range(self.config.lq_layers):
            diagnostics.update(credit=approx[layer], reference=exact[layer], layer=layer)

        # transformer blocks: the backprop gradient at each block's input is the credit
        with torch.enable_grad():
            states = [h.detach().requires_grad_(True) for h in self.model.hidden_states(noisy.detach())]
            for layer, h in enumerate(states):
                loss_fn = _LossFromLayer(self.model, layer, target_ids)
                (credit,) = torch.autograd.grad(loss_fn(h).sum(), h)
                diagnostics.update(hidden=h.detach(), credit=credit, loss_fn=loss_fn, layer=layer)


class ResultsWriter(pl.Callback):
    """Rank 0 writes ``results.json`` after every training epoch (the diagnostics history so far).

    Add it after a [`DiagnosticsCallback`][metrics_suite.integrations.lightning.DiagnosticsCallback], whose
    ``history`` it writes with ``extra`` (e.g. the config).
    """

    def __init__(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.extra = dict(extra or {})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        diagnostics = next(cb for cb in trainer.callbacks if isinstance(cb, DiagnosticsCallback))  # type: ignore[attr-defined]
        write_results(
            self.path, {**self.extra, "world_size": trainer.world_size, "history": diagnostics.history}
        )


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` as JSON atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def _quiet() -> None:
    """Silence Lightning's advice that does not apply to a tiny CPU demo (in every process)."""
    from pytorch_lightning.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message=".*isinstance.*LeafSpec.*")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.WARNING)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Train and diagnose on ``config.devices`` CPU processes; write ``results.json`` under ``config.out``.

    Returns the results dict (also written to ``{out}/results.json``): the config, ``world_size``,
    ``wall_time_s`` and ``history`` — one record ``{"stage", "epoch", "values"}`` per stage and epoch.
    """
    _quiet()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results_path.unlink(missing_ok=True)
    start = time.perf_counter()
    pl.seed_everything(config.seed, verbose=False)
    distributed = config.devices > 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=config.devices,
        # spawn works the same from the console script, ``python -m`` and a test (plain "ddp"
        # re-launches the command line); the module and data are small, so pickling is cheap
        strategy="ddp_spawn" if distributed else "auto",
        max_epochs=config.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
        num_sanity_val_steps=0,
        inference_mode=False,  # the credit diagnostics take gradients during validation
        callbacks=[DiagnosticsCallback(), ResultsWriter(results_path, {"config": asdict(config)})],
    )
    trainer.fit(DemoModule(config))
    results = json.loads(results_path.read_text())
    results["wall_time_s"] = time.perf_counter() - start
    write_results(results_path, results)
    return results
