"""PyTorch Lightning integration: log a [`DiagnosticCollection`][metrics_suite.collection.DiagnosticCollection] with one
collective per compute.

The recommended pattern, written out by hand::

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.val_diagnostics = ms.suite("utility", "noise")  # a submodule: moves and checkpoints

        def validation_step(self, batch, batch_idx):
            self.val_diagnostics.update(clean_logits=..., noisy_logits=..., input=..., mean=..., noise=...)

        def on_validation_epoch_end(self):
            log_diagnostics(self, self.val_diagnostics, prefix="val/")  # compute (1 sync) + log_dict + reset

Three tools, from the most explicit to the most automatic:

* [`log_diagnostics`][metrics_suite.integrations.lightning.log_diagnostics] does the epoch-end part: ``compute()`` (one fused ``all_reduce`` for the
  whole collection; every rank gets the global values), ``log_dict(..., sync_dist=False)`` (the
  values are already global, another reduction would only cost collectives) and ``reset()``.
* [`DiagnosticsCallback`][metrics_suite.integrations.lightning.DiagnosticsCallback] does it for every stage (train/val/test) of the collections a module
  keeps in ``self.diagnostics = StageDiagnostics(val=..., ...)``, resets each stage at epoch start
  (so states restored from a checkpoint never leak into a validation) and makes mid-epoch
  checkpoints exact under DDP.
* [`LoggableDiagnostics`][metrics_suite.integrations.lightning.LoggableDiagnostics] lets plain ``self.log_dict(x)`` take a collection: Lightning then
  computes and resets it itself. A bare collection does not work there: Lightning calls each
  metric's ``compute()`` on its own (one sync per metric) and needs a scalar tensor back, while
  multi-statistic metrics return dicts.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from metrics_suite.base import DiagnosticMetric, fused_all_reduce
from metrics_suite.collection import DiagnosticCollection
from metrics_suite.registry import SUITES

try:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher
    from pytorch_lightning.utilities import rank_zero_warn
    from pytorch_lightning.utilities.warnings import PossibleUserWarning
except ImportError:  # pragma: no cover - the unified ``lightning`` package
    try:
        import lightning.pytorch as pl  # type: ignore[no-redef]
        from lightning.pytorch.strategies.launchers import (  # type: ignore[no-redef]
            _MultiProcessingLauncher,
        )
        from lightning.pytorch.utilities import rank_zero_warn  # type: ignore[no-redef]
        from lightning.pytorch.utilities.warnings import PossibleUserWarning  # type: ignore[no-redef]
    except ImportError as err:
        raise ModuleNotFoundError(
            "metrics_suite.integrations.lightning needs PyTorch Lightning: "
            "pip install 'metrics_suite[lightning]'"
        ) from err

__all__ = [
    "STAGES",
    "DiagnosticsCallback",
    "LoggableDiagnostics",
    "StageDiagnostics",
    "log_diagnostics",
    "output_keys",
]

#: Stages of [`StageDiagnostics`][metrics_suite.integrations.lightning.StageDiagnostics], ended by [`DiagnosticsCallback`][metrics_suite.integrations.lightning.DiagnosticsCallback] at ``on_{stage}_epoch_end``.
STAGES = ("train", "val", "test")


# Lightning recommends sync_dist=True for every epoch-level tensor logged under DDP; our values are
# already global (the collection synced them), so the warning is silenced for suite keys only.
_SYNCED_KEY_WARNING = r"It is recommended to use `self\.log\('([^']*/)?(" + "|".join(SUITES) + ")/"


def _silence_sync_dist_warning() -> None:
    warnings.filterwarnings("ignore", message=_SYNCED_KEY_WARNING, category=PossibleUserWarning)


def _as_float(value: Tensor) -> Tensor:
    """Counts travel as float64, so Lightning does not warn about reducing an integer tensor."""
    return value if value.is_floating_point() else value.to(torch.float64)


def log_diagnostics(
    module: pl.LightningModule,
    collection: DiagnosticCollection,
    prefix: str = "",
    *,
    prog_bar: bool = False,
    logger: bool | None = None,
    reset: bool = True,
) -> dict[str, Tensor]:
    """Compute ``collection`` (one collective), log every value with ``module.log_dict`` and reset it.

    Call it from an epoch-end hook (``on_validation_epoch_end``, ...) on every rank. The values are
    logged with ``sync_dist=False``: ``DiagnosticCollection.compute()`` already summed the states of
    all ranks, so every rank logs the same global values.

    Also reset a validation or test collection at epoch start (``on_validation_epoch_start``):
    its states are saved in checkpoints, and Lightning does not resume an evaluation where a
    checkpoint interrupted it, so restored partial sums would otherwise leak into the next value.

    Args:
        module: the LightningModule that logs.
        collection: the collection to compute.
        prefix: prepended to every key, e.g. ``"val/"`` gives ``val/utility/next_token/jeffreys``.
        prog_bar: also show the values in the progress bar.
        logger: send the values to the logger(s) (``None``: Lightning's default, yes).
        reset: reset the collection after logging (the next epoch starts empty).

    Returns:
        The computed values (keys without ``prefix``).
    """
    values = collection.compute()
    _silence_sync_dist_warning()
    module.log_dict(
        {f"{prefix}{key}": _as_float(value) for key, value in values.items()},
        prog_bar=prog_bar,
        logger=logger,
        on_step=False,
        on_epoch=True,
        sync_dist=False,
    )
    if reset:
        collection.reset()
    return values


# ------------------------------------------------------------------------------------------- callback
class StageDiagnostics(nn.Module):
    """One [`DiagnosticCollection`][metrics_suite.collection.DiagnosticCollection] per stage, as submodules.

    Indexed by stage name (``diagnostics["val"]``); the collections are registered as submodules
    ``{stage}_metrics`` (``nn.ModuleDict`` cannot hold a ``"train"`` key: it clashes with
    ``Module.train()``), so they follow the module's device and their states are in its
    ``state_dict``.

    Args:
        train: collection updated in ``training_step``.
        val: collection updated in ``validation_step``.
        test: collection updated in ``test_step``.

    Examples:
        >>> import metrics_suite as ms
        >>> diagnostics = StageDiagnostics(val=ms.suite("noise"), test=ms.suite("noise"))
        >>> list(diagnostics), "val" in diagnostics, "train" in diagnostics
        (['val', 'test'], True, False)
        >>> sorted(k for k in diagnostics.state_dict() if k.endswith("nonfinite_count"))
        ['test_metrics.noise/noise.nonfinite_count', 'val_metrics.noise/noise.nonfinite_count']
    """

    def __init__(
        self,
        train: DiagnosticCollection | None = None,
        val: DiagnosticCollection | None = None,
        test: DiagnosticCollection | None = None,
    ) -> None:
        super().__init__()
        self._stages: list[str] = []
        for stage, collection in zip(STAGES, (train, val, test)):
            if collection is None:
                continue
            if not isinstance(collection, DiagnosticCollection):
                raise TypeError(
                    f"`{stage}` must be a DiagnosticCollection (e.g. ms.suite(...)), got {type(collection).__name__}"
                )
            self.add_module(f"{stage}_metrics", collection)
            self._stages.append(stage)

    @classmethod
    def from_factory(
        cls, factory: Callable[[], DiagnosticCollection], stages: Sequence[str] = ("val",)
    ) -> StageDiagnostics:
        """A fresh ``factory()`` collection for each of ``stages``.

        Examples:
            >>> import metrics_suite as ms
            >>> list(StageDiagnostics.from_factory(lambda: ms.suite("utility"), ["train", "val"]))
            ['train', 'val']
        """
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
        return cls(**{stage: factory() for stage in stages})

    def __getitem__(self, stage: str) -> DiagnosticCollection:
        if stage not in self._stages:
            raise KeyError(f"no {stage!r} diagnostics; this module has {self._stages}")
        return self._modules[f"{stage}_metrics"]  # type: ignore[return-value]

    def __contains__(self, stage: object) -> bool:
        return stage in self._stages

    def __iter__(self) -> Iterator[str]:
        return iter(self._stages)

    def __len__(self) -> int:
        return len(self._stages)

    def keys(self) -> list[str]:
        return list(self._stages)

    def values(self) -> list[DiagnosticCollection]:
        return [self[stage] for stage in self._stages]

    def items(self) -> list[tuple[str, DiagnosticCollection]]:
        return [(stage, self[stage]) for stage in self._stages]

    def get(self, stage: str) -> DiagnosticCollection | None:
        return self[stage] if stage in self._stages else None


def _state_entries(diagnostics: nn.Module, prefix: str = "") -> list[tuple[str, Tensor]]:
    """``(state_dict key, tensor)`` of every persistent metric state under ``diagnostics``.

    With the update count a [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] saves: summed over ranks
    like the states, so a metric only other ranks updated is not "never updated" after a resume.
    """
    entries: list[tuple[str, Tensor]] = []
    for name, metric in diagnostics.named_modules(prefix=prefix):
        if isinstance(metric, Metric):
            persistent = [attr for attr in metric._defaults if metric._persistent[attr]]
            entries.extend((f"{name}.{attr}", getattr(metric, attr)) for attr in persistent)
            if isinstance(metric, DiagnosticMetric) and persistent:
                count = torch.tensor(metric._update_count, dtype=torch.int64, device=metric.device)
                entries.append((f"{name}.update_count", count))
    return entries


# Lightning's spawn and fork launchers (``ddp_spawn``, ``ddp_fork``) send rank 0's result, with
# ``torch.save(trainer.callback_metrics)`` in it, through a pipe the main process reads only after
# every worker has exited: a result larger than the pipe's buffer (64 KiB on Linux, about 210 logged
# scalars) blocks rank 0 in the write forever. Below this budget the rest of the result fits too.
_SPAWN_RESULT_BUDGET = 48 * 1024


def _saved_size(metrics: Mapping[str, Tensor]) -> int:
    """Bytes of ``metrics`` as the spawn launcher serialises them."""
    buffer = io.BytesIO()
    torch.save({key: value.detach().cpu() for key, value in metrics.items()}, buffer)
    return buffer.getbuffer().nbytes


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class DiagnosticsCallback(pl.Callback):
    """Reset every stage's diagnostics at the start of its epoch; compute, log and reset them at the end.

    The LightningModule keeps its collections in a [`StageDiagnostics`][metrics_suite.integrations.lightning.StageDiagnostics] (submodules, so they
    follow the module's device and their states are saved in checkpoints) and only updates them::

        class Model(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.diagnostics = StageDiagnostics(val=ms.suite("utility"), test=ms.suite("utility"))

            def validation_step(self, batch, batch_idx):
                self.diagnostics["val"].update(clean_logits=..., noisy_logits=...)

        trainer = pl.Trainer(callbacks=[DiagnosticsCallback()])  # or the module's configure_callbacks()

    At ``on_train_epoch_end``, ``on_validation_epoch_end`` and ``on_test_epoch_end`` the callback
    runs [`log_diagnostics`][metrics_suite.integrations.lightning.log_diagnostics] on the stage's collection (``"train"``, ``"val"``, ``"test"``) with
    the prefix ``"{stage}/"``: one collective per compute, global values logged with
    ``sync_dist=False``, reset afterwards. The sanity-check validation is computed and reset too,
    so it never leaks into epoch 0.

    At ``on_{stage}_epoch_start`` it resets the stage's collection, so states restored from a
    checkpoint never leak into a value: Lightning does not resume a validation or test where a
    checkpoint interrupted it (``fit(ckpt_path=...)`` skips or restarts it, ``validate`` and
    ``test`` start over). Training is different: when Lightning resumes a training epoch mid-way it
    does not call ``on_train_epoch_start``, so the restored train states are kept and the epoch
    continues its sums.

    Checkpoints: every state is a sum, so a checkpoint stores the states summed over all ranks
    (one more collective when the checkpoint is saved), and on restore every rank but rank 0 starts
    from zero: a training epoch resumed from a mid-epoch checkpoint continues its sums exactly, on
    any number of ranks, from the batches the resumed run feeds it (a plain ``DataLoader`` is
    re-read from its start, as Lightning warns; a resumable one continues where it stopped).
    (Without the callback, a checkpoint holds rank 0's local states only.)

    Several val or test dataloaders feed the same collection, so its value covers all of them
    (the callback warns once per stage); for one value per dataloader keep one collection per
    ``dataloader_idx`` and log it with [`log_diagnostics`][metrics_suite.integrations.lightning.log_diagnostics].

    Args:
        diagnostics: a [`StageDiagnostics`][metrics_suite.integrations.lightning.StageDiagnostics] to attach to the module as ``attribute`` at
            ``setup``, for modules that do not create their own; ``None`` (default) uses the
            module's. Attached collections are a plain attribute of the module, not a submodule:
            the callback moves them to the module's device, and saves their states in its own
            checkpoint entry ([`state_dict`][metrics_suite.integrations.lightning.DiagnosticsCallback.state_dict]), so the module's ``state_dict`` (and
            ``Model.load_from_checkpoint``) stays as without the callback.
        attribute: name of the module attribute holding the [`StageDiagnostics`][metrics_suite.integrations.lightning.StageDiagnostics].
        prog_bar: also show the values in the progress bar.
        logger: send the values to the logger(s) (``None``: Lightning's default, yes).

    Attributes:
        history: one record per computed epoch (sanity check excluded):
            ``{"stage": ..., "epoch": ..., "values": {key: float}}`` with keys without prefix,
            identical on every rank. It fills in the processes that run the hooks: with
            ``strategy="ddp_spawn"`` those are spawned copies of the callback, so after
            ``trainer.fit`` the main process's ``history`` is empty. There, read the last logged
            values from ``trainer.callback_metrics``, or write ``history`` to a file from rank 0
            in a callback after this one (as the demo's ``ResultsWriter`` does), or use
            ``strategy="ddp"``. Lightning sends ``callback_metrics`` to the main process through a
            pipe it reads only after the workers exit, which hangs ``fit`` once they take more
            than the pipe's 64 KiB (about 210 logged values): when they would, the callback
            removes the values it logged from rank 0's ``callback_metrics`` at ``teardown``
            (with a warning), so the main process gets the others and ``fit`` returns.
    """

    def __init__(
        self,
        diagnostics: StageDiagnostics | None = None,
        *,
        attribute: str = "diagnostics",
        prog_bar: bool = False,
        logger: bool | None = None,
    ) -> None:
        super().__init__()
        if diagnostics is not None and not isinstance(diagnostics, StageDiagnostics):
            raise TypeError(f"`diagnostics` must be a StageDiagnostics, got {type(diagnostics).__name__}")
        self.diagnostics = diagnostics
        self.attribute = attribute
        self.prog_bar = prog_bar
        self.logger = logger
        self.history: list[dict[str, Any]] = []
        self._warned_stages: set[str] = set()
        self._logged_keys: set[str] = set()

    @property
    def state_key(self) -> str:
        # one checkpoint entry per attribute, so two callbacks on different attributes do not collide
        return self._generate_state_key(attribute=self.attribute)

    def stage_diagnostics(self, pl_module: pl.LightningModule) -> StageDiagnostics:
        """The module's [`StageDiagnostics`][metrics_suite.integrations.lightning.StageDiagnostics]."""
        found = getattr(pl_module, self.attribute, None)
        if not isinstance(found, StageDiagnostics):
            raise TypeError(
                f"DiagnosticsCallback: `{type(pl_module).__name__}.{self.attribute}` must be a StageDiagnostics "
                f"(e.g. StageDiagnostics(val=ms.suite(...)) in __init__), got {type(found).__name__}"
            )
        return found

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Attach ``diagnostics`` (if given) and check that the module has its stage collections."""
        if self.diagnostics is not None:
            existing = getattr(pl_module, self.attribute, None)
            if existing is None:
                # not a submodule: the module's state_dict stays free of states it does not own
                object.__setattr__(pl_module, self.attribute, self.diagnostics)
            elif existing is not self.diagnostics:
                raise ValueError(
                    f"`{type(pl_module).__name__}.{self.attribute}` already exists: pass no diagnostics "
                    "to DiagnosticsCallback, or choose another `attribute`"
                )
        self.stage_diagnostics(pl_module)
        _silence_sync_dist_warning()

    def _follow_device(self, pl_module: pl.LightningModule) -> None:
        # attached collections are no submodules, so the module's `.to(device)` does not move them
        if self.diagnostics is not None:
            self.diagnostics.to(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move attached collections to the module's device."""
        self._follow_device(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move attached collections to the module's device."""
        self._follow_device(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move attached collections to the module's device."""
        self._follow_device(pl_module)

    # ------------------------------------------------------------------ epoch starts
    def _start_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        collection = self.stage_diagnostics(pl_module).get(stage)
        if collection is None:
            return
        if stage != "train" and stage not in self._warned_stages:
            loaders = len(trainer.num_test_batches if stage == "test" else trainer.num_val_batches)
            if loaders > 1:
                self._warned_stages.add(stage)
                rank_zero_warn(
                    f"DiagnosticsCallback: the {stage!r} stage has {loaders} dataloaders; its collection "
                    "sums all of them into one value per epoch (keep one collection per dataloader_idx "
                    "for separate values)"
                )
        collection.reset()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset the ``"train"`` collection (not called when Lightning resumes an epoch mid-way)."""
        self._start_stage(trainer, pl_module, "train")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset the ``"val"`` collection, so restored checkpoint states never leak into it."""
        self._start_stage(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset the ``"test"`` collection, so restored checkpoint states never leak into it."""
        self._start_stage(trainer, pl_module, "test")

    # ------------------------------------------------------------------ epoch ends
    def _log_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        collection = self.stage_diagnostics(pl_module).get(stage)
        if collection is None:
            return
        values = log_diagnostics(
            pl_module, collection, prefix=f"{stage}/", prog_bar=self.prog_bar, logger=self.logger
        )
        self._logged_keys.update(f"{stage}/{key}" for key in values)
        if not trainer.sanity_checking:
            self.history.append(
                {
                    "stage": stage,
                    "epoch": trainer.current_epoch,
                    "values": {key: float(value) for key, value in values.items()},
                }
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log and reset the ``"train"`` collection."""
        self._log_stage(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log and reset the ``"val"`` collection (sanity check included, not recorded in ``history``)."""
        self._log_stage(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log and reset the ``"test"`` collection."""
        self._log_stage(trainer, pl_module, "test")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Under a spawn or fork launcher, keep the result rank 0 sends to the main process small
        enough that ``fit`` returns (see ``history``)."""
        if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            return
        metrics = trainer.callback_metrics
        if _saved_size(metrics) <= _SPAWN_RESULT_BUDGET:
            return
        removed = [key for key in metrics if key in self._logged_keys]
        for key in removed:
            del metrics[key]
        rank_zero_warn(
            f"DiagnosticsCallback: {len(removed)} logged values are left out of the `callback_metrics` "
            f"that {type(trainer.strategy).__name__} sends back to the main process: with them the "
            f"result would exceed the {_SPAWN_RESULT_BUDGET // 1024} KiB a launcher pipe safely holds, "
            "and Lightning reads that pipe only after the workers exit (fit would never return). "
            "Read them from the logger, from `history` in a callback on rank 0, or use strategy='ddp'."
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The states of attached collections, summed over all ranks (one collective); empty when
        the module owns its collections (they are in its ``state_dict``)."""
        if self.diagnostics is None:
            return {}
        states = self.diagnostics.state_dict()
        entries = _state_entries(self.diagnostics)
        if _distributed() and torch.distributed.get_world_size() > 1:
            states.update((key, total) for (key, _), total in zip(entries, fused_all_reduce(entries)))
        return {"states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore attached collections, on rank 0 only (the saved states are sums over all ranks).

        Stages this callback does not have are ignored.
        """
        if self.diagnostics is None or "states" not in state_dict:
            return
        if _distributed() and torch.distributed.get_rank() != 0:
            return
        own = self.diagnostics.state_dict()
        self.diagnostics.load_state_dict(
            {key: value for key, value in state_dict["states"].items() if key in own}, strict=False
        )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store the module's metric states summed over all ranks (one collective for every stage)."""
        if self.diagnostics is not None or trainer.world_size == 1 or not _distributed():
            return  # attached collections are saved by ``state_dict``
        diagnostics = self.stage_diagnostics(pl_module)
        path = next(name for name, module in pl_module.named_modules() if module is diagnostics)
        entries = _state_entries(diagnostics, prefix=path)
        state_dict = checkpoint.get("state_dict", {})
        for (key, _), total in zip(entries, fused_all_reduce(entries)):
            if key in state_dict:
                state_dict[key] = total.cpu()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The checkpoint holds global sums: keep them on rank 0 only, so the ranks still sum to them."""
        if trainer.global_rank == 0:
            return
        for collection in self.stage_diagnostics(pl_module).values():
            collection.reset()


# ------------------------------------------------------------------------------------ log_dict adapter
def output_keys(collection: DiagnosticCollection) -> list[str]:
    """The keys ``collection.compute()`` returns (see [`DiagnosticCollection.output_keys`][metrics_suite.collection.DiagnosticCollection.output_keys])."""
    return collection.output_keys()


class _SharedCompute:
    """One ``collection.compute()`` (one collective) serves every key of a round.

    A round ends when a key is asked for a second time; the next request computes again. Lightning
    asks for each logged key once per epoch end, in the same order on every rank, so every rank
    enters the same collectives.
    """

    def __init__(self, collection: DiagnosticCollection) -> None:
        self.collection = collection
        self.values: dict[str, Tensor] | None = None
        self.served: set[str] = set()

    def get(self, key: str) -> Tensor:
        if self.values is None or key in self.served:
            self.values = self.collection.compute()
            self.served = set()
        self.served.add(key)
        value = self.values.get(key)
        if value is None:  # an output that did not exist at construction: never raise in a loop
            return torch.tensor(float("nan"), dtype=torch.float64)
        return _as_float(value)

    def reset(self) -> None:
        self.collection.reset()
        self.values = None
        self.served = set()


class _KeyView(Metric):
    """A scalar [`Metric`](https://lightning.ai/docs/torchmetrics/stable/references/metric.html) view of one output key of a collection (no own state).

    Lightning calls ``compute()`` and ``reset()`` on it; both go to the shared collection.
    """

    full_state_update = False

    def __init__(self, shared: _SharedCompute, key: str) -> None:
        super().__init__()
        self._shared = shared
        self._key = key

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{self._key!r} is a read-only view: update the LoggableDiagnostics instead")

    def compute(self) -> Tensor:
        return self._shared.get(self._key)

    def reset(self) -> None:
        super().reset()
        self._shared.reset()

    def _wrap_compute(self, compute: Any) -> Any:
        # no torchmetrics sync or cache: the shared collection syncs once per round
        return compute


class LoggableDiagnostics(nn.Module):
    """A collection that plain ``self.log_dict(...)`` accepts: one scalar metric per output key.

    Lightning logs a ``Metric`` by calling its ``compute()`` at epoch end and ``reset()`` after, and
    needs a scalar tensor back. This wrapper exposes the collection's flat output keys as such
    metrics; the first key asked for computes the whole collection (one collective) and the others
    read that result. ``update``, ``compute`` and ``reset`` go to the wrapped collection, which is a
    submodule (it moves with the module and its states are in the checkpoint).

    Args:
        collection: the collection to wrap (metrics_suite metrics only).
        prefix: prepended to every logged key, e.g. ``"val/"``.

    Examples:
        >>> import torch, metrics_suite as ms
        >>> diagnostics = LoggableDiagnostics(
        ...     ms.suite("reconstruction", changed_tokens=False, downstream=False), prefix="val/"
        ... )
        >>> list(diagnostics)
        ['val/reconstruction/reconstruction_score', 'val/reconstruction/reconstruction_score/nonfinite_count']
        >>> loss = torch.tensor([2.0, 2.0, 2.0])
        >>> diagnostics.update(source_model_loss=loss, source_model_loss_with_reconstruction=loss + 1,
        ...                    source_model_loss_with_zero_ablation=loss + 3)
        >>> round(diagnostics["val/reconstruction/reconstruction_score"].compute().item(), 4)
        0.6667

    In a LightningModule: ``self.val_diagnostics = LoggableDiagnostics(ms.suite(...), prefix="val/")``
    in ``__init__``, then in ``validation_step``::

        self.val_diagnostics.update(**inputs)
        self.log_dict(self.val_diagnostics)
    """

    def __init__(self, collection: DiagnosticCollection, prefix: str = "") -> None:
        super().__init__()
        if not isinstance(collection, DiagnosticCollection):
            raise TypeError(f"`collection` must be a DiagnosticCollection, got {type(collection).__name__}")
        self.collection = collection
        self.prefix = prefix
        self._shared = _SharedCompute(collection)
        keys = output_keys(collection)
        # registered (as a ModuleList: keys may hold '.') so Lightning finds each logged metric
        self.views = nn.ModuleList([_KeyView(self._shared, key) for key in keys])
        self._index = {f"{prefix}{key}": i for i, key in enumerate(keys)}

    def update(self, **inputs: Any) -> None:
        """``collection.update(**inputs)``."""
        self.collection.update(**inputs)

    def compute(self) -> dict[str, Tensor]:
        """``collection.compute()`` with prefixed keys (one collective)."""
        return {f"{self.prefix}{key}": value for key, value in self.collection.compute().items()}

    def reset(self) -> None:
        """Reset the collection."""
        self._shared.reset()

    # Mapping interface: what ``log_dict`` iterates over
    def keys(self) -> list[str]:
        return list(self._index)

    def values(self) -> list[Metric]:
        return [self.views[i] for i in self._index.values()]  # type: ignore[misc]

    def items(self) -> list[tuple[str, Metric]]:
        return [(key, self.views[i]) for key, i in self._index.items()]  # type: ignore[misc]

    def __getitem__(self, key: str) -> Metric:
        return self.views[self._index[key]]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index
