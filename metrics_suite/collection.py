"""``DiagnosticCollection``: a MetricCollection that routes inputs by name and syncs once.

``update(**inputs)`` hands each metric the inputs its ``update`` names; ``compute()`` sums the
states of *all* metrics across ranks in one ``all_reduce`` (plus a tiny layout check),
computes each metric on the summed states, restores the local states and returns a flat dict
of scalar tensors keyed ``{suite}/{metric}/{stat}``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from metrics_suite.base import DiagnosticMetric, fused_all_reduce

_NOT_UPDATED = "was called before the ``update`` method"


def _update_params(metric: Metric) -> tuple[frozenset[str], frozenset[str]]:
    """(required, all) keyword names of ``metric.update``."""
    params = inspect.signature(metric.update).parameters.values()
    names = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = frozenset(p.name for p in names if p.default is p.empty)
    return required, frozenset(p.name for p in names)


def _flatten(metric: Metric, value: Any) -> dict[str, Tensor]:
    if isinstance(metric, DiagnosticMetric):
        return metric.flatten_output(value)
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return {"": value}


def _extra_state(metric: Metric) -> Any:
    """State a metric keeps outside its sum states (e.g. a random generator), if it declares any."""
    if type(metric).get_extra_state is torch.nn.Module.get_extra_state:
        return None
    return metric.get_extra_state()


class DiagnosticCollection(MetricCollection):
    """A :class:`torchmetrics.MetricCollection` of diagnostics with one collective per compute.

    Args:
        metrics: ``{"suite/metric": metric}`` (what :func:`metrics_suite.suite` builds), or any
            metrics accepted by ``MetricCollection``.
        check_layout: verify that every rank holds the same state layout before the sum
            (an ``all_gather`` of two numbers per rank); a mismatch raises on every rank instead of hanging.
        atomic_update: when one metric rejects its input, roll back the metrics already updated
            in that call, so a failed ``update`` leaves the whole collection unchanged.

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
        self._build_routes()

    def _build_routes(self) -> None:
        self._routes = {name: _update_params(m) for name, m in self._modules.items()}
        self._accepted = frozenset().union(*(all_ for _, all_ in self._routes.values()))

    def add_metrics(self, metrics: Any, *additional_metrics: Metric) -> None:
        """Add metrics (see ``MetricCollection.add_metrics``) and refresh the input routes."""
        super().add_metrics(metrics, *additional_metrics)
        if hasattr(self, "_routes"):
            self._build_routes()

    # ------------------------------------------------------------------ update
    def _route(self, inputs: dict[str, Any]) -> Iterator[tuple[str, Metric, dict[str, Any]]]:
        unknown = sorted(set(inputs) - self._accepted)
        if unknown:
            raise TypeError(
                f"no metric in this collection takes input(s) {unknown}; accepted inputs: {sorted(self._accepted)}"
            )
        for name, metric in self._modules.items():
            required, accepted = self._routes[name]
            if required <= inputs.keys():
                yield name, metric, {k: v for k, v in inputs.items() if k in accepted}  # type: ignore[misc]

    def update(self, *args: Any, **inputs: Any) -> None:
        """Update every metric whose required inputs are all present (inputs by keyword only)."""
        if args:
            raise TypeError("DiagnosticCollection.update takes keyword inputs only (e.g. clean_logits=...)")
        routed = list(self._route(inputs))
        saved: list[tuple[Metric, dict[str, Any], int, Any]] = []
        try:
            for _, metric, kwargs in routed:
                if self.atomic_update:
                    saved.append(
                        (metric, metric._copy_state_dict(), metric._update_count, _extra_state(metric))
                    )
                metric.update(**kwargs)
        except Exception:
            for metric, state, count, extra in saved:
                for attr, value in state.items():
                    setattr(metric, attr, value)
                metric._update_count = count
                metric._computed = None
                if extra is not None:
                    metric.set_extra_state(extra)
            raise

    def forward(self, *args: Any, **inputs: Any) -> dict[str, Any]:
        """Update with ``inputs`` and return the batch values (flat keys, no sync)."""
        if args:
            raise TypeError("DiagnosticCollection takes keyword inputs only (e.g. clean_logits=...)")
        results = {name: metric(**kwargs) for name, metric, kwargs in self._route(inputs)}
        return self._flat_results(results)

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
        states: list[tuple[str, Tensor]] = []
        for name, m in items:
            states.extend((f"{name}.{attr}", getattr(m, attr)) for attr in m._defaults)
        device = states[0][1].device if states else torch.device("cpu")
        states.append(
            ("update_counts", torch.tensor(list(counts.values()), dtype=torch.int64, device=device))
        )
        group = next((m.process_group for _, m in items if m.process_group is not None), None)
        reduced = fused_all_reduce(states, group=group, check_layout=self.check_layout)
        # computes never modify states in place, so the local tensors can be restored by reference
        local = [(m, {attr: getattr(m, attr) for attr in m._defaults}, m._update_count) for _, m in items]
        it = iter(reduced)
        global_counts = dict(zip(counts, reduced[-1].tolist()))
        for name, m in items:
            for attr in m._defaults:
                setattr(m, attr, next(it))
            m._update_count = int(global_counts[name])
        try:
            yield {k: int(v) for k, v in global_counts.items()}
        finally:
            for m, state, count in local:
                for attr, value in state.items():
                    setattr(m, attr, value)
                m._update_count = count

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
        """The keys :meth:`compute` returns, found without any collective.

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
