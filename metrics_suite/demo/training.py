"""The demo's LightningModule and run: train a noisy-embedding language model, evaluate all four suites.

Every validation epoch the module feeds one [`DiagnosticCollection`][metrics_suite.collection.DiagnosticCollection] (synced with
one collective) and a [`DiagnosticsCallback`][metrics_suite.integrations.lightning.DiagnosticsCallback] computes,
logs and resets it. Validation sequences have uneven lengths (a padding mask), and the transform is
evaluated at several strengths: the learned noise scaled by each of ``noise_scales``.

* **utility** and **reconstruction**, once per noise scale (keys ``{suite}/{metric}/sigma_{pct}pct/...``):
  clean vs noisy logits (``next_token``, with the per-token divergences' quantiles
  ``_p50``/``_p90``/``_p99`` and ``_max``), cross-entropy of the noisy model (``cross_entropy``),
  argmax changes (``prediction_change``); nearest-embedding inversion of the noisy embeddings
  (``changed_tokens``), noisy vs clean embeddings (``activations``), the reconstruction score with
  the transform zero-ablated;
* **noise** — the transform's input, mean and noise at the learned scale, captured with
  [`ForwardCapture`][metrics_suite.capture.ForwardCapture];
* **credit** — credit rules compared on a deep linear network trained by feedback alignment
  ([`chain`][metrics_suite.demo.chain]): backprop, feedback alignment, the gradient plus noise, and
  noise alone, each with ``cosine`` (vs the gradient), ``perturbation_correlation`` and ``nudging``
  (keys ``credit/{metric}/{rule}/layer_{i}``); the drift of a few weight matrices of the language
  model from initialisation (``feature_drift``).

Adding a statistic: put its registry name and arguments in [`DemoConfig.metrics`][metrics_suite.demo.training.DemoConfig.metrics] (e.g.
``{"next_token": {...}, "downstream": {}}``). The validation step offers every input it has
(``spliced_logits`` and ``ablated_logits`` included); each metric takes the ones its ``update`` names.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
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
from metrics_suite.demo.chain import CREDIT_RULES, FeedbackAlignmentChain, rule_credit
from metrics_suite.demo.data import markov_dataset
from metrics_suite.demo.model import TinyCausalLM, nearest_token_ids, sequence_loss
from metrics_suite.integrations.lightning import DiagnosticsCallback, StageDiagnostics

__all__ = ["DemoConfig", "DemoModule", "ResultsWriter", "build_diagnostics", "run_demo", "scale_tag"]


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
    #: validation sequences keep a random length in [min_val_length, seq_len] (the rest is padding)
    min_val_length: int = 4
    train_sequences: int = 1024
    val_sequences: int = 256
    batch_size: int = 32
    lr: float = 3e-3
    #: weight of the reward for a larger noise scale: loss = CE − noise_reward · mean(log σ)
    noise_reward: float = 0.3
    init_log_sigma: float = 0.5
    #: the learned noise is evaluated scaled by each of these (utility and reconstruction suites)
    noise_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    #: credit testbed: a linear chain of chain_layers matrices, trained by feedback alignment
    chain_dim: int = 32
    chain_layers: int = 4
    chain_outputs: int = 4
    chain_lr: float = 0.02
    #: feedback-alignment steps before each validation (batch of 64)
    chain_steps: int = 25
    credit_rules: tuple[str, ...] = CREDIT_RULES
    num_directions: int = 16
    #: extra or changed metrics, by registry name: constructor arguments, or False to leave one out
    metrics: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


def scale_tag(scale: float) -> str:
    """The key part of a noise scale: ``0.5`` → ``"sigma_050pct"`` (no ``.``: keys name submodules;
    zero-padded, so keys sort by scale)."""
    return f"sigma_{round(100 * scale):03d}pct"


def _suite_of() -> dict[str, str]:
    return {entry.name: entry.suite for entry in ms.registered()}


def build_diagnostics(model: TinyCausalLM, config: DemoConfig) -> DiagnosticCollection:
    """The validation collection: utility and reconstruction per noise scale, noise, credit per rule.

    ``config.metrics`` overrides (or adds) metrics by registry name, in every group of its suite.
    """
    suite_of = _suite_of()
    unknown = sorted(set(config.metrics) - set(suite_of))
    if unknown:
        raise ValueError(f"DemoConfig.metrics: unknown metric(s) {unknown}; registered: {sorted(suite_of)}")

    def group(suite: str, **defaults: Any) -> DiagnosticCollection:
        extra = {name: value for name, value in config.metrics.items() if suite_of[name] == suite}
        return ms.suite(suite, **{**defaults, **extra})

    per_scale: dict[str, dict[str, Any]] = {
        "utility": {
            "prediction_change": {"num_classes": config.vocab_size},
            # the spread of the per-token divergences, not only their mean
            "next_token": {"quantiles": (0.5, 0.9, 0.99)},
        },
        "reconstruction": {"activations": {"num_features": config.dim}},
    }
    metrics: dict[str, Any] = {}
    for scale in config.noise_scales:
        tag = scale_tag(scale)
        for suite, defaults in per_scale.items():
            metrics.update((f"{name}/{tag}", metric) for name, metric in group(suite, **defaults).items())
    metrics.update(group("noise").items())
    layers = config.chain_layers - 1
    credit = group(
        "credit",
        cosine={"num_layers": layers},
        perturbation_correlation={
            "num_layers": layers,
            "num_directions": config.num_directions,
            "epsilon": 1e-2,
            "difference": "central",
            "seed": config.seed,
        },
        nudging={"num_layers": layers, "eta": 0.05},
        bridge_residual=False,  # no value function here
        feature_drift=False,
    )
    for rule in config.credit_rules:
        metrics.update((f"{name}/{rule}", metric.clone()) for name, metric in credit.items())
    credit_names = ["cosine", "perturbation_correlation", "nudging", "bridge_residual"]
    reference = {
        name: p.detach()
        for name, p in model.named_parameters()
        if name in _drift_parameters(config.num_layers)
    }
    drift = ms.suite(
        "credit", feature_drift={"reference": reference}, **{name: False for name in credit_names}
    )
    metrics.update(drift.items())
    return DiagnosticCollection(metrics)


def _drift_parameters(num_layers: int) -> list[str]:
    return ["embed.weight", *(f"blocks.{i}.qkv.weight" for i in range(num_layers)), "head.weight"]


def _accepted_inputs(metric: Any) -> set[str]:
    return set(inspect.signature(metric.update).parameters)


def _update_group(collection: DiagnosticCollection, suffix: str, inputs: dict[str, Any]) -> None:
    """Update the metrics named ``*/{suffix}`` with the inputs their ``update`` names."""
    for name, metric in collection.items(keep_base=True):
        if name.endswith(f"/{suffix}"):
            accepted = _accepted_inputs(metric)
            metric.update(**{k: v for k, v in inputs.items() if k in accepted})


def length_mask(num_sequences: int, length: int, min_length: int, seed: int) -> Tensor:
    """``[N, length]`` bool: each sequence keeps a random length in ``[min_length, length]``
    (deterministic per ``seed``), False on the padding after it."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, length + 1, (num_sequences,), generator=g)
    return torch.arange(length) < lengths[:, None]


