"""The evaluation-metrics codec: one ``SplitMetrics`` <-> the keys of an evaluate reply.

The site encodes each split it evaluated with ``to_record``; the server decodes it with
``from_record`` - the same module on both sides, so a key cannot be spelled two ways.

Why the dataclass lives in ``models/metrics.py`` and only the codec here: evaluators
(``models/``, pure PyTorch, no Flower) produce ``SplitMetrics`` and the server pools it with
the same confusion-matrix maths, so the value type belongs with that maths; what is
Flower-specific - record keys, list encoding, and distrust of what arrives - is here.

Encoding, under ``f"{split}-"`` (e.g. ``val-``, ``personal-test-``, ``test-without-T1-``):

- ``n``, ``loss``, ``seconds``: scalars;
- ``confusion`` / ``finding-confusions``: ONE ``list[int]`` each (the counts, row-major)
  with its shape beside it in ``...-shape`` - only for tasks that have one;
- ``auroc``: a ``list[float]``, ``[value]`` where defined and ``[]`` where not (one class
  present). Flower rejects replies whose MetricRecords have different key sets, so the key
  is always there and its *length* says whether AUROC was measured: no 0.0 stand-in that a
  reader could mistake for a measurement, no NaN (which would poison any unguarded mean);
- ``mean-<name>`` / ``count-<name>``: per-study means (pooled weighted by the studies each
  averages over: n, or the counts ``models.metrics.AVERAGED_OVER`` names) and counts (pooled
  by sum);
- ``suppressed``: 1.0 where the site held back a split too small to report (its node config
  ``min-eval-split-size``): every field is the empty (``n = 0``) result - its size, a small
  count, is not sent - and ``from_record`` decodes it as *not measured*, which every consumer
  (pooling, console, tracking) leaves out.

Every key depends on the task and its config only, never on the data: all sites of one
run send the same key set for a split, empty splits included (``n = 0``).

Bounds (``from_record``): what the server pools must not overflow when summed over sites
(int64 confusion counts, float sums of seconds and counts) nor name more figures than a task
has, so ``n`` is at most :data:`MAX_STUDIES`, class/finding counts at most
:data:`MAX_CATEGORIES`, seconds, means and counts finite and at most :data:`MAX_FIGURE` in
magnitude, and mean/count names are short lower-case words (they become MLflow keys), at
most :data:`MAX_NAMED` of them. ``loss`` alone may be NaN (a diverged model: reported).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
from flwr.app import MetricRecord

from models.metrics import MAX_CATEGORIES, SplitMetrics

from . import wire

_CONFUSIONS = (("confusion", wire.EVAL_CONFUSION), ("finding_confusions", wire.EVAL_FINDINGS))

# Far above any site (a trillion studies), and 2**22 sites' int64 count sums cannot overflow.
MAX_STUDIES = 2**40
MAX_FIGURE = 1e12            # seconds, means, counts: sums over sites stay finite
MAX_NAMED = 64               # mean-/count- figures per split (honest tasks: a handful)
_NAME = re.compile(r"[a-z0-9_]{1,40}")     # what a task names its means and counts


def to_record(metrics: SplitMetrics, split: str, *, suppressed: bool = False
              ) -> MetricRecord:
    """The MetricRecord entries of one evaluated split (merge them into the reply).

    A ``suppressed`` split (too few studies for the site to report) is sent as ``n = 0`` and
    ``suppressed`` - never its size, a small count - and ``metrics`` must be the evaluator's
    empty result (same keys, nothing measured).
    """
    p = f"{split}-"
    if suppressed and metrics.n != 0:
        raise ValueError("a suppressed split must carry the empty (n = 0) result, not metrics")
    out = MetricRecord({p + wire.EVAL_N: float(metrics.n), p + wire.EVAL_LOSS: metrics.loss,
                        p + wire.EVAL_SUPPRESSED: float(suppressed),
                        p + wire.EVAL_SECONDS_SPLIT: metrics.seconds,
                        p + wire.EVAL_AUROC: [] if metrics.auroc is None else [metrics.auroc]})
    for field, key in _CONFUSIONS:
        counts = getattr(metrics, field)
        if counts is not None:
            out[p + key] = [int(v) for v in counts.ravel()]
            out[f"{p}{key}-{wire.EVAL_SHAPE}"] = [int(d) for d in counts.shape]
    for kind, values in ((wire.EVAL_MEAN, metrics.means), (wire.EVAL_COUNT, metrics.counts)):
        for name, value in values.items():
            out[p + kind + name] = float(value)
    return out


def from_record(record: Mapping, split: str) -> SplitMetrics:
    """Decode and validate one split of a site's reply.

    Raises
    ------
    ValueError
        Naming the split and what is wrong: a missing or non-numeric field, a confusion
        list whose length does not match its shape, negative, fractional or NaN counts,
        counts that do not add up to ``n``, an AUROC list longer than one or out of [0, 1],
        a figure beyond the bounds of the module docstring or a mean/count name that is not
        a short lower-case word.
        The server pools what sites send, so it checks instead of trusting it.
    """
    p = f"{split}-"
    try:
        suppressed = _scalar(record, p + wire.EVAL_SUPPRESSED, default=0.0) != 0.0
        fields = {"n": 0.0 if suppressed else _scalar(record, p + wire.EVAL_N), "loss": _scalar(record, p + wire.EVAL_LOSS),
                  "seconds": _scalar(record, p + wire.EVAL_SECONDS_SPLIT, default=0.0)}
        auroc = _numbers(record, p + wire.EVAL_AUROC, default=[])
        if len(auroc) > 1:
            raise ValueError(f"{wire.EVAL_AUROC} holds {len(auroc)} values; expected [value] "
                             "or [] (undefined)")
        fields["auroc"] = auroc[0] if auroc else None
        for field, key in _CONFUSIONS:
            if p + key in record:
                fields[field] = _shaped(record, p + key)
        for kind, name in ((wire.EVAL_MEAN, "means"), (wire.EVAL_COUNT, "counts")):
            fields[name] = _named(record, p + kind)
        _bounded(fields)
        return SplitMetrics(**fields)
    except (ValueError, TypeError) as error:
        raise ValueError(f"evaluation metrics of split {split!r} refused: {error}") from error


def report_splits(record: Mapping) -> list[str]:
    """Evaluation splits present in a site's reply: val and test (or, from an external site,
    external) and, if any, personal-*, test-without-<sequence> and external-without-<sequence>."""
    n = f"-{wire.EVAL_N}"
    if wire.EXTERNAL_SPLIT + n in record:
        return [wire.EXTERNAL_SPLIT] + sorted(
            k[:-len(n)] for k in record
            if k.startswith(wire.EXTERNAL_WITHOUT_PREFIX) and k.endswith(n))
    splits = list(wire.EVAL_SPLITS)
    splits += [wire.PERSONAL_PREFIX + s for s in wire.EVAL_SPLITS
               if f"{wire.PERSONAL_PREFIX}{s}{n}" in record]
    splits += sorted(k[:-len(n)] for k in record
                     if k.startswith(wire.WITHOUT_PREFIX) and k.endswith(n))
    return splits


def _named(record: Mapping, prefix: str) -> dict[str, float]:
    """The ``prefix<name>`` figures (means or counts), their names checked."""
    named = {k[len(prefix):]: _scalar(record, k) for k in record if k.startswith(prefix)}
    if len(named) > MAX_NAMED:
        raise ValueError(f"{len(named)} {prefix!r} figures; at most {MAX_NAMED} expected")
    if bad := [n for n in named if not _NAME.fullmatch(n)]:
        raise ValueError(f"{prefix!r} figure name {bad[0][:40]!r} is not a short lower-case "
                         "word ([a-z0-9_], at most 40)")
    return named


def _bounded(fields: dict) -> None:
    """Refuse values whose sums over sites could overflow (module docstring: bounds)."""
    if fields["n"] > MAX_STUDIES:
        raise ValueError(f"n {fields['n']:g} is above {MAX_STUDIES} studies")
    figures = {"seconds": fields["seconds"]} | fields["means"] | fields["counts"]
    if bad := [k for k, v in figures.items() if not abs(v) <= MAX_FIGURE]:   # NaN too
        raise ValueError(f"{bad[0]!r} is not finite or beyond {MAX_FIGURE:g} in magnitude")
    for field, _ in _CONFUSIONS:
        if (counts := fields.get(field)) is not None and counts.shape[0] > MAX_CATEGORIES:
            raise ValueError(f"{field} has {counts.shape[0]} categories; at most "
                             f"{MAX_CATEGORIES} expected")


def _scalar(record: Mapping, key: str, default: float | None = None) -> float:
    if key not in record:
        if default is not None:
            return default
        raise ValueError(f"{key!r} is missing")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key!r} must be a number, got {type(value).__name__}")
    return float(value)


def _numbers(record: Mapping, key: str, default: list | None = None) -> list[float]:
    if key not in record and default is not None:
        return default
    value = record.get(key)
    if not isinstance(value, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{key!r} must be a list of numbers")
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f"{key!r} holds NaN or infinite values")
    return [float(v) for v in value]


def _shaped(record: Mapping, key: str):
    """A counts list reshaped by its ``-shape`` entry; the length must match exactly."""
    shape = _numbers(record, f"{key}-{wire.EVAL_SHAPE}")
    values = _numbers(record, key)
    if not shape or any(d < 1 or not d.is_integer() for d in shape):
        raise ValueError(f"{key!r} has an invalid shape {shape}")
    shape = [int(d) for d in shape]
    if math.prod(shape) != len(values):
        raise ValueError(f"{key!r} holds {len(values)} counts but its shape is {shape}")
    return np.asarray(values).reshape(shape)
