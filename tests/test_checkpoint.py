"""Metric states travel in a Lightning checkpoint taken mid-epoch; a new process resumes exactly."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

import metrics_suite as ms  # noqa: E402

N_BATCHES, STOP_AFTER = 10, 4


BATCH = 6


def _data(skip_batches: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(N_BATCHES * BATCH, 3, generator=g)[skip_batches * BATCH :]
    return torch.utils.data.DataLoader(list(rows), batch_size=BATCH, shuffle=False)


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.diagnostics = ms.suite(
            "reconstruction",
            reconstruction_score={"reduction": "itemwise_mean", "with_stderr": True},
            changed_tokens=False,
            downstream=False,
        )
        self.final: dict[str, float] = {}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # diagnostics depend on the data only, so both runs see the same values
        clean = batch[:, 0] + 1
        self.diagnostics.update(
            source_model_loss=clean,
            source_model_loss_with_reconstruction=clean + batch[:, 1],
            source_model_loss_with_zero_ablation=clean + 1 + batch[:, 2],
        )
        return self.layer(batch).pow(2).mean()

    def on_train_epoch_end(self) -> None:
        self.final = {k: float(v) for k, v in self.diagnostics.compute().items()}
        self.diagnostics.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _SaveAndStop(pl.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if batch_idx == STOP_AFTER - 1:
            trainer.save_checkpoint(self.path)
            raise KeyboardInterrupt  # the job dies here; Lightning shuts down gracefully


def _trainer(**kwargs) -> pl.Trainer:  # type: ignore[no-untyped-def]
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _resume(path: str, queue: mp.Queue) -> None:
    module = _Module()
    module.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    _trainer().fit(module, train_dataloaders=_data(skip_batches=STOP_AFTER))
    queue.put(module.final)


def test_checkpoint_mid_epoch_then_resume_in_a_new_process(tmp_path: Path) -> None:
    uninterrupted = _Module()
    _trainer().fit(uninterrupted, train_dataloaders=_data())

    interrupted = _Module()
    path = tmp_path / "mid_epoch.ckpt"
    with pytest.raises(SystemExit):  # Lightning turns the interrupt into an exit after teardown
        _trainer(callbacks=[_SaveAndStop(path)]).fit(interrupted, train_dataloaders=_data())
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.endswith("ratio_stats") for k in state), "metric states are missing from the checkpoint"

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_resume, args=(str(path), queue))
    proc.start()
    try:
        resumed = queue.get(timeout=180)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert resumed.keys() == uninterrupted.final.keys()
    for key, value in uninterrupted.final.items():
        assert resumed[key] == pytest.approx(value, rel=1e-12), key
