"""Classification metrics as pure functions of labels and probabilities (no sklearn needed).

MCC is the primary metric (as in MM-DINOv2); it and accuracy/F1 are computed from a confusion
matrix, so federated sites can send the matrix and the server can pool it exactly.
"""

from __future__ import annotations

import numpy as np


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
    """Accuracy, balanced accuracy, MCC, macro-F1 and macro-AUROC (if defined)."""
    num_classes = probs.shape[1]
    cm = confusion_matrix(labels, probs.argmax(1), num_classes)
    out = {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "balanced_accuracy": balanced_accuracy(cm),
        "mcc": mcc(cm),
        "f1": macro_f1(cm),
    }
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
            "f1": float(np.mean(per_f1))} | {f"f1_class_{k}": f for k, f in enumerate(per_f1)}


def multilabel_auroc(targets: np.ndarray, probs: np.ndarray) -> float | None:
    """AUROC of each label averaged over the labels that have both outcomes."""
    values = [binary_auroc(probs[:, k], targets[:, k].astype(bool)) for k in range(probs.shape[1])]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