class DemoModule(pl.LightningModule):
    """Trains [`TinyCausalLM`][metrics_suite.demo.model.TinyCausalLM] with a noise transform; diagnoses it.

    Training loss: cross-entropy of the noisy model minus ``noise_reward · mean(log σ)``, so the
    transform learns as much noise as the task tolerates. Before each validation the credit testbed
    ([`FeedbackAlignmentChain`][metrics_suite.demo.chain.FeedbackAlignmentChain]) takes ``chain_steps`` feedback-alignment
    steps, the same on every rank.
    """

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
        self.chain = FeedbackAlignmentChain(
            config.chain_dim, config.chain_layers, config.chain_outputs, config.seed + 1
        )
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
        return torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, weight_decay=0.0)

    def on_validation_epoch_start(self) -> None:
        # the same generator on every rank: the replicas of the chain stay identical
        g = torch.Generator().manual_seed(self.config.seed * 1009 + self.current_epoch)
        self.chain.train_steps(self.config.chain_steps, self.config.chain_lr, 64, g)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        ids = batch[0]
        input_ids, target_ids = ids[:, :-1], ids[:, 1:]
        logits = self.model(input_ids, noise=True)
        ce = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten())
        self.diagnostics["train"].update(logits=logits.detach(), target_ids=target_ids)
        self.log("loss", ce, prog_bar=True, on_step=True, on_epoch=False)
        return ce - self.config.noise_reward * self.model.noise.log_sigma.mean()

    def _batch_seed(self, batch_idx: int) -> int:
        return self.config.seed * 7919 + batch_idx * self.trainer.world_size + self.global_rank

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        ids = batch[0]
        input_ids, target_ids = ids[:, :-1], ids[:, 1:]
        mask = length_mask(
            len(ids), target_ids.shape[1], self.config.min_val_length, self._batch_seed(batch_idx)
        )
        model, diagnostics = self.model, self.diagnostics["val"]

        embeddings = model.embed(input_ids)
        with ForwardCapture(model.noise, inputs={"input": "x"}, names=("input", "mean", "noise")) as capture:
            model.noise(embeddings)
        parts = capture.pop()
        diagnostics["noise/noise"].update(**parts, noise_mask=mask)

        clean_logits = model.from_layer(model.residual_input(embeddings), 0)
        zero_logits = model.from_layer(model.residual_input(torch.zeros_like(embeddings)), 0)
        clean_loss = sequence_loss(clean_logits, target_ids, mask)
        zero_loss = sequence_loss(zero_logits, target_ids, mask)
        for scale in self.config.noise_scales:
            noisy = embeddings + parts["mean"] + scale * parts["noise"]  # the same draw at every scale
            noisy_logits = model.from_layer(model.residual_input(noisy), 0)
            inputs = {
                "clean_logits": clean_logits,
                "noisy_logits": noisy_logits,
                "spliced_logits": noisy_logits,
                "ablated_logits": zero_logits,
                "logits": noisy_logits,
                "target_ids": target_ids,
                "attention_mask": mask,
                "original_preds": clean_logits.argmax(-1),
                "modified_preds": noisy_logits.argmax(-1),
                "mask": mask,
                "input_ids": input_ids,
                "reconstructed_ids": nearest_token_ids(noisy, model.embed.weight),
                "noise_mask": mask,
                "reconstruction": noisy,
                "target": embeddings,
                "source_model_loss": clean_loss,
                "source_model_loss_with_reconstruction": sequence_loss(noisy_logits, target_ids, mask),
                "source_model_loss_with_zero_ablation": zero_loss,
            }
            _update_group(diagnostics, scale_tag(scale), inputs)
        self._credit_updates(diagnostics, batch_idx)
        diagnostics["credit/feature_drift"].update(params=model)

    def _credit_updates(self, diagnostics: DiagnosticCollection, batch_idx: int) -> None:
        """Every credit rule on the chain's hidden layers: cosine with the gradient, perturbation
        correlation and nudging."""
        g = torch.Generator().manual_seed(self._batch_seed(batch_idx))
        x, y = self.chain.sample(self.config.batch_size, g)
        hidden, exact, aligned = self.chain.credits(x, y)
        for rule in self.config.credit_rules:
            for layer, h in enumerate(hidden):
                credit = rule_credit(rule, exact[layer], aligned[layer], g)
                inputs = {
                    "credit": credit,
                    "reference": exact[layer],
                    "hidden": h,
                    "loss_fn": self.chain.loss_from(layer + 1, y),
                    "layer": layer,
                }
                _update_group(diagnostics, rule, inputs)


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
    # the demo's values reach the main process in results.json, not in Lightning's callback_metrics
    warnings.filterwarnings("ignore", message="DiagnosticsCallback: .* left out of the `callback_metrics`")
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
