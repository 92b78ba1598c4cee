"""Pool per-site evaluation counts into global metrics.

Sites send confusion-matrix counts (multi-label tasks: one binary matrix per finding), so
the server computes the *pooled* accuracy, MCC and F1 exactly (averaging per-site MCCs is not MCC). AUROC cannot be pooled from counts; it is
averaged over sites where it is defined, weighted by examples.
"""

from __future__ import annotations

import re

import numpy as np

from models.metrics import (balanced_accuracy, macro_f1, mcc, multilabel_from_confusions,
                            per_class_f1)

_CM = re.compile(r"^cm_(\d+)_(\d+)$")
_MLCM = re.compile(r"^mlcm_(\d+)_([01])_([01])$")    # multi-label: one 2x2 matrix per finding
AVERAGED = ("dice", "hd95")


def split_metrics(metrics: dict[str, float], split: str) -> dict[str, float]:
    """``{"val-loss": .., "val-cm_0_0": ..}`` -> ``{"loss": .., "cm_0_0": ..}`` for one split."""
    prefix = f"{split}-"
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def confusion_from(metrics: dict[str, float]) -> np.ndarray | None:
    cells = {tuple(map(int, m.groups())): v for k, v in metrics.items() if (m := _CM.match(k))}
    if not cells:
        return None
    k = max(max(i, j) for i, j in cells) + 1
    cm = np.zeros((k, k))
    for (i, j), v in cells.items():
        cm[i, j] = v
    return cm


def multilabel_confusions_from(metrics: dict[str, float]) -> np.ndarray | None:
    """``[C, 2, 2]`` per-finding binary confusions from ``mlcm_k_i_j`` keys, or None."""
    cells = {tuple(map(int, m.groups())): v for k, v in metrics.items() if (m := _MLCM.match(k))}
    if not cells:
        return None
    cms = np.zeros((max(k for k, _, _ in cells) + 1, 2, 2))
    for (k, i, j), v in cells.items():
        cms[k, i, j] = v
    return cms


def pool(per_site: list[dict[str, float]]) -> dict[str, float]:
    """Pooled metrics of one split over sites; ``per_site`` entries are split-local dicts."""
    per_site = [m for m in per_site if m.get("n", 0) > 0]
    if not per_site:
        return {}
    n = np.array([m["n"] for m in per_site])
    out = {"n": float(n.sum()), "loss": float(np.average([m["loss"] for m in per_site], weights=n))}
    cms = [confusion_from(m) for m in per_site]
    if all(cm is not None for cm in cms):
        cm = np.sum(cms, axis=0)
        out |= {"accuracy": float(np.trace(cm) / cm.sum()), "mcc": mcc(cm), "f1": macro_f1(cm),
                "balanced_accuracy": balanced_accuracy(cm)}
        out |= {f"f1_class_{i}": f for i, f in enumerate(per_class_f1(cm))}
    mlcms = [multilabel_confusions_from(m) for m in per_site]
    if all(cms is not None for cms in mlcms):
        out |= multilabel_from_confusions(np.sum(mlcms, axis=0))
    # Per-study means (segmentation Dice/HD95, CLIP retrieval recall within each site's
    # set): example-weighted averages over sites - not recomputable from counts.
    for key in sorted({k for m in per_site for k in m if k in AVERAGED or k.startswith("recall_")}):
        out[key] = float(np.average([m.get(key, 0.0) for m in per_site], weights=n))
    weights = n * np.array([m.get("auroc-defined", 0.0) for m in per_site])
    if weights.sum() > 0:
        out["auroc"] = float(np.average([m.get("auroc", 0.0) for m in per_site], weights=weights))
    return out


def report_splits(metrics) -> list[str]:
    """Evaluation splits present in a site's metrics: val and test (or, from an external
    site, external) and, if any, personal-*, test-without-<sequence> and
    external-without-<sequence>."""
    from protocol import wire

    if f"{wire.EXTERNAL_SPLIT}-n" in metrics:
        return [wire.EXTERNAL_SPLIT] + sorted(
            k[:-len("-n")] for k in metrics
            if k.startswith(wire.EXTERNAL_WITHOUT_PREFIX) and k.endswith("-n"))
    splits = list(wire.EVAL_SPLITS)
    splits += [wire.PERSONAL_PREFIX + s for s in wire.EVAL_SPLITS
               if f"{wire.PERSONAL_PREFIX}{s}-n" in metrics]
    splits += sorted(k[:-len("-n")] for k in metrics
                     if k.startswith(wire.WITHOUT_PREFIX) and k.endswith("-n"))
    return splits


def aggregate_evaluate_records(records: list, weighted_by_key: str):
    """Flower ``evaluate_metrics_aggr_fn``: pooled metrics per evaluation split."""
    from flwr.app import MetricRecord   # local import keeps this module usable without Flower

    from protocol import wire

    out = MetricRecord()
    for split in report_splits(records[0].metric_records.get(wire.METRICS, {}) if records else {}):
        per_site = [split_metrics(dict(r.metric_records[wire.METRICS]), split) for r in records
                    if wire.METRICS in r.metric_records]
        for key, value in pool(per_site).items():
            out[f"{split}-{key}"] = value
    return out
