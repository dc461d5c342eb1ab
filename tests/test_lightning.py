"""Lightning integration: logged values under DDP equal a single pass, epoch resets, checkpoints, adapters.

One ``ddp_spawn`` run (2 gloo ranks, 2 epochs) checks several things at once, one plain ``ddp`` run
(Lightning re-launches a script per rank) checks the same values; everything else runs in-process.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import pickle
import warnings
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")

import metrics_suite as ms  # noqa: E402
from metrics_suite.collection import DiagnosticCollection  # noqa: E402
from metrics_suite.integrations.lightning import (  # noqa: E402
    DiagnosticsCallback,
    LoggableDiagnostics,
    StageDiagnostics,
    log_diagnostics,
    output_keys,
)
from metrics_suite.testing import count_collectives  # noqa: E402
from tests.helpers import compare  # noqa: E402

N_VAL, VAL_BATCH = 12, 3  # 2 ranks x 2 batches x 3 items, no padding
N_TRAIN, TRAIN_BATCH = 8, 2
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- fixtures
def val_items() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(N_VAL, 2, generator=g, dtype=torch.float64) + 1
    zero = clean + 1 + torch.rand(N_VAL, 2, generator=g, dtype=torch.float64)
    recon = clean + (zero - clean) * torch.rand(N_VAL, 2, generator=g, dtype=torch.float64)
    emb = torch.randn(N_VAL, 4, 3, generator=g)
    mean = 0.5 * torch.randn(N_VAL, 4, 3, generator=g) + 0.3
    noise = torch.rand(N_VAL, 4, 1, generator=g) * torch.randn(N_VAL, 4, 3, generator=g)
    return TensorDataset(clean, recon, zero, emb, mean, noise)


def train_items() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(*(torch.randn(N_TRAIN, 5, 2, generator=g) for _ in range(3)))


def val_inputs(batch: Any, epoch: int) -> dict[str, torch.Tensor]:
    """Inputs that change with the epoch, so a value that mixes epochs is detectably wrong."""
    clean, recon, zero, emb, mean, noise = batch
    return {
        "source_model_loss": clean,
        "source_model_loss_with_reconstruction": recon + 0.3 * epoch,
        "source_model_loss_with_zero_ablation": zero,
        "input": emb * (1 + epoch),
        "mean": mean,
        "noise": noise,
    }


def half_square(hidden: torch.Tensor) -> torch.Tensor:
    """Per-item ½‖h‖²: its gradient is ``hidden``, so ``hidden + noise`` is a noisy credit."""
    return 0.5 * hidden.square().sum((1, 2))


def train_inputs(batch: Any, epoch: int) -> dict[str, Any]:
    emb, mean, noise = batch
    hidden = emb - epoch
    return {
        "input": hidden,
        "mean": mean,
        "noise": noise,
        "hidden": hidden,
        "credit": hidden + noise,
        "loss_fn": half_square,
    }


def val_collection() -> DiagnosticCollection:
    return ms.suite(
        "reconstruction",
        "noise",
        changed_tokens=False,
        downstream=False,
        reconstruction_score={"num_components": 2},
    )


def train_collection() -> DiagnosticCollection:
    # perturbation directions are keyed by item: split over ranks, they are the one-process ones
    credit = {"cosine": False, "nudging": False, "bridge_residual": False}
    return ms.suite("noise", "credit", **credit, perturbation_correlation={"seed": 5, "num_directions": 4})


def reference(stage: str, epoch: int, items: list[int] | None = None) -> DiagnosticCollection:
    """A collection updated in one pass over the stage's data of ``epoch`` (single process)."""
    data, make, inputs = {
        "val": (val_items(), val_collection, val_inputs),
        "train": (train_items(), train_collection, train_inputs),
    }[stage]
    collection = make()
    index = torch.arange(len(data)) if items is None else torch.tensor(items)
    collection.update(**inputs(data[index], epoch))
    return collection


