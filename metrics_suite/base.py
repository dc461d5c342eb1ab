"""Sum-state machinery shared by every metric: state declaration, fused sync, output flattening.

Every state of a [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] is a fixed-size tensor reduced by sum, so merging two
partial states is addition and a distributed sync is one ``all_reduce(SUM)`` over one flat buffer
([`fused_all_reduce`][metrics_suite.base.fused_all_reduce]) instead of torchmetrics' barrier plus gathers per state.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import numbers
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from metrics_suite.functional._sketch import SketchSpec, sketch_state_shape
from metrics_suite.functional._stats import mean_and_stderr, mean_output, mean_stats, safe_div
from metrics_suite.validation import check_devices, shape_str, unknown_names

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


class SyncMismatchError(RuntimeError):
    """Ranks disagree on a metric's fingerprint (state layout, configuration or number of synced
    ``compute()`` calls since ``reset()``); raised on every rank before any state is summed."""


class SyncFailedError(RuntimeError):
    """A collective of the fused sync failed (typically the process-group timeout)."""


@dataclass(frozen=True)
class MetricFingerprint:
    """What must agree between ranks before one metric's states can be summed.

    Attributes:
        name: the metric's name in the error (its collection key, or its class name).
        cls: class name.
        layout: names, shapes and dtypes of its states.
        syncs: synced ``compute()`` calls since the last ``reset()``.
        config: constructor argument -> JSON of its value ([`DiagnosticMetric.fingerprint_config`][metrics_suite.base.DiagnosticMetric.fingerprint_config]).
    """

    name: str
    cls: str
    layout: str
    syncs: int = 0
    config: dict[str, str] = field(default_factory=dict)

    def fields(self) -> list[tuple[str, str]]:
        """``(what, value)`` pairs compared between ranks, in a fixed order."""
        return [
            ("state layout", self.layout),
            ("number of synced compute() calls since reset()", str(self.syncs)),
            *((f"argument `{arg}`", value) for arg, value in self.config.items()),
        ]


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _layout_text(states: Sequence[tuple[str, Tensor]]) -> str:
    return ", ".join(f"{name}{list(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for name, t in states)


# The check gathers a fixed number of int64 per rank (a gather needs the same size on every rank,
# and the sizes are what may differ): a header, a table of metric digests keyed by name (tells which
# metric is missing when ranks hold different metrics), and one slot per compared field (metric x
# layout / sync count / argument; fields beyond the slots share them, and an error then names every
# field of a differing slot). 132 numbers: about 1 KB per rank.
_HEADER, _NAME_SLOTS, _FIELD_SLOTS = 4, 32, 96


_VECTORS: dict[Any, tuple[list[int], list[tuple[MetricFingerprint, str, str]]]] = {}


def _fingerprint_vector(
    numel: int, prints: Sequence[MetricFingerprint]
) -> tuple[list[int], list[tuple[MetricFingerprint, str, str]]]:
    """The numbers every rank gathers, and the compared fields in slot order.

    Memoised (a few recent keys): hashing the fields costs more than the sync they guard.
    """
    key = (numel, tuple((p.name, p.cls, p.layout, p.syncs, tuple(p.config.items())) for p in prints))
    if key not in _VECTORS:
        if len(_VECTORS) >= 64:
            _VECTORS.pop(next(iter(_VECTORS)))
        _VECTORS[key] = _build_fingerprint_vector(numel, prints)
    return _VECTORS[key]


def _build_fingerprint_vector(
    numel: int, prints: Sequence[MetricFingerprint]
) -> tuple[list[int], list[tuple[MetricFingerprint, str, str]]]:
    structure = ";".join(f"{p.name}|{p.cls}|{','.join(p.config)}" for p in prints)
    names: list[list[str]] = [[] for _ in range(_NAME_SLOTS)]
    slots: list[list[str]] = [[] for _ in range(_FIELD_SLOTS)]
    entries: list[tuple[MetricFingerprint, str, str]] = []
    for p in prints:
        fields = p.fields()
        names[_crc(p.name) % _NAME_SLOTS].append(f"{p.name}|{p.cls}|{fields}")
        for what, value in fields:
            slots[len(entries) % _FIELD_SLOTS].append(f"{len(entries)}={value}")
            entries.append((p, what, value))
    vector = [numel, _crc(";".join(p.layout for p in prints)), _crc(structure), len(prints)]
    vector += [_crc("\n".join(s)) for s in names + slots]
    return vector, entries


def _mismatch_report(
    rows: list[list[int]], rank: int, prints: Sequence[MetricFingerprint], entries: list[Any]
) -> list[str]:
    """What differs between this rank and the others, from every rank's fingerprint vector."""
    mine = rows[rank]

    def differing(start: int, stop: int) -> set[int]:
        return {j for j in range(start, stop) if any(row[j] != mine[j] for row in rows)}

    problems: list[str] = []
    if all(row[2] == mine[2] for row in rows):  # same metrics and arguments: compare field by field
        bad = differing(_HEADER + _NAME_SLOTS, _HEADER + _NAME_SLOTS + _FIELD_SLOTS)
        for i, (p, what, value) in enumerate(entries):
            if _HEADER + _NAME_SLOTS + i % _FIELD_SLOTS in bad:
                problems.append(f"metric {p.name!r} ({p.cls}): {what} differs (this rank: {value})")
        return problems
    bad = differing(_HEADER, _HEADER + _NAME_SLOTS)
    own = set()
    for p in prints:
        slot = _HEADER + _crc(p.name) % _NAME_SLOTS
        own.add(slot)
        if slot in bad:
            problems.append(f"metric {p.name!r} ({p.cls}) is missing on other ranks, or differs there")
    if bad - own:
        problems.append("other ranks hold metrics this rank does not have (or under other names)")
    problems.append(f"metrics per rank: {[row[3] for row in rows]}")
    return problems


