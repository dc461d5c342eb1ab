"""Sum-state machinery shared by every metric: state declaration, fused sync, output flattening.

Every state of a :class:`DiagnosticMetric` is a fixed-size tensor reduced by sum, so merging two
partial states is addition and a distributed sync is one ``all_reduce(SUM)`` over one flat buffer
(:func:`fused_all_reduce`) instead of torchmetrics' barrier plus gathers per state.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from metrics_suite.functional._sketch import SketchSpec, sketch_state_shape
from metrics_suite.functional._stats import mean_and_stderr, mean_output, mean_stats, safe_div
from metrics_suite.validation import shape_str

#: Output of ``compute()``: a tensor, or a dict of named tensors.
MetricOutput = Tensor | dict[str, Tensor]
#: What to do with items whose inputs hold NaN or inf.
NanStrategy = Literal["error", "skip", "propagate"]

# the statistics helpers live in the functional layer (the math knows no Metric); re-exported here
# for the metric classes and for code written against ``metrics_suite.base``
__all__ = [
    "DiagnosticMetric",
    "MetricOutput",
    "NanStrategy",
    "fused_all_reduce",
    "mean_and_stderr",
    "mean_stats",
    "safe_div",
    "snapshot",
]


def _layout_signature(states: Sequence[tuple[str, Tensor]]) -> tuple[int, int]:
    """Number of elements and a hash of names, shapes and dtypes of ``states``."""
    text = ";".join(f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in states)
    numel = sum(t.numel() for _, t in states)
    return numel, zlib.crc32(text.encode())


def _all_gather_single(output: Tensor, tensor: Tensor, group: Any) -> None:
    # newer torch names it all_gather_single, older releases all_gather_into_tensor; looked up at
    # call time so tools that wrap torch.distributed (count_collectives) see the call
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _check_layout(states: Sequence[tuple[str, Tensor]], device: torch.device, group: Any) -> None:
    """Raise on every rank when ranks hold different state layouts (instead of hanging).

    One tiny ``all_gather`` of ``[element count, layout hash]`` per rank (on gloo a gather of a few
    numbers costs a third of an ``all_reduce``); every rank sees every signature, so all raise together.
    """
    numel, sig = _layout_signature(states)
    world = dist.get_world_size(group)
    mine = torch.tensor([numel, sig], dtype=torch.int64, device=device)
    gathered = torch.empty(2 * world, dtype=torch.int64, device=device)
    _all_gather_single(gathered, mine, group=group)
    signatures = gathered.view(world, 2).tolist()
    if any(s != signatures[0] for s in signatures):
        raise RuntimeError(
            f"metrics_suite: metric states differ between ranks ([elements, layout hash] per rank: "
            f"{signatures}; this rank holds {len(states)} states). Every rank must build the same "
            "metrics with the same sizes (num_features, num_classes, num_layers, ...)."
        )


def fused_all_reduce(
    states: Sequence[tuple[str, Tensor]],
    group: Any = None,
    check_layout: bool = True,
) -> list[Tensor]:
    """Sum ``states`` over all ranks with one ``all_reduce`` of one flat float64 buffer.

    Integer counts travel as float64 (exact up to 2**53) and come back in their own dtype.
    With ``check_layout`` a tiny ``all_gather`` of each rank's ``[element count, layout hash]``
    first verifies that every rank sends the same layout, so a mismatch is an error on every
    rank rather than a hang.

    Returns the reduced tensors, in order, with their original shapes and dtypes.
    """
    if not states:
        return []
    device = states[0][1].device
    if check_layout:
        _check_layout(states, device, group)
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for _, t in states])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out = []
    offset = 0
    for _, t in states:
        chunk = flat[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()
        if not t.dtype.is_floating_point:
            chunk = chunk.round()
        out.append(chunk.to(device=t.device, dtype=t.dtype))
    return out


def snapshot(metric: Metric, copy_states: bool = True) -> Callable[[], None]:
    """A function that puts ``metric`` back as it is now.

    Restores the states, the update count, any extra state (e.g. a random generator) and the context
    torchmetrics' ``forward()`` leaves behind when it raises. States are copied, as ``update`` adds in
    place; ``copy_states=False`` keeps references, enough where the next step is a ``reset()`` (which
    replaces the tensors rather than mutating them).
    """
    states = (
        metric._copy_state_dict()
        if copy_states
        else {name: getattr(metric, name) for name in metric._defaults}
    )
    count, on_cpu = metric._update_count, metric.compute_on_cpu
    has_extra = type(metric).get_extra_state is not torch.nn.Module.get_extra_state
    extra = metric.get_extra_state() if has_extra else None

    def restore() -> None:
        for attr, value in states.items():
            setattr(metric, attr, value)
        metric._update_count, metric.compute_on_cpu = count, on_cpu
        metric._computed, metric._enable_grad = None, False
        metric._to_sync, metric._should_unsync = metric.sync_on_compute, True
        if has_extra:
            metric.set_extra_state(extra)

    return restore


class DiagnosticMetric(Metric):
    """Base class of every metric in ``metrics_suite``.

    * States are fixed-size tensors reduced by sum: float64 value sums (:meth:`add_sum_state`),
      int64 counts (:meth:`add_count_state`) and mean statistics (:meth:`add_mean_state`).
      They are persistent (saved in ``state_dict``) so a checkpoint taken mid-epoch resumes exactly.
    * A distributed sync is one ``all_reduce(SUM)`` of all states flattened into one buffer, plus a
      2-number-per-rank layout check (``check_layout=False`` skips it). ``compute()`` is not cached by
      default (``compute_with_cache=False``), so every rank enters the same collectives on every call.
    * ``validate_args=False`` skips input checks for speed; ``with_stderr=True`` adds
      ``<stat>_stderr`` to mean-type outputs.
    * ``update_count`` counts accepted updates (a rejected one adds nothing). It is saved in
      ``state_dict`` (key ``update_count``) and added up by ``merge_state``, so a metric resumed
      from a checkpoint or merged from others does not look "never updated".
    * ``merge_state`` and ``load_state_dict`` check every incoming state against the declared shape
      (``ValueError`` naming the state) and keep the declared dtype (float64 sums, int64 counts).
    * ``nan_strategy`` decides what happens to items with NaN/inf inputs: ``"skip"`` (default)
      leaves them out and counts them in the ``nonfinite_count`` state (a collection reports it
      as ``{suite}/{metric}/nonfinite_count``; one warning per metric until ``reset()``),
      ``"error"`` raises ``ValueError`` before touching any state, ``"propagate"`` lets them
      flow into the sums (the result becomes NaN).

    Subclasses implement ``update`` (validate everything first, then add to the states) and
    ``compute`` (pure function of the states; NaN, never inf or an exception, when empty).
    """

    full_state_update: bool = False
    is_differentiable: bool = False
    higher_is_better: bool | None = None
    #: How vector outputs are flattened by a collection: ``"{stat}/{vector_label}_{i}"``.
    vector_label: str = "component"
    #: For a metric whose value is one tensor: the name of that value in the dict ``compute()``
    #: returns with ``with_stderr=True``. A collection then keeps the value under the metric's own
    #: key and puts the standard error under ``".../stderr"``, so turning stderr on renames nothing.
    value_name: str | None = None

    nonfinite_count: Tensor
    _in_forward: bool = False  # a class default also covers metrics unpickled from older versions

    def __init__(
        self,
        validate_args: bool = True,
        with_stderr: bool = False,
        check_layout: bool = True,
        nan_strategy: NanStrategy = "skip",
        **kwargs: Any,
    ) -> None:
        # A cached value would let a rank that saw no new update skip the sync its peers enter
        # (a hang, or a mismatched collective); recomputing from the small sum states is cheap.
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)
        if not isinstance(validate_args, bool):
            raise TypeError(f"`validate_args` must be a bool, got {type(validate_args).__name__}")
        if not isinstance(with_stderr, bool):
            raise TypeError(f"`with_stderr` must be a bool, got {type(with_stderr).__name__}")
        if nan_strategy not in ("error", "skip", "propagate"):
            raise ValueError(f"`nan_strategy` must be 'error', 'skip' or 'propagate', got {nan_strategy!r}")
        self.validate_args = validate_args
        self.with_stderr = with_stderr
        self.check_layout = check_layout
        self.nan_strategy = nan_strategy
        self._warned_nonfinite = False
        self.add_count_state("nonfinite_count")

    # ------------------------------------------------------------------ non-finite input
    def nonfinite_filter(self, name: str, finite: Tensor) -> tuple[Tensor, Tensor]:
        """Apply ``nan_strategy`` to one batch, before any state is touched.

        Args:
            name: the argument(s) named in the error for ``nan_strategy="error"``.
            finite: bool per item, True where all of the item's inputs are finite.

        Returns:
            ``(keep, skipped)``: the items to accumulate, and the number of skipped items to add
            to ``nonfinite_count`` together with the other states.
        """
        if self.nan_strategy == "propagate":
            return torch.ones_like(finite), torch.zeros((), dtype=torch.int64, device=finite.device)
        n_bad = (~finite).sum()
        if self.nan_strategy == "error" and bool(n_bad):
            raise ValueError(f"`{name}` holds NaN or inf in {int(n_bad)} item(s) (nan_strategy='error')")
        return finite, n_bad.to(torch.int64)

    def _warn_nonfinite(self) -> None:
        # called on synced states: the count is the global one
        skipped = int(self.skipped_items())
        if not self._warned_nonfinite and skipped > 0:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: skipped {skipped} item(s) with NaN/inf inputs "
                "(nan_strategy='skip').",
                UserWarning,
                stacklevel=4,
            )

    def skipped_items(self) -> Tensor:
        """Items skipped for NaN/inf inputs (on synced states: over all ranks).

        The ``nonfinite_count`` state itself; a metric whose state describes replicated data
        overrides this so the count is not multiplied by the number of ranks.
        """
        return self.nonfinite_count

    # ------------------------------------------------------------------ update / forward
    def _wrap_update(self, update: Callable) -> Callable:
        @functools.wraps(update)
        def checked_update(*args: Any, **kwargs: Any) -> None:
            # a non-differentiable metric must never record an autograd graph into its states, even
            # inside ``forward()`` (where torchmetrics enables grad for the batch value)
            with contextlib.nullcontext() if self.is_differentiable else torch.no_grad():
                try:
                    update(*args, **kwargs)
                except Exception:
                    # torchmetrics counted the call before it ran; a rejected update is no update
                    self._update_count -= 1
                    raise

        return super()._wrap_update(checked_update)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Update with one batch and return the value of that batch alone.

        torchmetrics resets the states before the batch update and adds the earlier states back
        afterwards; if the update rejects the batch, the earlier states (and the forward context)
        are put back here, so a rejected batch loses nothing. The reset inside does not re-arm the
        non-finite warning: it fires once per metric until the user calls ``reset()``.
        """
        # torchmetrics' full-state path adds the batch into the current tensors in place; the
        # reduce-state path starts with a reset()
        restore = snapshot(self, copy_states=self.full_state_update or self.dist_sync_on_step)
        self._in_forward = True
        try:
            return super().forward(*args, **kwargs)
        except Exception:
            restore()
            raise
        finally:
            self._in_forward = False

    def _wrap_compute(self, compute: Callable) -> Callable:
        @functools.wraps(compute)
        def compute_and_warn(*args: Any, **kwargs: Any) -> Any:
            self._warn_nonfinite()
            return compute(*args, **kwargs)

        return super()._wrap_compute(compute_and_warn)

    def compute_on_current_states(self) -> MetricOutput:
        """``compute()`` on the states as they are now: no sync, no cache, no torchmetrics wrapper.

        :class:`~metrics_suite.collection.DiagnosticCollection` calls this after its own fused sync.
        """
        self._warn_nonfinite()
        value = type(self).compute(self)
        # clone, as torchmetrics does: a value must not alias a state that later updates modify in place
        if isinstance(value, dict):
            return {k: v.clone() for k, v in value.items()}
        return value.clone()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch.multiprocessing (Lightning's ddp_spawn) hands every child the parent's tensors in
        # shared memory: without a private copy, two ranks would add into the same accumulators
        for key in self._defaults:
            value = getattr(self, key)
            if isinstance(value, Tensor) and value.is_shared():
                setattr(self, key, value.clone())

    def reset(self) -> None:
        """Reset every state to zero (and re-arm the non-finite warning)."""
        super().reset()
        if not self._in_forward:  # forward() resets for its batch value: that is no new epoch
            self._warned_nonfinite = False

    # ------------------------------------------------------------------ merge / load
    def _checked_state(self, name: str, value: Any) -> Tensor:
        """``value`` for state ``name``: a tensor of the declared shape, cast to the declared dtype and device."""
        default = cast(Tensor, self._defaults[name])  # every state is a tensor (add_sum_state)
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{type(self).__name__}: state `{name}` must be a tensor, got {type(value).__name__}"
            )
        if value.shape != default.shape:
            raise ValueError(
                f"{type(self).__name__}: state `{name}` must have shape {shape_str(default.shape)}, "
                f"got {shape_str(value.shape)} (from a metric built with other sizes?)"
            )
        return value.to(device=default.device, dtype=default.dtype)

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add the states of another metric of this class (or a ``{state: tensor}`` dict) to these.

        The update counts add up too (a dict counts as one update, unless it carries the
        ``update_count`` of a ``state_dict()``), so a metric that only received merged states is not
        "never updated".

        Raises:
            ValueError: a state has another shape than this metric's (e.g. a different
                ``num_components``), or the other metric is of another class.
            TypeError: a state is not a tensor.
        """
        updates = 1
        if isinstance(incoming_state, type(self)):
            updates = incoming_state._update_count
            incoming_state = incoming_state.metric_state
        elif isinstance(incoming_state, dict) and "update_count" in incoming_state:  # a state_dict()
            incoming_state = dict(incoming_state)
            updates = int(incoming_state.pop("update_count"))
        if isinstance(incoming_state, dict):
            incoming_state = {
                k: self._checked_state(k, v) if k in self._defaults else v for k, v in incoming_state.items()
            }
        super().merge_state(incoming_state)
        self._update_count += updates

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # resumed from a checkpoint, a metric must still know it holds updates ("never updated"
        # warnings); without persistent states there is nothing the count could describe
        if any(self._persistent[name] for name in self._defaults):
            destination[prefix + "update_count"] = torch.tensor(self._update_count, dtype=torch.int64)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # torchmetrics would take the saved tensors as they are: another shape would break the
        # fused sync later, a float32 copy would silently end float64 accumulation
        for name in self._defaults:
            if prefix + name in state_dict:
                state_dict[prefix + name] = self._checked_state(name, state_dict[prefix + name])
        count = state_dict.pop(prefix + "update_count", None)  # absent from older checkpoints
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if count is not None:
            self._update_count = int(count)

    # ------------------------------------------------------------------ states
    def add_sum_state(self, name: str, shape: Sequence[int] = (), dtype: torch.dtype = torch.float64) -> None:
        """Register a zero-initialised, sum-reduced, persistent state of fixed ``shape``."""
        self.add_state(
            name, default=torch.zeros(tuple(shape), dtype=dtype), dist_reduce_fx="sum", persistent=True
        )

    def add_count_state(self, name: str, shape: Sequence[int] = ()) -> None:
        """Register an int64 count state (never saturates like a float32 counter)."""
        self.add_sum_state(name, shape, dtype=torch.int64)

    def add_mean_state(self, name: str, shape: Sequence[int] = ()) -> None:
        """Register a ``[*shape, 3]`` float64 state of (Σw, Σwx, Σwx²); see :func:`mean_stats`."""
        self.add_sum_state(name, (*tuple(shape), 3))

    def add_sketch_state(self, name: str, spec: SketchSpec, batch_shape: Sequence[int] = ()) -> None:
        """Register an int64 ``[*batch_shape, spec.num_buckets]`` quantile-sketch state.

        Fill it with :func:`~metrics_suite.functional._sketch.sketch_update` (counts add up, so the
        sketch merges exactly under any sharding) and read it with ``sketch_quantile``/``sketch_max``.
        """
        self.add_count_state(name, sketch_state_shape(spec, batch_shape))

    def state_items(self) -> list[tuple[str, Tensor]]:
        """All states as ``(name, tensor)`` pairs, in registration order."""
        return [(name, getattr(self, name)) for name in self._defaults]

    def mean_output(self, stats: Tensor, name: str) -> dict[str, Tensor]:
        """``{name: mean}``, plus ``{name}_stderr`` when ``with_stderr`` is set."""
        return mean_output(stats, name, self.with_stderr)

    # ------------------------------------------------------------------ sync
    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any = None) -> None:
        """Replace torchmetrics' per-state gathers with one fused ``all_reduce(SUM)``."""
        states = self.state_items()
        reduced = fused_all_reduce(
            states, group=process_group or self.process_group, check_layout=self.check_layout
        )
        for (name, _), value in zip(states, reduced):
            setattr(self, name, value)

    def set_dtype(self, dst_type: str | torch.dtype) -> DiagnosticMetric:
        """Keep accumulators in their own dtypes (float64 sums, int64 counts).

        torchmetrics' ``set_dtype`` casts every state; here that would throw away the precision
        the sums exist for, so it only records the requested default dtype.
        """
        self._dtype = dst_type if isinstance(dst_type, torch.dtype) else getattr(torch, str(dst_type))
        return self

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        """Follow device moves, but never cast the accumulators (``module.to(torch.bfloat16)``,
        ``.half()`` on a parent module): float64 sums stay float64, int64 counts stay int64.
        Buffers (reference data such as :class:`~metrics_suite.FeatureDrift`'s copy) keep their
        dtype too."""
        buffers = dict(self._buffers)
        super()._apply(fn, exclude_state=tuple(self._defaults))
        for name, original in buffers.items():
            moved = self._buffers[name]
            if original is not None and moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(moved.device)
        device = self.device  # torchmetrics updated it from ``fn``
        for key, default in self._defaults.items():
            if key in exclude_state or not isinstance(default, Tensor):
                continue
            self._defaults[key] = default.to(device)
            setattr(self, key, getattr(self, key).to(device))
        return self

    # ------------------------------------------------------------------ output
    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plot the value (or a list of values); see :func:`metrics_suite.plots.plot_metric`."""
        from metrics_suite.plots import plot_metric

        return plot_metric(self, val, ax)

    def flatten_output(self, value: MetricOutput) -> dict[str, Tensor]:
        """Flatten a ``compute()`` result into scalar entries keyed relative to the metric.

        A scalar tensor gets the key ``""``; a vector gets ``"{vector_label}_{i}"``; a dict entry
        ``stat`` gets ``"stat"`` or ``"stat/{vector_label}_{i}"`` (with :attr:`value_name` set, the
        value keeps ``""`` and its standard error gets ``"stderr"``).
        """
        if isinstance(value, dict) and self.value_name is not None:
            renamed = {self.value_name: "", f"{self.value_name}_stderr": "stderr"}
            value = {renamed.get(k, k): v for k, v in value.items()}
        items: Iterable[tuple[str, Tensor]] = value.items() if isinstance(value, dict) else [("", value)]
        flat: dict[str, Tensor] = {}
        for stat, tensor in items:
            if tensor.ndim == 0:
                flat[stat] = tensor
                continue
            for i, element in enumerate(tensor.reshape(-1)):
                key = f"{self.vector_label}_{i}"
                flat[f"{stat}/{key}" if stat else key] = element
        return flat
