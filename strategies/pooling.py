"""Pool per-site evaluation results into global metrics.

Sites send confusion-matrix counts (multi-label tasks: one binary matrix per finding), so
the server computes the *pooled* accuracy, MCC and F1 exactly (averaging per-site MCCs is
not MCC). AUROC cannot be pooled from counts; it is averaged over the sites where it is
defined, weighted by examples. The loss and per-study means (Dice, HD95, recall@k) are
averaged weighted by the studies each averages over (``SplitMetrics.studies``: segmentation's
by the site's masks where each is defined, CLIP's by its studies with a report, not its study
count); counts are summed. Sites'
replies are decoded by ``protocol.metrics``, which refuses malformed ones.

One site's refused reply must not cost every site its evaluation: ``evaluation_verdicts``
says which replies cannot be pooled (the codec refuses one of its splits, or its confusion
shapes are not those of the majority of the round's decodable replies - the honest sites
all evaluate the same task configuration); the guard leaves those out and counts them, and
``aggregate_evaluate_records`` itself pools only the rest (logged), so that a strategy
without the guard cannot fail the round either. With no majority (two sites that disagree)
every disagreeing reply is left out: a loss of pooled figures, never a failed round.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from models.metrics import SplitMetrics
from protocol import wire
from protocol.metrics import from_record, report_splits

log = logging.getLogger(__name__)


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


def _averaged(sites: list[SplitMetrics], figure: str, values: list[float]) -> float:
    """The sites' ``figure`` averaged over all their studies: each weighted by the studies
    it averages over (``SplitMetrics.studies``); 0.0, as a site sends, where none has any."""
    weights = np.array([m.studies(figure) for m in sites])
    return float(np.average(values, weights=weights)) if weights.sum() > 0 else 0.0


def pool_sites(per_site: list[SplitMetrics]) -> SplitMetrics | None:
    """One split pooled over sites (sites with ``n = 0`` are left out); None if none is left."""
    sites = [m for m in per_site if m.n > 0]
    if not sites:
        return None
    n = np.array([m.n for m in sites])
    means = {key: _averaged(sites, key, [m.means.get(key, 0.0) for m in sites])
             for key in sorted({k for m in sites for k in m.means})}
    counts = {key: float(sum(m.counts.get(key, 0.0) for m in sites))
              for key in sorted({k for m in sites for k in m.counts})}
    weights = n * np.array([m.auroc is not None for m in sites], dtype=float)
    auroc = (float(np.average([m.auroc or 0.0 for m in sites], weights=weights))
             if weights.sum() > 0 else None)
    return SplitMetrics(n=int(n.sum()), loss=_averaged(sites, "loss", [m.loss for m in sites]),
                        confusion=_summed(sites, "confusion"),
                        finding_confusions=_summed(sites, "finding_confusions"),
                        auroc=auroc, means=means, counts=counts,
                        seconds=sum(m.seconds for m in sites))


def pool(per_site: list[SplitMetrics]) -> dict[str, float]:
    """Pooled figures of one split (``SplitMetrics.scalars``), ``{}`` if no site measured it."""
    pooled = pool_sites(per_site)
    return pooled.scalars() if pooled is not None else {}


def decode_splits(metrics: Mapping) -> dict[str, SplitMetrics]:
    """Every split a reply reports, decoded (``protocol.metrics.from_record``; its
    ValueError names the split and what is wrong)."""
    return {split: from_record(metrics, split) for split in report_splits(metrics)}


def _shapes(splits: Mapping[str, SplitMetrics]) -> tuple:
    """What must agree between sites for their counts to be summed."""
    return tuple((name, *(None if a is None else a.shape for a in
                          (m.confusion, m.finding_confusions))) for name, m in splits.items())


def evaluation_verdicts(replies: Sequence[Mapping]) -> list[str | None]:
    """For each reply's evaluation metrics, why it cannot be pooled with the others, or None
    (module docstring: refused by the codec, or confusion shapes not the majority's)."""
    return [reason for _, reason in _judged(replies)]


def _judged(replies: Sequence[Mapping]
            ) -> list[tuple[dict[str, SplitMetrics] | None, str | None]]:
    """Each reply decoded, with why it cannot be pooled (then its splits are None)."""
    decoded: list[dict[str, SplitMetrics] | None] = []
    reasons: list[str | None] = []
    for metrics in replies:
        try:
            decoded.append(decode_splits(metrics))
            reasons.append(None)
        except ValueError as error:
            decoded.append(None)
            reasons.append(str(error)[:300])
    shapes = Counter(_shapes(d) for d in decoded if d is not None)
    majority = [s for s, n in shapes.items() if 2 * n > sum(shapes.values())]
    for i, splits in enumerate(decoded):
        if splits is not None and [_shapes(splits)] != majority:
            reasons[i] = ("its splits or confusion shapes differ from those of the other sites "
                          "(a different task configuration)" if majority else
                          "no majority of sites agrees on the splits and confusion shapes")
    return [(None if r else d, r) for d, r in zip(decoded, reasons)]


def _site(record: RecordDict) -> str:
    """The reply's site id for a log line, if it is a plain name (``wire.SITE_ID_RE``):
    a refused reply's claimed id is the sender's text, not a name to print."""
    claimed = record.config_records.get(wire.SITE, ConfigRecord()).get(wire.SITE_ID)
    return claimed if isinstance(claimed, str) and re.fullmatch(wire.SITE_ID_RE, claimed) \
        else "a site with no plain site id"


def aggregate_evaluate_records(records: list, weighted_by_key: str):
    """Flower ``evaluate_metrics_aggr_fn``: pooled metrics per evaluation split, of the
    replies ``evaluation_verdicts`` accepts (a refused one is logged and left out)."""
    records = [r for r in records if wire.METRICS in r.metric_records]
    kept = []
    for record, (splits, reason) in zip(records, _judged(
            [r.metric_records[wire.METRICS] for r in records])):
        if splits is not None:
            kept.append(splits)
        else:
            log.warning("evaluation of %s left out of the pooled metrics: %s", _site(record),
                        reason)
    out = MetricRecord()
    for split in kept[0] if kept else ():
        for key, value in pool([splits[split] for splits in kept]).items():
            out[f"{split}-{key}"] = value
    return out
