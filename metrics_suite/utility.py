"""Utility suite: does the transformed model still do its job?

* [`NextTokenDivergence`][metrics_suite.utility.NextTokenDivergence] — how far the next-token distribution of the transformed ("noisy")
  model moves from the clean one (Jeffreys, Jensen-Shannon, total variation, squared Hellinger).
* [`MaskedCrossEntropy`][metrics_suite.utility.MaskedCrossEntropy] — token-mean cross-entropy and perplexity against target tokens.
* [`PredictionChange`][metrics_suite.utility.PredictionChange] — how often an intervention changes predicted classes, per class.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

from pydantic import Field, StrictFloat, StrictInt
from torch import Tensor

from metrics_suite.base import DiagnosticMetric
from metrics_suite.examples import utility as examples
from metrics_suite.functional._sketch import SketchSpec, check_quantiles, sketch_outputs
from metrics_suite.functional.utility import (
    DIVERGENCES,
    TOKEN_VALUES,
    DivergenceReduction,
    _cross_entropy_compute,
    _cross_entropy_stats,
    _cross_entropy_update,
    _next_token_compute,
    _next_token_sketch,
    _next_token_stats,
    _next_token_update,
    _prediction_change_compute,
    _prediction_change_per_class,
    _prediction_change_update,
    argmax_logits,
    patch_label_mask,
    patch_majority_label,
)
from metrics_suite.registry import register
from metrics_suite.validation import (
    Size,
    check_float,
    check_mask,
    check_ndim,
    check_tensor,
    shape_str,
    validated,
)

__all__ = [
    "ClassChange",
    "MaskedCrossEntropy",
    "NextTokenDivergence",
    "PredictionChange",
    "PredictionChangeReport",
    "argmax_logits",
    "patch_label_mask",
    "patch_majority_label",
]


# ---------------------------------------------------------------------------------------------- next-token divergence
@register("utility", "next_token", example=examples.NEXT_TOKEN)
class NextTokenDivergence(DiagnosticMetric):
    r"""Divergences between the next-token distributions of a clean and a transformed ("noisy") model.

    Per attended token, with $p = \mathrm{softmax}(\text{clean})$,
    $q = \mathrm{softmax}(\text{noisy})$, $m = (p + q)/2$ and the natural log:

    $$
    \text{jeffreys} = \sum_v (p_v - q_v)(\log p_v - \log q_v), \qquad
    \text{jensen\_shannon} = \tfrac12 \mathrm{KL}(p\,\|\,m) + \tfrac12 \mathrm{KL}(q\,\|\,m) \in [0, \ln 2],
    $$

    $$
    \text{total\_variation} = \tfrac12 \sum_v |p_v - q_v|, \qquad
    \text{squared\_hellinger} = \tfrac12 \sum_v (\sqrt{p_v} - \sqrt{q_v})^2 = 1 - \sum_v \sqrt{p_v q_v},
    $$

    $$
    \text{kl\_clean\_noisy} = \mathrm{KL}(p\,\|\,q) = \sum_v p_v (\log p_v - \log q_v), \qquad
    \text{kl\_noisy\_clean} = \mathrm{KL}(q\,\|\,p) = \sum_v q_v (\log q_v - \log p_v),
    $$

    from the same pass (their sum is ``jeffreys``; SAELens reports KL(clean‖spliced), llama.cpp
    KL(ref‖eval), i.e. ``kl_clean_noisy``). ``top1_agreement`` is the share of attended tokens whose
    clean and noisy argmax agree (the first largest logit, as `torch.argmax`); it is a token
    share whatever ``reduction``.

    With ``num_logits=k`` both distributions are restricted to the union of the top-k sets of the
    clean and of the noisy logits at that position, and renormalised on it. A top-k set holds every
    entry at least the k-th largest logit (ties at the k-th place all count, so it may exceed k)
    except −inf entries: the result does not depend on the order of the vocabulary.

    ``reduction="sequence"`` (default) averages over the attended tokens of each sequence, then over
    sequences (sequences without attended tokens do not count); ``"token"`` averages over all attended
    tokens. Both are kept in the state, so the choice only matters at ``compute()``.

    With ``quantiles``, each divergence also reports ``{name}_p50`` ... (one key per level,
    `quantile_key`) and ``{name}_max`` over attended tokens
    (whatever ``reduction``), from a log-bucketed sketch per divergence kept as an int64 count state:
    each is within relative error ``relative_accuracy`` of the exact token quantile
    (``numpy.quantile(..., method="inverted_cdf")``) and of the maximum; values below about 1e-12
    are reported as 0, values above about 1e4 (and +inf) as +inf.

    The logits are read one chunk of attended positions at a time (log space, at least float32):
    the extra memory is ``O(chunk × V)``, never ``O(B × T × V)``, and masked positions are not computed.

    Args:
        num_logits: size of the top-k sets, or None for the full vocabulary.
        max_batch_size: at most this many sequences' worth of positions per chunk.
        max_sequence_length: at most this many positions per sequence per chunk. With neither limit,
            a chunk is sized so that one ``[chunk, V]`` float32 buffer is about 2 MiB.
        reduction: ``"sequence"`` or ``"token"``.
        quantiles: levels in [0, 1] of the per-token quantiles to report, e.g. ``(0.5, 0.9, 0.99)``;
            None (default) keeps the sketch off (no state, no extra outputs).
        relative_accuracy: α in (0, 1) of the sketch: 1845 counts per divergence at 0.01.
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options (``with_stderr`` adds
            ``<name>_stderr``: over sequences, or over tokens for ``"token"``).

    ``update(clean_logits, noisy_logits, attention_mask=None)`` takes logits ``[B, T, V]`` and a bool
    mask ``[B, T]``. A −inf logit (a banned token) is valid: a token that is −inf in both inputs
    contributes 0, one that is −inf in only one makes that position's Jeffreys +inf (the other
    three stay finite; so does the KL direction with the −inf on its first side). An item is a token:
    with ``nan_strategy="skip"`` an attended position whose logits hold NaN or +inf, or are all −inf, is
    left out and counted in ``nonfinite_count``; its sequence keeps its other tokens.

    ``compute()`` returns ``{"jeffreys", "jensen_shannon", "total_variation", "squared_hellinger",
    "kl_clean_noisy", "kl_noisy_clean", "top1_agreement"}`` (NaN when no token was attended), then the
    quantile outputs.

    Examples:
        >>> import torch
        >>> from metrics_suite import NextTokenDivergence
        >>> clean = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
        >>> noisy = torch.tensor([[[0.5, 0.5, 2.0], [1.0, 1.0, 1.0]], [[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> metric = NextTokenDivergence()
        >>> metric.update(clean, noisy, mask)
        >>> out = {k: round(v.item(), 4) for k, v in metric.compute().items()}
        >>> {k: out[k] for k in ("jeffreys", "jensen_shannon", "total_variation", "squared_hellinger")}
        {'jeffreys': 1.3803, 'jensen_shannon': 0.1488, 'total_variation': 0.3629, 'squared_hellinger': 0.1596}
        >>> out["top1_agreement"]  # token (1, 0) moves its top token from 0 to 2; (0, 0) and (0, 1) keep it
        0.6667

        KL both ways tell the directions apart: p = (¼, ¾), q = (½, ½) gives
        KL(p‖q) = ¼ln½ + ¾ln(3/2) = 0.1308 and KL(q‖p) = ½ln2 + ½ln(2/3) = 0.1438.

        >>> import math
        >>> kl = NextTokenDivergence(quantiles=(0.5, 0.9))
        >>> kl.update(torch.tensor([[[0.0, math.log(3.0)]]]), torch.zeros(1, 1, 2))
        >>> out = {k: round(v.item(), 4) for k, v in kl.compute().items()}
        >>> out["kl_clean_noisy"], out["kl_noisy_clean"], out["kl_clean_noisy_p50"]  # p50 within 1%
        (0.1308, 0.1438, 0.1313)
    """

    higher_is_better = False
    # chunk sizes bound memory only
    fingerprint_exclude = DiagnosticMetric.fingerprint_exclude | {"max_batch_size", "max_sequence_length"}

    sequence_stats: Tensor
    token_stats: Tensor
    divergence_sketch: Tensor

    @validated
    def __init__(
        self,
        num_logits: Size | None = None,
        max_batch_size: Size | None = None,
        max_sequence_length: Size | None = None,
        reduction: DivergenceReduction = "sequence",
        quantiles: Sequence[Any] | None = None,  # checked by check_quantiles: pydantic would take True as 1.0
        relative_accuracy: Annotated[StrictFloat, Field(gt=0.0, lt=1.0)] = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_logits = num_logits
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.reduction = reduction
        self.quantiles = None if quantiles is None else check_quantiles(quantiles, type(self).__name__)
        self.relative_accuracy = relative_accuracy
        # per divergence: (n, Σx, Σx²) over sequences of per-sequence means; over tokens, also top-1
        self.add_mean_state("sequence_stats", (len(DIVERGENCES),))
        self.add_mean_state("token_stats", (len(TOKEN_VALUES),))
        self.sketch_spec = None if quantiles is None else SketchSpec(relative_accuracy=relative_accuracy)
        if self.sketch_spec is not None:
            self.add_sketch_state("divergence_sketch", self.sketch_spec, (len(DIVERGENCES),))

    def update(
        self, clean_logits: Tensor, noisy_logits: Tensor, attention_mask: Tensor | None = None
    ) -> None:
        """Add one batch of clean and noisy logits ``[B, T, V]`` (and a bool ``[B, T]`` mask)."""
        tokens = _next_token_update(
            clean_logits,
            noisy_logits,
            attention_mask,
            num_logits=self.num_logits,
            max_batch_size=self.max_batch_size,
            max_sequence_length=self.max_sequence_length,
            validate=self.validate_args,
        )
        keep, skipped = self.nonfinite_filter("clean_logits`/`noisy_logits", tokens.finite)
        sequence_stats, token_stats = _next_token_stats(tokens, keep)
        if self.sketch_spec is not None:
            sketch = _next_token_sketch(tokens, keep, self.sketch_spec)
            self.divergence_sketch += sketch.to(self.divergence_sketch.device)
        self.nonfinite_count += skipped.to(self.nonfinite_count.device)
        self.sequence_stats += sequence_stats.to(self.sequence_stats.device)
        self.token_stats += token_stats.to(self.token_stats.device)

    def update_from_super_batch(self, logits: Tensor, attention_mask: Tensor | None = None) -> None:
        """Update from one forward pass over clean and noisy inputs stacked along dim 0.

        Args:
            logits: ``[2B, T, V]``; the first ``B`` rows are clean, the last ``B`` noisy.
            attention_mask: ``[B, T]`` (shared by both halves) or ``[2B, T]``; with ``[2B, T]`` a
                position counts when it is attended in both halves.
        """
        if self.validate_args:
            check_float("logits", logits)
            check_ndim("logits", logits, 3)
            if logits.shape[0] % 2:
                raise ValueError(
                    f"`logits` must stack clean and noisy halves along dim 0 (even size), got {shape_str(logits.shape)}"
                )
        half = logits.shape[0] // 2
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask)
        if attention_mask is not None and tuple(attention_mask.shape) == (logits.shape[0], logits.shape[1]):
            both = check_mask("attention_mask", attention_mask, tuple(attention_mask.shape))
            attention_mask = both[:half] & both[half:]
        elif attention_mask is not None and tuple(attention_mask.shape) != (half, logits.shape[1]):
            raise ValueError(
                f"`attention_mask` must have shape {shape_str((half, logits.shape[1]))} or "
                f"{shape_str(logits.shape[:2])}, got {shape_str(attention_mask.shape)}"
            )
        self.update(logits[:half], logits[half:], attention_mask)

    def compute(self) -> dict[str, Tensor]:
        """Mean of each divergence and ``top1_agreement`` (plus ``*_stderr``, and quantiles when enabled)."""
        stats = self.sequence_stats if self.reduction == "sequence" else self.token_stats[: len(DIVERGENCES)]
        out = _next_token_compute(stats, self.token_stats, self.with_stderr)
        if self.sketch_spec is not None and self.quantiles is not None:
            out.update(sketch_outputs(self.divergence_sketch, self.sketch_spec, self.quantiles, DIVERGENCES))
        return out


# ---------------------------------------------------------------------------------------------- cross-entropy
@register("utility", "cross_entropy", example=examples.CROSS_ENTROPY)
class MaskedCrossEntropy(DiagnosticMetric):
    r"""Token-mean cross-entropy (nats) and perplexity of logits against target tokens.

    $$
    \text{cross\_entropy} = \frac{1}{|S|}\sum_{(b,t) \in S} -\log \mathrm{softmax}(z_{b,t})_{y_{b,t}},
    \qquad \text{perplexity} = e^{\text{cross\_entropy}},
    $$

    over the set $S$ of attended positions whose target is not ``ignore_index``.
    ``target_ids[b, t]`` is the token that ``logits[b, t]`` predicts: shift labels yourself
    (``logits[:, :-1]`` against ``input_ids[:, 1:]``). Computed in chunks like
    [`NextTokenDivergence`][metrics_suite.utility.NextTokenDivergence].

    Args:
        ignore_index: target id whose positions are left out (e.g. -100), or None.
        max_batch_size: chunk limit, as in [`NextTokenDivergence`][metrics_suite.utility.NextTokenDivergence].
        max_sequence_length: chunk limit, as in [`NextTokenDivergence`][metrics_suite.utility.NextTokenDivergence].
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options (``with_stderr`` adds
            ``cross_entropy_stderr``, over tokens).

    ``update(logits, target_ids, attention_mask=None)``: logits ``[B, T, V]``, integer targets
    ``[B, T]`` (in ``[0, V)`` where counted), bool mask ``[B, T]``. An item is a sequence. As in
    [`torch.nn.functional.cross_entropy`](https://docs.pytorch.org/docs/stable/generated/torch.nn.functional.cross_entropy.html), −inf logits are valid and a target whose logit is
    −inf has an infinite loss, which is counted (``cross_entropy`` becomes +inf, not skipped); only
    counted positions whose logits hold NaN or +inf, or are all −inf, are non-finite for
    ``nan_strategy``.

    Examples:
        >>> import torch
        >>> from metrics_suite import MaskedCrossEntropy
        >>> logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        >>> metric = MaskedCrossEntropy(ignore_index=-100)
        >>> metric.update(logits, torch.tensor([[0, 2]]))
        >>> metric.update(logits, torch.tensor([[1, -100]]))
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'cross_entropy': 1.3435, 'perplexity': 3.8325}
    """

    higher_is_better = False
    # chunk sizes bound memory only
    fingerprint_exclude = DiagnosticMetric.fingerprint_exclude | {"max_batch_size", "max_sequence_length"}

    cross_entropy_stats: Tensor

    @validated
    def __init__(
        self,
        ignore_index: StrictInt | None = None,
        max_batch_size: Size | None = None,
        max_sequence_length: Size | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.add_mean_state("cross_entropy_stats")

    def update(self, logits: Tensor, target_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        """Add one batch of logits ``[B, T, V]`` and targets ``[B, T]``."""
        nats, finite = _cross_entropy_update(
            logits,
            target_ids,
            attention_mask,
            ignore_index=self.ignore_index,
            max_batch_size=self.max_batch_size,
            max_sequence_length=self.max_sequence_length,
            validate=self.validate_args,
        )
        keep, skipped = self.nonfinite_filter("logits", finite)
        stats = _cross_entropy_stats(nats, keep)
        self.nonfinite_count += skipped.to(self.nonfinite_count.device)
        self.cross_entropy_stats += stats.to(self.cross_entropy_stats.device)

    def compute(self) -> dict[str, Tensor]:
        """``cross_entropy`` (plus ``cross_entropy_stderr``) and ``perplexity``."""
        return _cross_entropy_compute(self.cross_entropy_stats, self.with_stderr)


# ---------------------------------------------------------------------------------------------- prediction change
@dataclasses.dataclass(frozen=True)
class ClassChange:
    """Prediction changes of one class (see [`PredictionChange`][metrics_suite.utility.PredictionChange]).

    Attributes:
        class_id: the class index.
        class_name: its name (``str(class_id)`` without ``class_names``).
        n_orig: items originally predicted as this class.
        n_changed: of those, items now predicted as another class.
        n_other: items originally predicted as another class.
        n_other_changed: of those, items now predicted differently from their original class.
        target_ratio: ``n_changed / n_orig`` (0.0 when ``n_orig == 0``).
        other_ratio: ``n_other_changed / n_other`` (0.0 when ``n_other == 0``).
        change_distribution: where the changed items of this class went: ``{new class name: count}``
            for every other class.
    """

    class_id: int
    class_name: str
    n_orig: int
    n_changed: int
    n_other: int
    n_other_changed: int
    target_ratio: float
    other_ratio: float
    change_distribution: dict[str, int]


@dataclasses.dataclass(frozen=True)
class PredictionChangeReport:
    """One result row of a prediction-change experiment, e.g. one intervention method and scale."""

    #: Field names in CSV column order.
    CSV_FIELDS: ClassVar[tuple[str, ...]] = (
        "method",
        "intervention_scale",
        "num_items",
        "target_change",
        "other_change",
        "target_change_std",
        "other_change_std",
    )

    method: str
    intervention_scale: float
    num_items: int
    target_change: float
    other_change: float
    target_change_std: float
    other_change_std: float

    @classmethod
    def csv_header(cls) -> str:
        """The CSV header line matching [`to_csv_row`][metrics_suite.utility.PredictionChangeReport.to_csv_row] (no line terminator)."""
        return ",".join(cls.CSV_FIELDS)

    def to_csv_row(self) -> str:
        """This record as one CSV line (no line terminator), fields in [`CSV_FIELDS`][metrics_suite.utility.PredictionChangeReport.CSV_FIELDS] order."""
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow([getattr(self, name) for name in self.CSV_FIELDS])
        return buffer.getvalue()


@register("utility", "prediction_change", example=examples.PREDICTION_CHANGE, needs_config=True)
class PredictionChange(DiagnosticMetric):
    r"""How often an intervention changes predicted classes (e.g. per image patch), per original class.

    The state is a ``[C, C]`` count matrix (original class → modified class). For class $c$:
    $n^{orig}_c$ items were originally $c$, $n^{chg}_c$ of them are no longer
    $c$; $n^{oth}_c$ items were originally another class, $n^{oth,chg}_c$ of
    them changed class.

    $$
    \text{target\_change} = \frac{\sum_c n^{chg}_c}{\sum_c n^{orig}_c}, \qquad
    \text{other\_change} = \frac{\sum_c n^{oth,chg}_c}{\sum_c n^{oth}_c},
    $$

    ``target_change_std`` / ``other_change_std``: population standard deviation over classes of
    $n^{chg}_c / n^{orig}_c$ and $n^{oth,chg}_c / n^{oth}_c$ (0.0 for a class without
    support). Summed over classes both ratios count every changed item, so ``other_change``
    equals ``target_change`` when ``C > 1``; the per-class ratios ([`class_results`][metrics_suite.utility.PredictionChange.class_results]) and their
    spread are where they differ. No data gives NaN.

    Args:
        num_classes: number of classes ``C``.
        class_names: optional ``C`` distinct names for [`class_results`][metrics_suite.utility.PredictionChange.class_results].
        kwargs: [`DiagnosticMetric`][metrics_suite.base.DiagnosticMetric] options.

    ``update(original_preds, modified_preds, mask=None)`` takes integer class ids of equal shape
    (any shape; use [`argmax_logits`][metrics_suite.functional.utility.argmax_logits] on logits) and an optional bool mask of the same shape
    (e.g. [`patch_label_mask`][metrics_suite.functional.utility.patch_label_mask]). Ids must be in ``[0, C)`` where selected.

    Examples:
        >>> import torch
        >>> from metrics_suite import PredictionChange
        >>> metric = PredictionChange(num_classes=3, class_names=["sky", "tree", "road"])
        >>> metric.update(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 0, 1]))
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'target_change': 0.5, 'other_change': 0.5, 'target_change_std': 0.4082, 'other_change_std': 0.2041}
        >>> metric.class_results()[2].change_distribution
        {'sky': 1, 'tree': 1}
        >>> metric.report("steering", 2.0).to_csv_row()
        'steering,2.0,6,0.5,0.5,0.408248290463863,0.2041241452319315'
    """

    no_stderr = "its rates are ratios of the transition counts, with no per-item squares kept"

    transition_counts: Tensor

    @validated
    def __init__(self, num_classes: Size, class_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"`class_names` must hold num_classes={num_classes} names, got {len(class_names)}"
            )
        if class_names is not None and len(set(class_names)) != num_classes:
            # names key `change_distribution`: a repeated name would merge two classes' counts
            repeated = sorted(name for name, count in Counter(class_names).items() if count > 1)
            raise ValueError(f"`class_names` must be distinct, got repeated names {repeated}")
        self.num_classes = num_classes
        self.class_names = (
            tuple(class_names) if class_names is not None else tuple(map(str, range(num_classes)))
        )
        self.add_count_state("transition_counts", (num_classes, num_classes))

    def update(self, original_preds: Tensor, modified_preds: Tensor, mask: Tensor | None = None) -> None:
        """Add one batch of original and modified class ids (equal shapes)."""
        counts = _prediction_change_update(
            original_preds, modified_preds, self.num_classes, mask, validate=self.validate_args
        )
        self.transition_counts += counts.to(self.transition_counts.device)

    def compute(self) -> dict[str, Tensor]:
        """``target_change``, ``other_change``, ``target_change_std``, ``other_change_std``."""
        return _prediction_change_compute(self.transition_counts)

    def _global_counts(self) -> Tensor:
        """The count matrix summed over ranks (a collective under DDP: call it on every rank)."""
        with self.sync_context(
            should_sync=self._to_sync and not self._is_synced,
            distributed_available=self.distributed_available_fn,
        ):
            return self.transition_counts.clone()

    def class_results(self) -> list[ClassChange]:
        """One [`ClassChange`][metrics_suite.utility.ClassChange] per class, from the counts of all ranks."""
        counts = self._global_counts()
        per_class = {k: v.tolist() for k, v in _prediction_change_per_class(counts).items()}
        rows = counts.tolist()
        return [
            ClassChange(
                class_id=c,
                class_name=name,
                n_orig=per_class["n_orig"][c],
                n_changed=per_class["n_changed"][c],
                n_other=per_class["n_other"][c],
                n_other_changed=per_class["n_other_changed"][c],
                target_ratio=per_class["target_ratio"][c],
                other_ratio=per_class["other_ratio"][c],
                change_distribution={
                    self.class_names[j]: rows[c][j] for j in range(self.num_classes) if j != c
                },
            )
            for c, name in enumerate(self.class_names)
        ]

    def report(self, method: str, intervention_scale: float) -> PredictionChangeReport:
        """The aggregate result as a [`PredictionChangeReport`][metrics_suite.utility.PredictionChangeReport] (one CSV row)."""
        counts = self._global_counts()
        values = {k: float(v) for k, v in _prediction_change_compute(counts).items()}
        return PredictionChangeReport(
            method=method, intervention_scale=float(intervention_scale), num_items=int(counts.sum()), **values
        )
