"""``DiagnosticCollection``: a MetricCollection that routes inputs by name and syncs once.

``update(**inputs)`` hands each metric the inputs its ``update`` names; ``compute()`` sums the
states of *all* metrics across ranks in one ``all_reduce`` (plus a tiny layout check),
computes each metric on the summed states, restores the local states and returns a flat dict
of scalar tensors keyed ``{suite}/{metric}/{stat}``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities.data import dim_zero_sum

from metrics_suite.base import DiagnosticMetric, MetricFingerprint, fused_all_reduce, snapshot

_NOT_UPDATED = "was called before the ``update`` method"


@functools.cache
def _update_params(cls: type[Metric]) -> tuple[frozenset[str], frozenset[str]]:
    """(required, all) keyword names of ``cls.update`` (cached: a signature costs ~15 us per call)."""
    params = list(inspect.signature(cls.update).parameters.values())[1:]  # without self
    names = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = frozenset(p.name for p in names if p.default is p.empty)
    return required, frozenset(p.name for p in names)


def _check_sum_states(name: str, metric: Any) -> None:
    """Require a metric whose states are all tensors reduced by sum (what the fused sync adds up)."""
    if not isinstance(metric, Metric):
        raise TypeError(
            f"{name}: a DiagnosticCollection holds torchmetrics metrics, got {type(metric).__name__}"
        )
    for attr, default in metric._defaults.items():
        reduction = metric._reductions[attr]
        if isinstance(default, Tensor) and reduction is dim_zero_sum:
            continue
        kind = str(getattr(reduction, "__name__", reduction)).removeprefix("dim_zero_")
        what = f"has reduction {kind!r}" if isinstance(default, Tensor) else "is a list"
        raise TypeError(
            f"{name} ({type(metric).__name__}): state `{attr}` {what}. A DiagnosticCollection sums every "
            "state of every metric across ranks in one buffer, so it takes only metrics whose states are "
            "tensors reduced by sum; compute this metric outside the collection."
        )


def _flatten(metric: Metric, value: Any) -> dict[str, Tensor]:
    if isinstance(metric, DiagnosticMetric):
        return metric.flatten_output(value)
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return {"": value}


class DiagnosticCollection(MetricCollection):
    """A [`torchmetrics.MetricCollection`](https://lightning.ai/docs/torchmetrics/stable/wrappers/metric_collection.html) of diagnostics with one collective per compute.

    ``compute()`` adds up every state of every metric across ranks in one buffer, so only metrics
    whose states are all tensors reduced by sum can join (every ``metrics_suite`` metric, and e.g.
    torchmetrics' ``SumMetric``); a max, min, mean or list (``cat``) state raises ``TypeError`` when
    the metric is added.

    Args:
        metrics: ``{"suite/metric": metric}`` (what [`metrics_suite.suite`][metrics_suite.registry.suite] builds), or any
            sum-state metrics accepted by ``MetricCollection``.
        check_layout: verify before the sum that every rank holds the same metrics, with the same
            state layouts, fingerprint arguments and synced-compute counts (one small ``all_gather``);
            a mismatch raises [`SyncMismatchError`][metrics_suite.base.SyncMismatchError] on every rank, naming the
            metric and the argument, instead of hanging or summing states that mean different things.
        atomic_update: when one metric rejects its input, roll back the metrics already updated
            in that call, so a failed ``update`` or ``forward`` leaves the whole collection unchanged.

    Compute groups are always off: our metrics never share states.

    Examples:
        >>> import torch, metrics_suite as ms
        >>> col = ms.suite("reconstruction", changed_tokens=False)
        >>> loss = torch.tensor([2.0, 2.0, 2.0])
        >>> col.update(source_model_loss=loss, source_model_loss_with_reconstruction=loss + 1,
        ...            source_model_loss_with_zero_ablation=loss + 3)
        >>> round(col.compute()["reconstruction/reconstruction_score"].item(), 4)
        0.6667
    """

    def __init__(
        self,
        metrics: Any,
        *additional_metrics: Metric,
        prefix: str | None = None,
        postfix: str | None = None,
        check_layout: bool = True,
        atomic_update: bool = True,
    ) -> None:
        super().__init__(metrics, *additional_metrics, prefix=prefix, postfix=postfix, compute_groups=False)
        self.check_layout = check_layout
        self.atomic_update = atomic_update

    def __setitem__(self, key: str, module: torch.nn.Module) -> None:
        """Add a metric (``MetricCollection`` adds every metric through here); see the class docstring."""
        _check_sum_states(key, module)
        super().__setitem__(key, module)

    # ------------------------------------------------------------------ update
    def _route(self, inputs: dict[str, Any]) -> list[tuple[str, Metric, dict[str, Any]]]:
        """``(name, metric, its inputs)`` of every metric whose required inputs are all present.

        Routes come from the current modules, so ``col[k] = m`` and ``del col[k]`` take effect.
        """
        params = {name: _update_params(type(m)) for name, m in self._modules.items()}
        accepted_any = frozenset().union(*(accepted for _, accepted in params.values()))
        unknown = sorted(set(inputs) - accepted_any)
        if unknown:
            raise TypeError(
                f"no metric in this collection takes input(s) {unknown}; accepted inputs: {sorted(accepted_any)}"
            )
        return [
            (name, metric, {k: v for k, v in inputs.items() if k in params[name][1]})
            for name, metric in self._modules.items()
            if params[name][0] <= inputs.keys()
        ]

    def _all_or_none(self, inputs: dict[str, Any], call: Callable[..., Any]) -> dict[str, Any]:
        """``call(metric, **its inputs)`` for every routed metric; with ``atomic_update``, a raise
        puts back every metric already called."""
        results: dict[str, Any] = {}
        restores: list[Callable[[], None]] = []
        try:
            for name, metric, kwargs in self._route(inputs):
                if self.atomic_update:
                    restores.append(snapshot(metric))
                results[name] = call(metric, **kwargs)
        except Exception:
            for restore in restores:
                restore()
            raise
        return results

    def update(self, *args: Any, **inputs: Any) -> None:
        """Update every metric whose required inputs are all present (inputs by keyword only)."""
        if args:
            raise TypeError("DiagnosticCollection.update takes keyword inputs only (e.g. clean_logits=...)")
        self._all_or_none(inputs, lambda metric, **kwargs: metric.update(**kwargs))

    def forward(self, *args: Any, **inputs: Any) -> dict[str, Any]:
        """Update with ``inputs`` and return the values of this batch alone (flat keys, no sync).

        Only the metrics this call updated appear, and without ``nonfinite_count``: that count is
        kept over all updates since the last reset (one warning per metric) and ``compute()``
        reports it, so a batch value never mixes in earlier batches. A rejected batch is rolled back
        as in [`update`][metrics_suite.collection.DiagnosticCollection.update].
        """
        if args:
            raise TypeError("DiagnosticCollection takes keyword inputs only (e.g. clean_logits=...)")
        return self._flat_results(self._all_or_none(inputs, lambda metric, **kwargs: metric(**kwargs)))

    # ------------------------------------------------------------------ compute
    def _metric_items(self) -> list[tuple[str, Metric]]:
        return list(self._modules.items())  # type: ignore[arg-type]

    @contextmanager
    def _synced(self) -> Iterator[dict[str, int]]:
        """Sum all metric states (and update counts) across ranks; restore local states on exit.

        Yields the global update count of each metric.
        """
        items = self._metric_items()
        counts = {name: m._update_count for name, m in items}
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or not items:
            yield counts
            return
        states = [(f"{name}.{attr}", getattr(m, attr)) for name, m in items for attr in m._defaults]
        device = states[0][1].device if states else torch.device("cpu")
        states.append(
            ("update_counts", torch.tensor(list(counts.values()), dtype=torch.int64, device=device))
        )
        group = next((m.process_group for _, m in items if m.process_group is not None), None)
        prints = [
            m.sync_fingerprint(name)
            if isinstance(m, DiagnosticMetric)
            else MetricFingerprint(
                name, type(m).__name__, str([(a, getattr(m, a).shape) for a in m._defaults])
            )
            for name, m in items
        ]
        names = ", ".join(name for name, _ in items[:3]) + (", ..." if len(items) > 3 else "")
        reduced = fused_all_reduce(
            states,
            group=group,
            check_layout=self.check_layout,
            fingerprints=prints,
            label=f"DiagnosticCollection.compute() of {len(items)} metrics ({names})",
        )
        for _, m in items:
            if isinstance(m, DiagnosticMetric):
                m._synced_computes += 1
        # computes never modify states in place, so the local tensors can be restored by reference
        local = [(m, {attr: getattr(m, attr) for attr in m._defaults}) for _, m in items]
        it = iter(reduced)
        for _, m in items:
            for attr in m._defaults:
                setattr(m, attr, next(it))
        try:
            yield dict(zip(counts, reduced[-1].tolist()))
        finally:
            for m, state in local:
                for attr, value in state.items():
                    setattr(m, attr, value)

    def compute(self) -> dict[str, Any]:
        """Compute every metric on states summed over all ranks, with one collective.

        Returns a flat dict of scalar tensors ``{suite}/{metric}/{stat}``, plus
        ``{suite}/{metric}/nonfinite_count`` (items skipped for NaN/inf inputs). Metrics that no
        rank ever updated give NaN, and one warning names them.
        """
        items = self._metric_items()
        results: dict[str, Any] = {}
        nonfinite: dict[str, Tensor] = {}
        with self._synced() as counts:
            never = [name for name, n in counts.items() if n == 0]
            for name, m in items:
                if isinstance(m, DiagnosticMetric):
                    results[name] = m.compute_on_current_states()
                    nonfinite[name] = m.skipped_items().detach().clone()
                    continue
                to_sync = m._to_sync
                m._to_sync = False  # states are already global
                try:
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=f".*{_NOT_UPDATED}.*")
                        results[name] = m.compute()
                finally:
                    m._to_sync = to_sync
                    m._computed = None  # cached value is global; a later local compute must not reuse it
        if never:
            warnings.warn(
                f"metrics never updated (their values are NaN): {never}. Check that the inputs each one "
                "needs were passed to update().",
                UserWarning,
                stacklevel=2,
            )
        flat = self._flat_results(results)
        flat.update({self._set_name(f"{name}/nonfinite_count"): count for name, count in nonfinite.items()})
        return flat

    def output_keys(self) -> list[str]:
        """The keys [`compute`][metrics_suite.collection.DiagnosticCollection.compute] returns, found without any collective.

        Output shapes are fixed at construction, so computing on the local states gives the same keys
        as a synced compute.
        """
        results: dict[str, Any] = {}
        for name, metric in self._metric_items():
            if not isinstance(metric, DiagnosticMetric):
                raise TypeError(
                    f"{name}: output_keys() needs metrics_suite metrics, got {type(metric).__name__}"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[name] = metric.compute_on_current_states()
        keys = list(self._flat_results(results))
        return keys + [self._set_name(f"{name}/nonfinite_count") for name in results]

    def _flat_results(self, results: dict[str, Any]) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name, value in results.items():
            for key, tensor in _flatten(self._modules[name], value).items():  # type: ignore[arg-type]
                flat[self._set_name(f"{name}/{key}" if key else name)] = tensor
        return flat