def _collective(what: str, label: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run one collective; a failure (e.g. gloo's or NCCL's timeout) names what was syncing."""
    try:
        call(*args, **kwargs)
    except RuntimeError as err:  # torch's DistBackendError / DistNetworkError are RuntimeErrors
        raise SyncFailedError(
            f"metrics_suite: the {what} of {label} failed: {err}\n"
            "Likely cause: a rank did not call compute() (it skipped it, raised before it, or called "
            "it fewer times), or the ranks hold different metrics; every rank must call compute() on "
            "the same metrics the same number of times. The wait is bounded by the process group's "
            "timeout (init_process_group(timeout=...)). See docs/guides/distributed.md."
        ) from err


def _all_gather_single(output: Tensor, tensor: Tensor, group: Any) -> None:
    # newer torch names it all_gather_single, older releases all_gather_into_tensor; looked up at
    # call time so tools that wrap torch.distributed (count_collectives) see the call
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _check_fingerprints(
    states: Sequence[tuple[str, Tensor]],
    prints: Sequence[MetricFingerprint],
    device: torch.device,
    group: Any,
    label: str,
) -> None:
    """Raise [`SyncMismatchError`][metrics_suite.base.SyncMismatchError] on every rank when ranks disagree on any fingerprint.

    One small ``all_gather`` of a fixed-size vector per rank; every rank sees every vector, so all
    raise together, each naming the metrics and fields that differ (and its own values).
    """
    numel = sum(t.numel() for _, t in states)
    vector, entries = _fingerprint_vector(numel, prints)
    world = dist.get_world_size(group)
    mine = torch.tensor(vector, dtype=torch.int64, device=device)
    gathered = torch.empty(world * len(vector), dtype=torch.int64, device=device)
    _collective("fingerprint check (all_gather)", label, _all_gather_single, gathered, mine, group=group)
    rows = gathered.view(world, len(vector)).tolist()
    rank = dist.get_rank(group)
    if all(row == vector for row in rows):
        return
    others = [r for r, row in enumerate(rows) if row != vector]
    problems = _mismatch_report(rows, rank, prints, entries) or [
        f"state layouts differ (elements per rank: {[row[0] for row in rows]})"
    ]
    text = "\n".join(f"  - {p}" for p in problems)
    raise SyncMismatchError(
        f"metrics_suite: {label}: the ranks' metrics cannot be summed; rank {rank} (this one) differs "
        f"from ranks {others}:\n{text}\nEvery rank must build the same metrics with the same "
        "arguments and sizes, and call compute() the same number of times between resets. "
        "See docs/guides/distributed.md."
    )


def fused_all_reduce(
    states: Sequence[tuple[str, Tensor]],
    group: Any = None,
    check_layout: bool = True,
    *,
    fingerprints: Sequence[MetricFingerprint] | None = None,
    label: str = "metric states",
) -> list[Tensor]:
    """Sum ``states`` over all ranks with one ``all_reduce`` of one flat float64 buffer.

    Integer counts travel as float64 (exact up to 2**53) and come back in their own dtype.
    With ``check_layout`` a small ``all_gather`` of each rank's fingerprint first verifies that
    every rank sends the same layout (and, given ``fingerprints``, the same metric configurations
    and sync counts), so a mismatch is a [`SyncMismatchError`][metrics_suite.base.SyncMismatchError] on every rank rather than a
    hang or a silent sum of states that mean different things. A failing collective (e.g. a
    timeout) raises [`SyncFailedError`][metrics_suite.base.SyncFailedError] naming ``label``.

    Returns the reduced tensors, in order, with their original shapes and dtypes.
    """
    if not states:
        return []
    device = states[0][1].device
    if check_layout:
        prints = (
            fingerprints if fingerprints is not None else [MetricFingerprint(label, "", _layout_text(states))]
        )
        _check_fingerprints(states, prints, device, group, label)
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for _, t in states])
    _collective("all_reduce", label, dist.all_reduce, flat, op=dist.ReduceOp.SUM, group=group)
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
        metric._is_synced, metric._cache = False, None
        if has_extra:
            metric.set_extra_state(extra)

    return restore


#: Keyword options torchmetrics' ``Metric`` takes (passed through ``**kwargs``).
_TORCHMETRICS_OPTIONS = frozenset(
    {
        "compute_on_cpu",
        "dist_sync_on_step",
        "process_group",
        "dist_sync_fn",
        "distributed_available_fn",
        "sync_on_compute",
        "compute_with_cache",
    }
)
_BASE_OPTIONS = ("validate_args", "with_stderr", "check_layout", "nan_strategy")


def _returned(value: Any) -> Any:
    """A compute() result as torchmetrics returns it: one-element tensors squeezed, every tensor
    cloned (a value must not alias a state that later updates modify in place)."""
    if isinstance(value, Mapping):
        return {k: _returned(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        return (value.squeeze() if value.numel() == 1 else value).clone()
    return value


def _encode_config(config: Mapping[str, str]) -> Tensor:
    # JSON bytes as uint8: every value (0..255) is exact in any dtype a state_dict may be cast to
    return torch.tensor(list(json.dumps(dict(config)).encode()), dtype=torch.uint8)


def _decode_config(saved: Any) -> dict[str, str]:
    data = json.loads(bytes(torch.as_tensor(saved).round().to(torch.uint8).tolist()).decode())
    return {str(k): str(v) for k, v in data.items()}


def _plain(value: Any) -> Any:
    """``value`` as JSON data (what a fingerprint compares): numbers, strings, lists, dicts."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _json(value: Any) -> str:
    return json.dumps(_plain(value), sort_keys=True)


@functools.cache
def _fingerprint_args(cls: type[DiagnosticMetric]) -> tuple[str, ...]:
    """Constructor arguments of ``cls`` and its bases, minus ``fingerprint_exclude``, plus
    ``fingerprint_attributes`` (cached: a signature costs ~15 us)."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, DiagnosticMetric)) or "__init__" not in vars(
            klass
        ):
            continue
        for p in list(inspect.signature(klass.__init__).parameters.values())[1:]:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names:
                names.append(p.name)
    names += [a for a in cls.fingerprint_attributes if a not in names]
    return tuple(n for n in names if n not in cls.fingerprint_exclude)


class DiagnosticMetric(Metric):
    """Base class of every metric in ``metrics_suite``.

    * States are fixed-size tensors reduced by sum: float64 value sums ([`add_sum_state`][metrics_suite.base.DiagnosticMetric.add_sum_state]),
      int64 counts ([`add_count_state`][metrics_suite.base.DiagnosticMetric.add_count_state]) and mean statistics ([`add_mean_state`][metrics_suite.base.DiagnosticMetric.add_mean_state]).
      They are persistent (saved in ``state_dict``) so a checkpoint taken mid-epoch resumes exactly.
    * A distributed sync is one ``all_reduce(SUM)`` of all states (and the update count) flattened
      into one buffer, plus one small ``all_gather`` of a fingerprint (``check_layout=False`` skips
      it): the state layout, every constructor argument that changes what a state means
      ([`fingerprint_args`][metrics_suite.base.DiagnosticMetric.fingerprint_args]) and the number of synced ``compute()`` calls since ``reset()``.
      Ranks that disagree raise [`SyncMismatchError`][metrics_suite.base.SyncMismatchError] on every rank. ``compute()`` is never
      cached (``compute_with_cache=True`` is refused), so every rank enters the same collectives on
      every call. After the sync the local states come back, also when ``compute()`` raises; the
      "called before update" warning looks at the update count of all ranks.
    * ``validate_args=False`` skips input checks for speed; ``with_stderr=True`` adds
      ``<stat>_stderr`` to mean-type outputs.
    * ``update_count`` counts accepted updates (a rejected one adds nothing). It is saved in
      ``state_dict`` (key ``update_count``) and added up by ``merge_state``, so a metric resumed
      from a checkpoint or merged from others does not look "never updated".
    * ``merge_state`` and ``load_state_dict`` check every incoming state against the declared shape
      (``ValueError`` naming the state) and keep the declared dtype (float64 sums, int64 counts).
      ``state_dict`` saves the fingerprint arguments (key ``fingerprint``, JSON bytes in a uint8
      tensor), and merging or loading states of a metric built with other values raises
      ``ValueError`` naming the argument (checkpoints without the key still load).
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
    #: Outputs whose last dim is not indexed by [`vector_label`][metrics_suite.base.DiagnosticMetric.vector_label], with the label of that dim,
    #: e.g. ``{"density_histogram": "bin"}``: a ``[C, 9]`` value flattens to
    #: ``"density_histogram/component_{c}/bin_{i}"``, a ``[9]`` one to ``"density_histogram/bin_{i}"``.
    last_dim_labels: ClassVar[Mapping[str, str]] = {}
    #: For a metric whose value is one tensor: the name of that value in the dict ``compute()``
    #: returns with ``with_stderr=True``. A collection then keeps the value under the metric's own
    #: key and puts the standard error under ``".../stderr"``, so turning stderr on renames nothing.
    value_name: str | None = None
    #: Why ``with_stderr=True`` is refused, for a metric whose values are not means over items
    #: (``None``: the option works). Refused rather than silently ignored.
    no_stderr: str | None = None

    #: Constructor arguments that do not change what a state means, left out of the fingerprint
    #: (a subclass extends it, e.g. ``DiagnosticMetric.fingerprint_exclude | {"chunk_size"}``).
    fingerprint_exclude: ClassVar[frozenset[str]] = frozenset(
        {"validate_args", "with_stderr", "check_layout", "nan_strategy"}
    )
    #: Attributes fingerprinted besides the constructor arguments (e.g. what a non-storable argument set).
    fingerprint_attributes: ClassVar[tuple[str, ...]] = ()

    nonfinite_count: Tensor
    # class defaults also cover metrics unpickled from older versions
    _in_forward: bool = False
    _synced_computes: int = 0  # synced compute() calls since reset(): part of the fingerprint
    _local_update_count: int = 0  # the rank's own count while the states are synced

    def __init__(
        self,
        validate_args: bool = True,
        with_stderr: bool = False,
        check_layout: bool = True,
        nan_strategy: NanStrategy = "skip",
        **kwargs: Any,
    ) -> None:
        # A cached value would let a rank that saw no new update skip the sync its peers enter
        # (a hang, or a collective paired with the peers' next one); recomputing from the small sum
        # states is cheap, so caching is refused rather than made optional.
        if kwargs.get("compute_with_cache") is True:
            raise ValueError(
                f"{type(self).__name__}: `compute_with_cache=True` is not supported: a rank that returns a "
                "cached value skips the sync its peers enter, which hangs them or pairs their collective "
                "with a later one. compute() recomputes from the small sum states on every call."
            )
        kwargs["compute_with_cache"] = False
        owner = type(self).__name__
        unknown = sorted(set(kwargs) - _TORCHMETRICS_OPTIONS)
        if unknown:
            own = [
                p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "kwargs")
            ]
            raise ValueError(
                unknown_names(
                    f"argument(s) of {owner}:",
                    unknown,
                    [*own, *_BASE_OPTIONS, *sorted(_TORCHMETRICS_OPTIONS)],
                )
            )
        for name, flag in (
            ("validate_args", validate_args),
            ("with_stderr", with_stderr),
            ("check_layout", check_layout),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: `{name}` got {flag!r}; accepted: True or False")
        if with_stderr and self.no_stderr is not None:
            raise ValueError(f"{owner}: `with_stderr` got True; accepted: False ({self.no_stderr})")
        if nan_strategy not in ("error", "skip", "propagate"):
            raise ValueError(
                f"{owner}: `nan_strategy` got {nan_strategy!r}; accepted: 'error', 'skip' or 'propagate'"
            )
        super().__init__(**kwargs)
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
        signature = inspect.signature(update)

        @functools.wraps(update)
        def checked_update(*args: Any, **kwargs: Any) -> None:
            # a non-differentiable metric must never record an autograd graph into its states, even
            # inside ``forward()`` (where torchmetrics enables grad for the batch value)
            with contextlib.nullcontext() if self.is_differentiable else torch.no_grad():
                try:
                    if self.validate_args:  # one device check for every metric, before any math
                        with contextlib.suppress(TypeError):  # bad arguments: ``update`` names them
                            check_devices(signature.bind_partial(*args, **kwargs).arguments, self.device)
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
        # replaces torchmetrics' wrapper, which judges "never updated" on this rank's count before the
        # sync (an idle rank warns, and with warnings as errors raises while its peers wait in the
        # sync) and leaves the summed states in place when compute() raises
        @functools.wraps(compute)
        def synced_compute(*args: Any, **kwargs: Any) -> Any:
            try:
                self.sync(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync)
                if self._update_count == 0:  # summed over all ranks when synced
                    rank_zero_warn(
                        f"The ``compute`` method of metric {type(self).__name__} was called before the "
                        "``update`` method which may lead to errors, as metric states have not yet been "
                        "updated.",
                        UserWarning,
                    )
                self._warn_nonfinite()
                return _returned(compute(*args, **kwargs))
            finally:
                if self._is_synced and self._should_unsync:  # forward(dist_sync_on_step) keeps them
                    self.unsync()

        return synced_compute

    def compute_on_current_states(self) -> MetricOutput:
        """``compute()`` on the states as they are now: no sync, no cache, no torchmetrics wrapper.

        [`DiagnosticCollection`][metrics_suite.collection.DiagnosticCollection] calls this after its own fused sync.
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
        """Reset every state to zero (and re-arm the non-finite warning, zero the synced-compute count)."""
        super().reset()
        if not self._in_forward:  # forward() resets for its batch value: that is no new epoch
            self._warned_nonfinite = False
            self._synced_computes = 0

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

    # ------------------------------------------------------------------ fingerprint
    @classmethod
    def fingerprint_args(cls) -> tuple[str, ...]:
        """Arguments whose values must agree before states are summed, merged or loaded.

        Every constructor argument of the class and its bases (read back from the attribute of the
        same name), minus [`fingerprint_exclude`][metrics_suite.base.DiagnosticMetric.fingerprint_exclude], plus [`fingerprint_attributes`][metrics_suite.base.DiagnosticMetric.fingerprint_attributes].
        """
        return _fingerprint_args(cls)

    def fingerprint_config(self) -> dict[str, str]:
        """``{argument: JSON of its value}`` for every [`fingerprint_args`][metrics_suite.base.DiagnosticMetric.fingerprint_args] entry.

        Raises:
            TypeError: an argument is not stored under its own name (a metric class must store it,
                or list it in ``fingerprint_exclude`` when it does not change what a state means).
        """
        config = {}
        for name in self.fingerprint_args():
            if not hasattr(self, name):
                raise TypeError(
                    f"{type(self).__name__}: constructor argument `{name}` is not stored as `self.{name}`, so "
                    "the fingerprint cannot read it; store it, or add it to `fingerprint_exclude` if it "
                    "does not change what a state means"
                )
            config[name] = _json(getattr(self, name))
        return config

    def sync_fingerprint(self, name: str | None = None) -> MetricFingerprint:
        """This metric's part of the check before a sync (``name`` defaults to the class name)."""
        cls = type(self).__name__
        # the layout and the JSON of the arguments are rebuilt only when a value, shape or dtype changed
        states = self.state_items()
        key = (
            [getattr(self, a, None) for a in self.fingerprint_args()],
            [(t.shape, t.dtype) for _, t in states],
        )
        cached = self.__dict__.get("_fingerprint_cache")
        try:
            hit = cached is not None and cached[0] == key
        except (RuntimeError, ValueError):  # an argument that compares element-wise (a tensor)
            hit = False
        if not hit:
            cached = (key, _layout_text(states), self.fingerprint_config())
            self.__dict__["_fingerprint_cache"] = cached
        assert cached is not None
        return MetricFingerprint(name or cls, cls, cached[1], self._synced_computes, cached[2])

    def check_config(self, other: Mapping[str, str], source: str) -> None:
        """Raise ``ValueError`` naming every fingerprint argument whose JSON value differs in ``other``.

        Arguments missing on either side are not compared (a checkpoint from an older version).
        """
        mine = self.fingerprint_config()
        differ = [name for name in mine if name in other and other[name] != mine[name]]
        if differ:
            what = "; ".join(f"`{n}` is {mine[n]} here but {other[n]} in {source}" for n in differ)
            raise ValueError(
                f"{type(self).__name__}: {what}. Their states mean different things and cannot be "
                f"combined; build the metric with the same {', '.join(f'`{n}`' for n in differ)}."
            )

    # ------------------------------------------------------------------ merge / load
    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add the states of another metric of this class (or a ``{state: tensor}`` dict) to these.

        The update counts add up too (a dict counts as one update, unless it carries the
        ``update_count`` of a ``state_dict()``), so a metric that only received merged states is not
        "never updated".

        Raises:
            ValueError: a state has another shape than this metric's (e.g. a different
                ``num_components``) or is missing, the other metric is of another class, or it was
                built with another value of a fingerprint argument ([`fingerprint_args`][metrics_suite.base.DiagnosticMetric.fingerprint_args]; checked
                for a metric and for a ``state_dict()`` that carries its ``fingerprint``).
            TypeError: a state is not a tensor.
        """
        # every state is sum-reduced, so the merge is an addition; done here rather than by
        # torchmetrics' ``merge_state``, which only exists from torchmetrics 1.6
        updates, config = 1, None
        if isinstance(incoming_state, type(self)):
            updates, config = incoming_state._update_count, incoming_state.fingerprint_config()
            incoming_state = incoming_state.metric_state
        elif not isinstance(incoming_state, dict):
            raise ValueError(
                f"{type(self).__name__}.merge_state: `incoming_state` must be a {type(self).__name__} or "
                f"a dict of states, got {type(incoming_state).__name__}"
            )
        elif "update_count" in incoming_state:  # a state_dict()
            incoming_state = dict(incoming_state)
            updates = int(incoming_state.pop("update_count"))
            saved = incoming_state.pop("fingerprint", None)
            config = None if saved is None else _decode_config(saved)
        missing = [name for name in self._defaults if name not in incoming_state]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.merge_state: `incoming_state` lacks the states {missing}"
            )
        checked = {name: self._checked_state(name, incoming_state[name]) for name in self._defaults}
        if config is not None:  # after the shapes: a shape error names the state that differs
            self.check_config(config, "the merged metric")
        for name, value in checked.items():
            setattr(self, name, getattr(self, name) + value)
        self._update_count += updates

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # resumed from a checkpoint, a metric must still know it holds updates ("never updated"
        # warnings); without persistent states there is nothing the count could describe
        if any(self._persistent[name] for name in self._defaults):
            destination[prefix + "update_count"] = torch.tensor(self._update_count, dtype=torch.int64)
            # a tensor (not a string): it survives weights_only loading and a cast of every entry
            destination[prefix + "fingerprint"] = _encode_config(self.fingerprint_config())

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # torchmetrics would take the saved tensors as they are: another shape would break the
        # fused sync later, a float32 copy would silently end float64 accumulation
        for name in self._defaults:
            if prefix + name in state_dict:
                state_dict[prefix + name] = self._checked_state(name, state_dict[prefix + name])
        count = state_dict.pop(prefix + "update_count", None)  # absent from older checkpoints
        saved = state_dict.pop(prefix + "fingerprint", None)
        # compared after loading, as loading may set an argument (PerturbationCorrelation's seed comes
        # with the checkpoint); a mismatch puts everything back
        restore = snapshot(self) if saved is not None else None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if restore is not None:
            try:
                self.check_config(_decode_config(saved), "the checkpoint")
            except ValueError:
                restore()
                raise
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
        """Register a ``[*shape, 3]`` float64 state of (Σw, Σwx, Σwx²); see `mean_stats`."""
        self.add_sum_state(name, (*tuple(shape), 3))

    def add_sketch_state(self, name: str, spec: SketchSpec, batch_shape: Sequence[int] = ()) -> None:
        """Register an int64 ``[*batch_shape, spec.num_buckets]`` quantile-sketch state.

        Fill it with `sketch_update` (counts add up, so the
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
        """Replace torchmetrics' per-state gathers with one fused ``all_reduce(SUM)``.

        The update count travels in the same buffer: while synced, ``_update_count`` is the count of
        all ranks (``unsync`` puts this rank's back).
        """
        states = self.state_items()
        count = torch.tensor(self._update_count, dtype=torch.int64, device=states[0][1].device)
        reduced = fused_all_reduce(
            [*states, ("update_count", count)],
            group=process_group or self.process_group,
            check_layout=self.check_layout,
            fingerprints=[self.sync_fingerprint()],
            label=f"{type(self).__name__}.compute()",
        )
        for (name, _), value in zip(states, reduced):
            setattr(self, name, value)
        self._local_update_count, self._update_count = self._update_count, int(reduced[-1])
        self._synced_computes += 1

    def unsync(self, should_unsync: bool = True) -> None:
        """Put this rank's own states and update count back after a sync."""
        super().unsync(should_unsync)
        if should_unsync:
            self._update_count = self._local_update_count

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
        Buffers (reference data such as [`FeatureDrift`][metrics_suite.credit.FeatureDrift]'s copy) keep their
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
        """Plot the value (or a list of values); see [`metrics_suite.plots.plot_metric`][metrics_suite.plots.plot_metric]."""
        from metrics_suite.plots import plot_metric

        return plot_metric(self, val, ax)

    def flatten_output(self, value: MetricOutput) -> dict[str, Tensor]:
        """Flatten a ``compute()`` result into scalar entries keyed relative to the metric.

        A scalar tensor gets the key ``""``; a vector gets ``"{vector_label}_{i}"``; a dict entry
        ``stat`` gets ``"stat"`` or ``"stat/{vector_label}_{i}"`` (with [`value_name`][metrics_suite.base.DiagnosticMetric.value_name] set, the
        value keeps ``""`` and its standard error gets ``"stderr"``). A tensor of several dims gets one
        ``{label}_{i}`` part per dim, the last labelled by [`last_dim_labels`][metrics_suite.base.DiagnosticMetric.last_dim_labels] where it names the stat.
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
            labels = [self.vector_label] * tensor.ndim
            labels[-1] = self.last_dim_labels.get(stat, self.vector_label)
            for index, element in zip(itertools.product(*map(range, tensor.shape)), tensor.reshape(-1)):
                key = "/".join(f"{label}_{i}" for label, i in zip(labels, index))
                flat[f"{stat}/{key}" if stat else key] = element
        return flat
