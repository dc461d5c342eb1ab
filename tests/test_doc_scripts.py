"""Code a user pastes into a script, run as a script: the README's LightningModule under 2-rank DDP
and the distributed guide's example, each in a fresh Python process with warnings as errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metrics_suite as ms
from tests.helpers import compare

ROOT = Path(__file__).resolve().parents[1]
B, T, V, D = 2, 5, 80, 6  # V > num_logits=64: the README's top-k divergences take their own path
N_ITEMS = 8  # 2 ranks x 2 batches x B items, no padding by the distributed sampler


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_script(path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python path`` in a fresh process, the worktree first on the path, every warning an error
    (``PYTHONWARNINGS`` reaches the ranks a launcher starts) but one: Lightning 2.6 itself calls a
    pytree API that torch 2.13 deprecates, in every ``validate``, whatever the module does."""
    warnings = "error,ignore:`isinstance(treespec:FutureWarning"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": warnings}
    return subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def readme_items() -> list[dict[str, torch.Tensor]]:
    """What the README's placeholders stand for: batches of ``target_ids`` and ``mask`` and what
    ``self.run(batch)`` returns, one dict per item (uneven masks)."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(N_ITEMS, T, V, generator=g, dtype=torch.float64)
    inp = torch.randn(N_ITEMS, T, D, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 4, 2, 5, 1, 4, 3])
    return [
        {
            "target_ids": torch.randint(0, V, (T,), generator=g),
            "mask": torch.arange(T) < lengths[i],
            "clean_logits": clean[i],
            "noisy_logits": clean[i] + 0.7 * torch.randn(T, V, generator=g, dtype=torch.float64),
            "input": inp[i],
            "mean": 0.2 * torch.randn(T, D, generator=g, dtype=torch.float64) + 0.1,
            "noise": 0.5 * torch.randn(T, D, generator=g, dtype=torch.float64),
        }
        for i in range(N_ITEMS)
    ]


# Fills the README's placeholders: ``run`` reads the forward pass's outputs from the batch (a dict
# like the README's), a one-parameter training step, and the items of ``readme_items`` (saved by the
# test) as train and val data; ``trainer.fit`` on 2 ranks as the README says.
README_HARNESS = """

import json
import sys

import torch
from torch.utils.data import DataLoader


class FilledModel(Model):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def run(self, batch):
        return {k: batch[k] for k in ("clean_logits", "noisy_logits", "input", "mean", "noise")}

    def training_step(self, batch, batch_idx):
        return (self.scale * batch["noise"]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    loader = DataLoader(torch.load(f"{out}/items.pt"), batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(FilledModel(), loader, loader)
    if trainer.is_global_zero:
        values = {k: float(v) for k, v in trainer.callback_metrics.items()}
        with open(f"{out}/logged.json", "w") as f:
            json.dump(values, f)
"""


def test_readme_lightning_example_under_two_rank_ddp(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    (block,) = [b for b in python_blocks(ROOT / "README.md") if "LightningModule" in b]
    script = tmp_path / "readme_example.py"
    script.write_text(block + README_HARNESS)
    items = readme_items()
    torch.save(items, tmp_path / "items.pt")

    proc = run_script(script, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warn" not in (proc.stderr + proc.stdout).lower(), proc.stderr[-3000:]

    # one process over all items gives what the two ranks logged, for every key the suites build
    reference = ms.suite("utility", "noise", next_token={"num_logits": 64})
    stacked = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    reference.update(
        clean_logits=stacked["clean_logits"],
        noisy_logits=stacked["noisy_logits"],
        logits=stacked["noisy_logits"],
        target_ids=stacked["target_ids"],
        attention_mask=stacked["mask"],
        input=stacked["input"],
        mean=stacked["mean"],
        noise=stacked["noise"],
    )
    expected = {f"val/{k}": float(v) for k, v in reference.compute().items()}
    logged = json.loads((tmp_path / "logged.json").read_text())
    assert not compare(logged, expected), compare(logged, expected)
    assert all(v == v for v in logged.values())  # no NaN: every metric was fed
    # independent of the library: the masked mean cross-entropy of the noisy logits, by hand
    mask = stacked["mask"]
    log_p = torch.log_softmax(stacked["noisy_logits"], -1)
    nll = -log_p.gather(-1, stacked["target_ids"].unsqueeze(-1)).squeeze(-1)
    assert logged["val/utility/cross_entropy/cross_entropy"] == pytest.approx(
        float(nll[mask].mean()), rel=1e-9
    )


def test_distributed_guide_example_as_a_script(tmp_path: Path) -> None:
    page = ROOT / "docs" / "guides" / "distributed.md"
    (block,) = [b for b in python_blocks(page) if "run_distributed" in b]
    script = tmp_path / "check.py"
    script.write_text(block)
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    # the comment in the guide states the printed value
    stated = re.search(r"print\(.*\)  # (\[.*), \.\.\.\]", block)
    assert stated is not None
    calls = {"all_gather_single": 1, "all_reduce": 1}
    assert stated[1] == repr([calls])[:-1]
    assert proc.stdout.strip() == repr([calls, calls])