class StepsModule(pl.LightningModule):
    """Updates the train/val collections of ``self.diagnostics`` in its steps."""

    owns_diagnostics = True

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        if self.owns_diagnostics:
            self.diagnostics = StageDiagnostics(train=train_collection(), val=val_collection())

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.diagnostics["train"].update(**train_inputs(batch, self.current_epoch))
        return self.lin(torch.ones(1, 1)).square().sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.diagnostics["val"].update(**val_inputs(batch, self.current_epoch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(train_items(), batch_size=TRAIN_BATCH)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(val_items(), batch_size=VAL_BATCH)


class AttachedSteps(StepsModule):
    """The same steps, without collections of its own: the callback attaches them."""

    owns_diagnostics = False


def attaching_callback(cls: type[DiagnosticsCallback] = DiagnosticsCallback) -> DiagnosticsCallback:
    return cls(StageDiagnostics(train=train_collection(), val=val_collection()))


class DiagModule(StepsModule):
    """Also logs a LoggableDiagnostics of the validation inputs via plain log_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = LoggableDiagnostics(val_collection(), prefix="plain/")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.plain.update(**val_inputs(batch, self.current_epoch))
        self.log_dict(self.plain)


def many_val_copies(copies: int = 20) -> DiagnosticCollection:
    """``copies`` copies of the val collection under distinct names: 14 values each, so 20 copies
    log more than the 64 KiB a spawn launcher's pipe holds as ``callback_metrics``."""
    metrics = val_collection().items()
    return DiagnosticCollection({f"{name}/copy_{i}": m.clone() for i in range(copies) for name, m in metrics})


class ManyValues(StepsModule):
    """Logs ``many_val_copies()`` through the callback and one value of its own."""

    owns_diagnostics = False

    def __init__(self) -> None:
        super().__init__()
        self.diagnostics = StageDiagnostics(train=train_collection(), val=many_val_copies())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("own_loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss


class CountingCallback(DiagnosticsCallback):
    """Logs how many collectives each stage's epoch-end compute issued."""

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        with count_collectives() as calls:
            super().on_train_epoch_end(trainer, pl_module)
        pl_module.log("collectives/train", float(sum(calls.values())))

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        with count_collectives() as calls:
            super().on_validation_epoch_end(trainer, pl_module)
        pl_module.log("collectives/val", float(sum(calls.values())))


class SaveMidEpoch(pl.Callback):
    """Saves a checkpoint after the first validation batch of epoch 0 (mid-validation) and, given
    ``train_path``, one after the second training batch of epoch 0 (mid-training)."""

    def __init__(self, path: Path, train_path: Path | None = None) -> None:
        self.path = path
        self.train_path = train_path

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == 0 and batch_idx == 0:
            trainer.save_checkpoint(self.path)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.train_path is not None and trainer.current_epoch == 0 and batch_idx == 1:
            trainer.save_checkpoint(self.train_path)


class TrainBatches(pl.Callback):
    """Records the training batches each epoch actually runs."""

    def __init__(self) -> None:
        self.seen: dict[int, list[Any]] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.seen.setdefault(trainer.current_epoch, []).append(batch)


def read_csv_metrics(path: Path) -> dict[tuple[int, str], float]:
    """``{(epoch, key): value}`` from a CSVLogger file."""
    values: dict[tuple[int, str], float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key not in ("epoch", "step"):
                    values[(int(float(row["epoch"])), key)] = float(value)
    return values


def floats(values: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in values.items()}


def assert_partial_val_sums(
    saved: dict[str, torch.Tensor], prefix: str, items: list[int], updates: int | None = None
) -> None:
    """``saved[prefix + state key]`` holds the val states of a single pass over ``items`` of epoch 0
    (and, given ``updates``, the update count summed over ranks)."""
    partial = reference("val", 0, items=items)
    for name, metric in partial.items(keep_base=True):
        for attr in metric._defaults:
            torch.testing.assert_close(
                saved[f"{prefix}{name}.{attr}"], getattr(metric, attr), rtol=1e-12, atol=0
            )
        if updates is not None:
            assert int(saved[f"{prefix}{name}.update_count"]) == updates, name


def quiet_trainer(**kwargs: Any) -> Any:
    warnings.filterwarnings(
        "ignore", message=".*(does not have many workers|LeafSpec|litlogger|dataloader is not resumable).*"
    )
    return pl.Trainer(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_spawn_logs_the_single_process_values(tmp_path: Path) -> None:
    """2 gloo ranks, 2 epochs: callback, plain log_dict and the train stage log exactly the values of
    one process over the same epoch's data (so each epoch starts empty, sanity check included); each
    compute costs 2 collectives; a mid-epoch checkpoint holds the states summed over the ranks."""
    ckpt = tmp_path / "mid.ckpt"
    callback = CountingCallback()
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        num_sanity_val_steps=1,
        logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=0),
        callbacks=[SaveMidEpoch(ckpt), callback],
    )
    trainer.fit(DiagModule())
    assert callback.history == []  # documented: the hooks ran on the spawned processes' copies
    assert float(trainer.callback_metrics["val/noise/noise/input_norm"]) == pytest.approx(
        float(reference("val", 1).compute()["noise/noise/input_norm"]), rel=1e-12
    )
    logged = read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")

    for epoch in range(2):
        expected_val = floats(reference("val", epoch).compute())
        expected_train = floats(reference("train", epoch).compute())
        for prefix, expected in [
            ("val/", expected_val),
            ("plain/", expected_val),
            ("train/", expected_train),
        ]:
            actual = {
                k[len(prefix) :]: v for (e, k), v in logged.items() if e == epoch and k.startswith(prefix)
            }
            assert not compare(actual, expected), (epoch, prefix, compare(actual, expected))
        assert logged[(epoch, "collectives/val")] == 2.0  # one fused all_reduce + the layout check
        assert logged[(epoch, "collectives/train")] == 2.0

    # independent of the library: the ratio of sums of epoch 1 only, by hand
    clean, recon, zero = (t.numpy() for t in val_items().tensors[:3])
    by_hand = (zero.sum(0) - (recon + 0.3).sum(0)) / (zero.sum(0) - clean.sum(0))
    for c in range(2):
        key = f"val/reconstruction/reconstruction_score/component_{c}"
        assert math.isclose(logged[(1, key)], by_hand[c], rel_tol=1e-12)

    # the first validation batch of each rank (items 0, 2, 4 and 1, 3, 5), summed
    state_dict = torch.load(ckpt, weights_only=False)["state_dict"]
    assert_partial_val_sums(state_dict, "diagnostics.val_metrics.", items=[0, 1, 2, 3, 4, 5], updates=2)


def run_ddp_script(out: Path, *args: str) -> str:
    """Run ``tests/lightning_ddp_script.py out *args`` (5 minutes at most, so a hang fails); its stderr."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = ROOT / "tests" / "lightning_ddp_script.py"
    # a session of its own, so the ranks Lightning starts die with it whatever happens
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def test_ddp_spawn_with_more_values_than_the_launcher_pipe_holds_returns(tmp_path: Path) -> None:
    """Regression: 280 val values (~87 KB as callback_metrics) hung ``fit`` under ddp_spawn forever,
    rank 0 blocked writing its result into a pipe the main process reads only after the workers exit.
    Now fit returns, with a warning; the logger has every value (equal to one process's); the main
    process gets the module's own logged value."""
    stderr = run_ddp_script(tmp_path, "spawn_many")
    assert "logged values are left out of the `callback_metrics`" in stderr
    assert json.loads((tmp_path / "main_keys.json").read_text()) == ["own_loss"]
    logged = read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    expected = floats(reference("val", 0).compute())
    actual = {k: v for (e, k), v in logged.items() if e == 0 and k.startswith("val/")}
    assert len(actual) == 20 * len(expected)
    for i in (0, 19):
        copy = {k.replace(f"/copy_{i}", "")[len("val/") :]: v for k, v in actual.items() if f"/copy_{i}" in k}
        assert not compare(copy, expected), compare(copy, expected)


# ---------------------------------------------------------------------------------------------- one process
class AttachModule(pl.LightningModule):
    """Has no collections of its own: the callback attaches them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.diagnostics["test"].update(**val_inputs(batch, 3))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(val_items(), batch_size=5)  # uneven last batch


def test_callback_attaches_and_logs_the_test_stage() -> None:
    callback = DiagnosticsCallback(StageDiagnostics(test=val_collection()))
    module = AttachModule()
    trainer = quiet_trainer(devices=1, logger=False, callbacks=[callback])
    (result,) = trainer.test(module, verbose=False)
    expected = floats(reference("val", 3).compute())
    assert not compare({k[len("test/") :]: v for k, v in result.items()}, expected)
    assert [(r["stage"], r["epoch"]) for r in callback.history] == [("test", 0)]
    assert not compare(callback.history[0]["values"], expected)
    assert module.diagnostics is callback.diagnostics
    assert all(int(t.abs().sum()) == 0 for _, t in module.diagnostics["test"]["noise/noise"].state_items())


def test_log_diagnostics_returns_computes_and_resets() -> None:
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(1, 1)
            self.col = val_collection()
            self.logged: dict[str, torch.Tensor] = {}

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.col.update(**val_inputs(batch, 0))

        def on_validation_epoch_end(self) -> None:
            self.logged = log_diagnostics(self, self.col, prefix="v/")

        def val_dataloader(self) -> DataLoader:
            return DataLoader(val_items(), batch_size=4)

    module = Module()
    (result,) = quiet_trainer(devices=1, logger=False).validate(module, verbose=False)
    expected = floats(reference("val", 0).compute())
    assert not compare(floats(module.logged), expected)
    assert not compare({k[2:]: v for k, v in result.items()}, expected)
    assert all(int(t.abs().sum()) == 0 for m in module.col.values() for _, t in m.state_items())


# ---------------------------------------------------------------------------------------------- adapters
def test_loggable_diagnostics_computes_once_per_round() -> None:
    wrapped = LoggableDiagnostics(val_collection(), prefix="p/")
    calls = []
    compute = wrapped.collection.compute
    wrapped.collection.compute = lambda: calls.append(1) or compute()  # type: ignore[method-assign]
    wrapped.update(**val_inputs(val_items()[:], 1))
    expected = floats(reference("val", 1).compute(), prefix="p/")
    assert list(wrapped) == list(expected)  # keys known before any compute, in compute order
    assert {k: float(view.compute()) for k, view in wrapped.items()} == pytest.approx(expected, rel=1e-12)
    assert len(calls) == 1  # one sync for every key
    next(iter(wrapped.values())).compute()  # a key asked twice starts a new round
    assert len(calls) == 2
    with pytest.raises(TypeError, match="read-only"):
        wrapped["p/noise/noise/input_norm"].update()
    wrapped["p/noise/noise/input_norm"].reset()
    assert all(int(t.abs().sum()) == 0 for m in wrapped.collection.values() for _, t in m.state_items())


def test_output_keys_are_the_compute_keys_of_every_suite() -> None:
    reference_params = {"w": torch.ones(2, 2)}
    collection = ms.suite(
        activations={"num_features": 3},
        feature_sparsity={"num_features": 4},
        prediction_change={"num_classes": 3},
        feature_drift={"reference": reference_params},
        cosine={"num_layers": 3},
    )
    keys = output_keys(collection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert keys == list(collection.compute())
    assert "credit/cosine/layer_2" in keys and "credit/feature_drift/w" in keys


def test_stage_diagnostics_container() -> None:
    diagnostics = StageDiagnostics(train=ms.suite("noise"), test=ms.suite("noise"))
    assert list(diagnostics) == ["train", "test"] and len(diagnostics) == 2
    assert diagnostics["train"] is not diagnostics["test"]
    assert "val" not in diagnostics and diagnostics.get("val") is None
    with pytest.raises(KeyError, match="no 'val' diagnostics"):
        diagnostics["val"]
    with pytest.raises(TypeError, match="`val` must be a DiagnosticCollection"):
        StageDiagnostics(val={"a": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown stage"):
        StageDiagnostics.from_factory(lambda: ms.suite("noise"), ["validation"])
    built = StageDiagnostics.from_factory(lambda: ms.suite("noise"), ["train", "val"])
    assert built["train"] is not built["val"]
    diagnostics.train()  # the nn.Module method is not shadowed by the "train" stage
    assert any(k.startswith("train_metrics.noise/noise.") for k in diagnostics.state_dict())


def test_callback_rejects_a_module_without_stage_diagnostics() -> None:
    module = AttachModule()
    with pytest.raises(TypeError, match="must be a StageDiagnostics"):
        DiagnosticsCallback().setup(None, module, "fit")  # type: ignore[arg-type]
    module.diagnostics = StageDiagnostics(val=ms.suite("noise"))
    with pytest.raises(ValueError, match="already exists"):
        DiagnosticsCallback(StageDiagnostics(val=ms.suite("noise"))).setup(None, module, "fit")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="StageDiagnostics"):
        DiagnosticsCallback({"val": ms.suite("noise")})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- checkpoints
def test_metric_states_are_in_the_module_checkpoint_and_restore() -> None:
    """Mid-epoch: states are persistent, so a fresh module loaded from the state_dict continues exactly."""
    data = val_items()
    module = DiagModule()
    module.diagnostics["val"].update(**val_inputs(data[:5], 0))
    state = pickle.loads(pickle.dumps(module.state_dict()))
    restored = DiagModule()
    restored.load_state_dict(state)
    for m in (module, restored):
        m.diagnostics["val"].update(**val_inputs(data[5:], 0))
    expected = floats(reference("val", 0).compute())
    assert not compare(floats(restored.diagnostics["val"].compute()), expected)
    assert not compare(floats(module.diagnostics["val"].compute()), expected)


def test_on_load_checkpoint_keeps_global_sums_on_rank_zero_only() -> None:
    callback = DiagnosticsCallback()
    for rank, kept in [(0, True), (1, False)]:
        module = DiagModule()
        module.diagnostics["val"].update(**val_inputs(val_items()[:], 0))
        callback.on_load_checkpoint(SimpleNamespace(global_rank=rank), module, {})  # type: ignore[arg-type]
        total = sum(
            float(t.abs().sum()) for m in module.diagnostics["val"].values() for _, t in m.state_items()
        )
        assert (total > 0) is kept


@pytest.fixture(scope="module", params=["owned", "attached"])
def mid_epoch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One epoch of fit that saves a checkpoint mid-training (after 2 of 4 batches) and one
    mid-validation (after 1 of 4 batches), with the module's own collections or attached ones."""
    attached = request.param == "attached"
    out = tmp_path_factory.mktemp(request.param)
    run = SimpleNamespace(
        attached=attached,
        train_ckpt=out / "train.ckpt",
        val_ckpt=out / "val.ckpt",
        module=AttachedSteps if attached else StepsModule,
        callback=attaching_callback if attached else DiagnosticsCallback,
    )
    trainer = quiet_trainer(
        devices=1,
        logger=False,
        max_epochs=1,
        num_sanity_val_steps=0,
        callbacks=[run.callback(), SaveMidEpoch(run.val_ckpt, run.train_ckpt)],
    )
    trainer.fit(run.module())
    return run


def resume(run: SimpleNamespace, ckpt: Path, max_epochs: int, *callbacks: Any) -> dict[tuple[str, int], Any]:
    """``fit(ckpt_path=ckpt)`` with a fresh module and callback; the callback's history by (stage, epoch)."""
    callback = run.callback()
    trainer = quiet_trainer(
        devices=1,
        logger=False,
        max_epochs=max_epochs,
        num_sanity_val_steps=0,
        callbacks=[callback, *callbacks],
    )
    trainer.fit(run.module(), ckpt_path=ckpt)
    return {(r["stage"], r["epoch"]): r["values"] for r in callback.history}


def test_mid_epoch_checkpoint_holds_the_partial_sums(mid_epoch: SimpleNamespace) -> None:
    """Owned collections are saved in the module's state_dict; attached ones in the callback's own
    entry only, so the module loads without the callback (``load_from_checkpoint``, ``test``)."""
    checkpoint = torch.load(mid_epoch.val_ckpt, weights_only=False)
    module_keys = [key for key in checkpoint["state_dict"] if key.startswith("diagnostics.")]
    if mid_epoch.attached:
        assert not module_keys
        states = checkpoint["callbacks"][DiagnosticsCallback().state_key]["states"]
        assert_partial_val_sums(states, "val_metrics.", items=[0, 1, 2])
    else:
        assert_partial_val_sums(checkpoint["state_dict"], "diagnostics.val_metrics.", items=[0, 1, 2])
    mid_epoch.module.load_from_checkpoint(mid_epoch.val_ckpt)
    if mid_epoch.attached:  # another module and other stages: the saved train/val states are ignored
        callback = DiagnosticsCallback(StageDiagnostics(test=val_collection()))
        trainer = quiet_trainer(devices=1, logger=False, callbacks=[callback])
        (result,) = trainer.test(AttachModule(), ckpt_path=mid_epoch.val_ckpt, verbose=False)
        expected = floats(reference("val", 3).compute())
        assert not compare({k[len("test/") :]: v for k, v in result.items()}, expected)


def test_fit_resumed_mid_validation_starts_the_next_validation_empty(mid_epoch: SimpleNamespace) -> None:
    """Lightning skips the rest of the interrupted validation: the restored partial sums must not
    leak into the next one, while the finished training epoch keeps its restored sums."""
    history = resume(mid_epoch, mid_epoch.val_ckpt, max_epochs=2)
    assert sorted(history) == [("train", 0), ("train", 1), ("val", 1)]
    for (stage, epoch), values in history.items():
        assert not compare(values, floats(reference(stage, epoch).compute())), (stage, epoch)


def test_fit_resumed_mid_training_continues_the_epoch(mid_epoch: SimpleNamespace) -> None:
    """The train states of the first two batches are restored and the epoch adds the batches it runs
    after the resume (Lightning re-reads a plain DataLoader from its start, so they are recorded)."""
    batches = TrainBatches()
    history = resume(mid_epoch, mid_epoch.train_ckpt, 1, batches)
    expected = train_collection()
    expected.update(**train_inputs(train_items()[: 2 * TRAIN_BATCH], 0))
    for batch in batches.seen[0]:
        expected.update(**train_inputs(batch, 0))
    assert not compare(history[("train", 0)], floats(expected.compute()))
    assert not compare(history[("val", 0)], floats(reference("val", 0).compute()))


def test_validate_from_a_mid_validation_checkpoint_starts_empty(mid_epoch: SimpleNamespace) -> None:
    callback = mid_epoch.callback()
    trainer = quiet_trainer(devices=1, logger=False, callbacks=[callback])
    (result,) = trainer.validate(mid_epoch.module(), ckpt_path=mid_epoch.val_ckpt, verbose=False)
    expected = floats(reference("val", 0).compute())
    assert not compare({k[len("val/") :]: v for k, v in result.items()}, expected)
    assert not compare(callback.history[0]["values"], expected)


def test_several_val_dataloaders_warn_once_and_are_summed() -> None:
    class TwoLoaders(StepsModule):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().validation_step(batch, batch_idx)

        def val_dataloader(self) -> list[DataLoader]:
            return [DataLoader(val_items(), batch_size=VAL_BATCH), DataLoader(val_items(), batch_size=4)]

    callback = DiagnosticsCallback()
    with pytest.warns(UserWarning, match="'val' stage has 2 dataloaders") as caught:
        quiet_trainer(devices=1, logger=False, max_epochs=2, callbacks=[callback]).fit(TwoLoaders())
    assert sum("dataloaders;" in str(w.message) for w in caught) == 1  # sanity check + 2 epochs
    expected = reference("val", 1)
    expected.update(**val_inputs(val_items()[:], 1))  # the second loader holds the same items
    last_val = [r["values"] for r in callback.history if r["stage"] == "val"][-1]
    assert not compare(last_val, floats(expected.compute()))


def test_perturbation_metric_crosses_the_spawn_pickler() -> None:
    """ddp_spawn pickles the module with torch.multiprocessing; the copy must draw the same directions."""
    metric = ms.PerturbationCorrelation(seed=3, num_directions=4)
    hidden = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    credit = hidden + torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    metric.update(hidden[:2], credit[:2], lambda h: 0.5 * h.square().sum(-1))  # states travel too
    copy = pickle.loads(ForkingPickler.dumps(metric))
    for m in (metric, copy):
        m.update(hidden[2:], credit[2:], lambda h: 0.5 * h.square().sum(-1))
    assert copy.seed == 3
    assert torch.equal(copy.compute(), metric.compute())
    fresh = ms.PerturbationCorrelation(seed=4, num_directions=4)  # negative control: another seed
    fresh.update(hidden, credit, lambda h: 0.5 * h.square().sum(-1))
    assert not torch.equal(fresh.compute(), metric.compute())


def test_plain_ddp_strategy_logs_the_single_process_values(tmp_path: Path) -> None:
    """strategy="ddp" (Lightning re-launches the script per rank) gives the same values as one process;
    the collections are attached by the callback, whose checkpoint entry holds the sums over the ranks."""
    run_ddp_script(tmp_path)
    logged = read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    for stage in ("val", "train"):
        expected = floats(reference(stage, 0).compute())
        actual = {
            k[len(stage) + 1 :]: v for (e, k), v in logged.items() if e == 0 and k.startswith(f"{stage}/")
        }
        assert not compare(actual, expected), (stage, compare(actual, expected))
        assert logged[(0, f"collectives/{stage}")] == 2.0
    checkpoint = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    assert not any(key.startswith("diagnostics.") for key in checkpoint["state_dict"])
    states = checkpoint["callbacks"][attaching_callback(CountingCallback).state_key]["states"]
    assert_partial_val_sums(states, "val_metrics.", items=[0, 1, 2, 3, 4, 5], updates=2)  # 2 ranks x 1 batch
