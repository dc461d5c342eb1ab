"""Run by tests/test_lightning.py: a Trainer with ``strategy="ddp"``, which re-launches this script
once per extra rank (plain DDP, not ddp_spawn). Usage: python tests/lightning_ddp_script.py OUT_DIR"""

from __future__ import annotations

import sys

import pytorch_lightning as pl

from tests.test_lightning import CountingCallback, DiagModule, quiet_trainer


def main(out: str) -> None:
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=pl.loggers.CSVLogger(out, name="csv", version=0),
        callbacks=[CountingCallback()],
    )
    trainer.fit(DiagModule())


if __name__ == "__main__":
    main(sys.argv[1])
