"""Run by tests/test_lightning.py, in a process of its own (so a hang can be timed out).

``python tests/lightning_ddp_script.py OUT_DIR``: a Trainer with ``strategy="ddp"``, which re-launches
this script once per extra rank (plain DDP, not ddp_spawn); the callback attaches the collections
and a mid-validation checkpoint is saved as OUT_DIR/mid.ckpt.

``python tests/lightning_ddp_script.py OUT_DIR spawn_many``: ``strategy="ddp_spawn"`` with more
logged values than Lightning's result pipe holds; the main process writes the keys of its
``trainer.callback_metrics`` to OUT_DIR/main_keys.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl

from tests.test_lightning import (
    AttachedSteps,
    CountingCallback,
    DiagnosticsCallback,
    ManyValues,
    SaveMidEpoch,
    attaching_callback,
    quiet_trainer,
)


def two_ranks(out: str, strategy: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    """One epoch on 2 CPU ranks, no sanity check, logged to OUT_DIR/csv/version_0/metrics.csv."""
    return quiet_trainer(
        devices=2,
        strategy=strategy,
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=pl.loggers.CSVLogger(out, name="csv", version=0),
        callbacks=callbacks,
    )


def spawn_many(out: str) -> None:
    trainer = two_ranks(out, "ddp_spawn", [DiagnosticsCallback()])
    trainer.fit(ManyValues())
    (Path(out) / "main_keys.json").write_text(json.dumps(sorted(trainer.callback_metrics)))


def main(out: str) -> None:
    callbacks: list[pl.Callback] = [
        attaching_callback(CountingCallback),
        SaveMidEpoch(Path(out) / "mid.ckpt"),
    ]
    two_ranks(out, "ddp", callbacks).fit(AttachedSteps())


if __name__ == "__main__":
    if sys.argv[2:] == ["spawn_many"]:
        spawn_many(sys.argv[1])
    else:
        main(sys.argv[1])
