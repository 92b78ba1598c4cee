"""Classification metrics as pure functions of labels and probabilities (no sklearn needed),
and ``SplitMetrics``: what one evaluated split yields, in a form that pools across sites.

MCC is the primary metric (as in MM-DINOv2); it and accuracy/F1 are computed from a confusion
matrix, so federated sites can send the matrix and the server can pool it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

PER_CLASS_F1 = "f1_class_"      # + k: the F1 of class (or finding) k, one name per class


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class i predicted as j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels.astype(int), preds.astype(int)), 1)
    return cm


def mcc(cm: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin 2004); 0 when undefined."""
    cm = cm.astype(np.float64)
    t, p = cm.sum(1), cm.sum(0)
    n, c = cm.sum(), np.trace(cm)
    denom = np.sqrt((n**2 - (p**2).sum()) * (n**2 - (t**2).sum()))
    return float((c * n - (t * p).sum()) / denom) if denom > 0 else 0.0


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over classes that occur in labels or predictions."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1) + cm.sum(0)
    present = support > 0
    if not present.any():
        return 0.0
    return float((2 * tp[present] / support[present]).mean())


def per_class_f1(cm: np.ndarray) -> list[float]:
    """F1 of each class (0 for a class that occurs in neither labels nor predictions)."""
    tp = np.diag(cm).astype(np.float64)
    support = (cm.sum(1) + cm.sum(0)).astype(np.float64)
    return [float(2 * t / s) if s > 0 else 0.0 for t, s in zip(tp, support)]


def balanced_accuracy(cm: np.ndarray) -> float:
    t = cm.sum(1)
    present = t > 0
    return float((np.diag(cm)[present] / t[present]).mean()) if present.any() else 0.0


def binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Mann–Whitney AUROC with average ranks for ties; None if one class is absent."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):                      # average ranks over tied runs
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """One-vs-rest AUROC averaged over classes present in ``labels``."""
    values = [binary_auroc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``confusion_metrics`` of the argmax predictions, plus macro-AUROC (if defined)."""
    out = confusion_metrics(confusion_matrix(labels, probs.argmax(1), probs.shape[1]))
    auroc = macro_auroc(labels, probs)
    if auroc is not None:
        out["auroc"] = auroc
    return out


def multilabel_confusions(targets: np.ndarray, probs: np.ndarray,
                          threshold: float = 0.5) -> np.ndarray:
    """``[C, 2, 2]``: one binary confusion matrix per label (true 0/1 x predicted 0/1)."""
    preds = probs >= threshold
    return np.stack([confusion_matrix(targets[:, k].astype(int), preds[:, k].astype(int), 2)
                     for k in range(targets.shape[1])])


def multilabel_from_confusions(cms: np.ndarray) -> dict[str, float]:
    """Macro metrics over labels from per-label binary confusions (poolable across sites):
    ``mcc`` = mean binary MCC, ``f1`` = mean F1 of the positive class, ``accuracy`` = mean
    per-label accuracy (1 - Hamming loss), ``balanced_accuracy`` = mean over labels."""
    per_f1 = [per_class_f1(cm)[1] for cm in cms]
    return {"accuracy": float(np.mean([np.trace(cm) / max(cm.sum(), 1) for cm in cms])),
            "balanced_accuracy": float(np.mean([balanced_accuracy(cm) for cm in cms])),
            "mcc": float(np.mean([mcc(cm) for cm in cms])),
            "f1": float(np.mean(per_f1))} | {f"{PER_CLASS_F1}{k}": f for k, f in enumerate(per_f1)}


def multilabel_auroc(targets: np.ndarray, probs: np.ndarray) -> float | None:
    """AUROC of each label averaged over the labels that have both outcomes."""
    values = [binary_auroc(probs[:, k], targets[:, k].astype(bool)) for k in range(probs.shape[1])]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def confusion_metrics(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, MCC, macro-F1 and per-class F1 (``f1_class_k``) of one
    multi-class confusion matrix: the same function scores a site's matrix and the sum of
    every site's, so a pooled figure is the figure of the pooled predictions."""
    return ({"accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
             "balanced_accuracy": balanced_accuracy(cm), "mcc": mcc(cm), "f1": macro_f1(cm)}
            | {f"{PER_CLASS_F1}{k}": f for k, f in enumerate(per_class_f1(cm))})


# The most classes (or findings of a multi-label task) a task may have: the wire codec
# refuses larger confusion matrices (protocol.metrics), so a task is refused at config load.
MAX_CATEGORIES = 1024

# Scalar names ``SplitMetrics.scalars`` derives itself; a mean or count may not reuse one, or
# a site's mean would replace the figure of the pooled counts. Read off what the confusion
# functions return (a 2-class matrix), so a figure added there is derived here too; the
# per-class F1 names are one per class (``PER_CLASS_F1`` + k, any k), matched by prefix.
DERIVED = frozenset({"n", "loss", "auroc"} | {
    name for name in confusion_metrics(np.eye(2, dtype=np.int64))
    | multilabel_from_confusions(np.eye(2, dtype=np.int64)[None])
    if not name.startswith(PER_CLASS_F1)})


def is_derived(name: str) -> bool:
    """Whether ``SplitMetrics.scalars`` derives ``name`` itself (``DERIVED`` or a per-class
    F1), so a mean or a count may not be called that."""
    return name in DERIVED or name.startswith(PER_CLASS_F1)


@dataclass(frozen=True)
class AveragedOver:
    """The studies a figure averages over when not all ``n`` of its split: the ``count``
    named, less the ``undefined`` one (those where the figure is not defined); fewer than
    ``fewest`` such studies and the figure is undefined, its weight 0 (InfoNCE contrasts
    two reports at least: a split's single report has no loss)."""
    count: str
    undefined: str | None = None
    fewest: int = 1


# CLIP's retrieval figures (``models.clip``): recall@k of each study's match among the split's
# reports, image->report (``i2r``) and report->image (``r2i``), one name per direction and k.
RECALL_AT = (1, 5)
RECALL_FIGURES: Mapping[tuple[str, int], str] = MappingProxyType(
    {(d, k): f"recall_{d}_{k}" for k in RECALL_AT for d in ("i2r", "r2i")})

# Figures that average over some of a split's studies, and the counts (sent beside them) that
# say how many: the pool weights each site's figure by those studies, not by its n (a site of
# 100 studies and 2 masks weighs 2 in the pooled Dice, not 100), so the pooled figure is the
# mean over every site's studies. Segmentation's loss, Dice and HD95 are over its studies with
# a mask, Dice and HD95 less those where each is undefined (a site of empty masks sends Dice
# 0.0 over none, which weighs nothing). CLIP's loss and recall@k are over its studies with a
# report (``n_reports``: ``models.clip.CLIPEvaluator`` contrasts every one of them, a batch's
# lone report with a neighbouring batch's, so no count of the uncontrasted is sent - it would
# be a small one); its loss needs two of them, a site with one sends 0.0 that weighs nothing.
# Each task reports one of a figure's counts (the loss: one of two); a figure not listed, or
# in a split that reports none of its counts, averages over ``n``.
AVERAGED_OVER: Mapping[str, tuple[AveragedOver, ...]] = MappingProxyType({
    "loss": (AveragedOver("n_masks"), AveragedOver("n_reports", fewest=2)),
    "dice": (AveragedOver("n_masks", "dice_undefined"),),
    "hd95": (AveragedOver("n_masks", "hd95_undefined"),),
    **{name: (AveragedOver("n_reports"),) for name in RECALL_FIGURES.values()}})


def _counts(name: str, value, shape_ok, what: str) -> np.ndarray | None:
    """Validated read-only int64 copy of a confusion array (None stays None)."""
    if value is None:
        return None
    raw = np.asarray(value)
    if raw.dtype.kind not in "iuf" or not shape_ok(raw.shape):
        raise ValueError(f"{name} must be {what}, got shape {raw.shape} of {raw.dtype}")
    if not np.isfinite(raw).all() or (raw < 0).any() or (raw != np.round(raw)).any():
        raise ValueError(f"{name} must hold non-negative whole counts (no NaN)")
    counts = raw.astype(np.int64)
    counts.setflags(write=False)
    return counts


@dataclass(frozen=True, eq=False)
class SplitMetrics:
    """What evaluating one split at one site yields, kept as the sufficient statistics that
    pool exactly across sites (the figures themselves are derived: ``scalars``).

    Parameters
    ----------
    n : int
        Studies evaluated (0: an empty split, nothing measured).
    loss : float
        Mean evaluation loss over the split (NaN if the model diverged: reported, not hidden).
    confusion : array ``[K, K]``, optional
        Multi-class counts, ``confusion[i, j]`` = studies of class i predicted j; sums to n.
    finding_confusions : array ``[F, 2, 2]``, optional
        Multi-label: one binary confusion (true 0/1 x predicted 0/1) per finding; each sums
        to n.
    auroc : float, optional
        None where undefined (a split with one class present) - never a 0.0 stand-in.
    means : mapping
        Per-study means (Dice, HD95, retrieval recall@k): pooled weighted by the studies each
        averages over (``studies``: n, or the counts ``AVERAGED_OVER`` names).
    counts : mapping
        Counts (reports ranked, HD95 undefined): pooled by sum.
    seconds : float
        Wall time the evaluation took (reported, not a property of the model).

    Arrays are validated and stored read-only; ``protocol.metrics`` carries this across the
    wire, so a malformed site reply fails here, on the server, with the reason.
    """

    n: int
    loss: float
    confusion: np.ndarray | None = None
    finding_confusions: np.ndarray | None = None
    auroc: float | None = None
    means: Mapping[str, float] = field(default_factory=dict)
    counts: Mapping[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self):
        if isinstance(self.n, bool) or not float(self.n).is_integer() or self.n < 0:
            raise ValueError(f"n must be a whole number of studies >= 0, got {self.n}")
        n = int(self.n)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "loss", float(self.loss))
        confusion = _counts("confusion", self.confusion,
                            lambda s: len(s) == 2 and s[0] == s[1] >= 2, "a [K, K] matrix, K >= 2")
        findings = _counts("finding_confusions", self.finding_confusions,
                           lambda s: len(s) == 3 and s[0] >= 1 and s[1:] == (2, 2),
                           "[F, 2, 2] binary confusions, F >= 1")
        if confusion is not None and confusion.sum() != n:
            raise ValueError(f"confusion counts {int(confusion.sum())} studies but n is {n}")
        if findings is not None and (findings.sum(axis=(1, 2)) != n).any():
            raise ValueError(f"every finding's confusion must count the n = {n} studies")
        object.__setattr__(self, "confusion", confusion)
        object.__setattr__(self, "finding_confusions", findings)
        if self.auroc is not None:
            if not (math.isfinite(self.auroc) and 0.0 <= self.auroc <= 1.0):
                raise ValueError(f"auroc must be in [0, 1] or None (undefined), got {self.auroc}")
            object.__setattr__(self, "auroc", float(self.auroc))
        for kind in ("means", "counts"):
            values = {str(k): float(v) for k, v in getattr(self, kind).items()}
            if clash := sorted(k for k in values if is_derived(k)):
                raise ValueError(f"{kind} may not reuse the derived names {clash}")
            if kind == "counts" and not all(math.isfinite(v) and v >= 0 for v in values.values()):
                raise ValueError("counts must be finite and >= 0")
            object.__setattr__(self, kind, MappingProxyType(values))
        for figure, choices in AVERAGED_OVER.items():
            if len(reported := [o.count for o in choices if o.count in self.counts]) > 1:
                raise ValueError(f"{figure} averages over one of {reported}, not each (a task "
                                 "reports one)")
            if (figure == "loss" or figure in self.means) and \
                    not 0 <= (claimed := self._counted(figure)) <= n:
                over = self._averaged_over(figure)
                raise ValueError(f"{figure} averages over {over.count} less "
                                 f"{over.undefined or 'nothing'}: {claimed:g} "
                                 f"studies, not between 0 and n = {n}")
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise ValueError(f"seconds must be finite and >= 0, got {self.seconds}")
        object.__setattr__(self, "seconds", float(self.seconds))

    def _averaged_over(self, figure: str) -> AveragedOver | None:
        """The counts of ``AVERAGED_OVER`` this split reports for ``figure`` (None: none)."""
        return next((o for o in AVERAGED_OVER.get(figure, ()) if o.count in self.counts), None)

    def _counted(self, figure: str) -> float:
        """The studies the counts say ``figure`` averages over (``n`` where none is sent)."""
        over = self._averaged_over(figure)
        if over is None:
            return float(self.n)
        return self.counts[over.count] - self.counts.get(over.undefined, 0.0)

    def studies(self, figure: str) -> float:
        """How many studies ``figure`` (``loss`` or a mean) averages over, its weight in a
        pool: the counts ``AVERAGED_OVER`` names where this split reports them, else ``n``;
        0 where they are fewer than the figure is defined over (``AveragedOver.fewest``)."""
        over, counted = self._averaged_over(figure), self._counted(figure)
        return counted if over is None or counted >= over.fewest else 0.0

    def scalars(self) -> dict[str, float]:
        """The figures: ``n``, ``loss``, the confusion-derived metrics (``confusion_metrics``
        or, multi-label, ``multilabel_from_confusions``), ``auroc`` only where defined, the
        means and the counts. ``seconds`` is not a figure of the model and is left out."""
        out = {"n": float(self.n), "loss": self.loss}
        if self.confusion is not None:
            out |= confusion_metrics(self.confusion)
        if self.finding_confusions is not None:
            out |= multilabel_from_confusions(self.finding_confusions)
        if self.auroc is not None:
            out["auroc"] = self.auroc
        return out | dict(self.means) | dict(self.counts)

    def __eq__(self, other) -> bool:
        if not isinstance(other, SplitMetrics):
            return NotImplemented
        def same(a, b):
            return (a is None) == (b is None) and (a is None or np.array_equal(a, b))
        return (self.n, self.auroc, dict(self.means), dict(self.counts), self.seconds) == \
            (other.n, other.auroc, dict(other.means), dict(other.counts), other.seconds) \
            and (self.loss == other.loss or (math.isnan(self.loss) and math.isnan(other.loss))) \
            and same(self.confusion, other.confusion) \
            and same(self.finding_confusions, other.finding_confusions)

    __hash__ = None
