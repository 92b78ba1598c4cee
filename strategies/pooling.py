"""Pool per-site evaluation results into global metrics.

Sites send confusion-matrix counts (multi-label tasks: one binary matrix per finding), so
the server computes the *pooled* accuracy, MCC and F1 exactly (averaging per-site MCCs is
not MCC). AUROC cannot be pooled from counts; it is averaged over the sites where it is
defined, weighted by examples. Per-study means (Dice, HD95, recall@k) are averaged weighted
by examples; counts are summed. Sites' replies are decoded by ``protocol.metrics``, which
refuses malformed ones.
"""

from __future__ import annotations

import numpy as np
from flwr.app import MetricRecord

from models.metrics import SplitMetrics
from protocol import wire
from protocol.metrics import from_record, report_splits


def _summed(sites: list[SplitMetrics], field: str) -> np.ndarray | None:
    """The sum of every site's ``field`` array, None unless every site has one; sites that
    disagree on its shape (different class or finding counts) cannot be pooled."""
    arrays = [getattr(s, field) for s in sites]
    if any(a is None for a in arrays):
        return None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"sites report {field} of different shapes {sorted(shapes)}: they "
                         "did not evaluate the same task configuration")
    return np.sum(arrays, axis=0)


def pool_sites(per_site: list[SplitMetrics]) -> SplitMetrics | None:
    """One split pooled over sites (sites with ``n = 0`` are left out); None if none is left."""
    sites = [m for m in per_site if m.n > 0]
    if not sites:
        return None
    n = np.array([m.n for m in sites])
    means = {key: float(np.average([m.means.get(key, 0.0) for m in sites], weights=n))
             for key in sorted({k for m in sites for k in m.means})}
    counts = {key: float(sum(m.counts.get(key, 0.0) for m in sites))
              for key in sorted({k for m in sites for k in m.counts})}
    weights = n * np.array([m.auroc is not None for m in sites], dtype=float)
    auroc = (float(np.average([m.auroc or 0.0 for m in sites], weights=weights))
             if weights.sum() > 0 else None)
    return SplitMetrics(n=int(n.sum()), loss=float(np.average([m.loss for m in sites], weights=n)),
                        confusion=_summed(sites, "confusion"),
                        finding_confusions=_summed(sites, "finding_confusions"),
                        auroc=auroc, means=means, counts=counts,
                        seconds=sum(m.seconds for m in sites))


def pool(per_site: list[SplitMetrics]) -> dict[str, float]:
    """Pooled figures of one split (``SplitMetrics.scalars``), ``{}`` if no site measured it."""
    pooled = pool_sites(per_site)
    return pooled.scalars() if pooled is not None else {}


def aggregate_evaluate_records(records: list, weighted_by_key: str):
    """Flower ``evaluate_metrics_aggr_fn``: pooled metrics per evaluation split."""
    out = MetricRecord()
    for split in report_splits(records[0].metric_records.get(wire.METRICS, {}) if records else {}):
        per_site = [from_record(r.metric_records[wire.METRICS], split) for r in records
                    if wire.METRICS in r.metric_records]
        for key, value in pool(per_site).items():
            out[f"{split}-{key}"] = value
    return out
