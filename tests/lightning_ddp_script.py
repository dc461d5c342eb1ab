"""Run by tests/test_lightning.py: a Trainer with ``strategy="ddp"``, which re-launches this script
once per extra rank (plain DDP, not ddp_spawn); the callback attaches the collections and a
mid-validation checkpoint is saved as OUT_DIR/mid.ckpt. Usage: python tests/lightning_ddp_script.py OUT_DIR"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl

from tests.test_lightning import (
    AttachedSteps,
    CountingCallback,
    SaveMidEpoch,
    attaching_callback,
    quiet_trainer,
)


def main(out: str) -> None:
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=pl.loggers.CSVLogger(out, name="csv", version=0),
        callbacks=[attaching_callback(CountingCallback), SaveMidEpoch(Path(out) / "mid.ckpt")],
    )
    trainer.fit(AttachedSteps())


if __name__ == "__main__":
    main(sys.argv[1])
