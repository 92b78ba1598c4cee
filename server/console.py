"""Per-round console table and final summary (through logging, never print)."""

from __future__ import annotations

import logging

from models.metrics import SplitMetrics
from protocol import wire
from protocol.metrics import from_record, report_splits
from strategies.observed import RoundRecord
from strategies.pooling import pool

log = logging.getLogger("medfed.server")


class ConsoleTable:
    """Logs one line per site and one global line per round, and keeps them for a summary."""

    def __init__(self):
        self.rows: list[tuple[int, str, dict]] = []

    def on_train(self, record: RoundRecord) -> None:
        for failure in record.failures.get("train", []):
            log.warning("round %d: training reply failed: %s", record.round, failure)
        for rejection in record.rejected:
            log.warning("round %d: update from %s excluded: %s", record.round,
                        rejection.site_id, rejection.reason)

    def on_round_end(self, record: RoundRecord) -> None:
        train = {r.site_id: r.metrics for r in record.train}
        if not self.rows:
            log.info("%5s %-9s %10s %8s %8s %8s %8s %8s", "round", "site", "train_loss",
                     "val_loss", "val_mcc", "test_acc", "test_mcc", "test_auc")
        external = []
        for reply in record.evaluate:
            if wire.EXTERNAL_SPLIT in report_splits(reply.metrics):   # evaluation-only site:
                external.append(from_record(reply.metrics, wire.EXTERNAL_SPLIT))   # its studies
                self._line(record.round, reply.site_id, None, {}, _measured(external[-1]))
                continue
            val, test = (_measured(from_record(reply.metrics, s)) for s in ("val", "test"))
            self._line(record.round, reply.site_id,
                       train.get(reply.site_id, {}).get("train_loss"), val, test)
        for failure in record.failures.get("evaluate", []):
            log.warning("round %d: evaluation reply failed: %s", record.round, failure)
        trained = [r for r in record.evaluate if wire.EXTERNAL_SPLIT not in report_splits(r.metrics)]
        val = pool([from_record(r.metrics, "val") for r in trained])
        test = pool([from_record(r.metrics, "test") for r in trained])
        self._line(record.round, "GLOBAL", record.train_metrics.get("train_loss"), val, test,
                   suffix=f"  ({record.wall_seconds:.1f}s)")
        ext = pool(external)
        if ext:
            self._line(record.round, "EXTERNAL", None, {}, ext)
        self.rows.append((record.round, "GLOBAL", {"val": val, "test": test, "external": ext}))

    def _line(self, rnd, site, train_loss, val, test, suffix=""):
        def fmt(v):
            return f"{v:8.3f}" if isinstance(v, float) else f"{'-':>8}"
        log.info("%5d %-9s %10s %s %s %s %s %s%s", rnd, site, fmt(train_loss).strip().rjust(10),
                 fmt(val.get("loss")), fmt(val.get("mcc")), fmt(test.get("accuracy")),
                 fmt(test.get("mcc")), fmt(test.get("auroc")), suffix)

    def summary(self) -> str:
        external = any(m.get("external") for _, _, m in self.rows)
        lines = ["round  val_mcc  test_mcc  test_auroc  test_accuracy"
                 + ("  external_mcc  external_auroc" if external else "")]
        for rnd, _, m in self.rows:
            v, t, e = m["val"], m["test"], m.get("external", {})
            lines.append(f"{rnd:5d}  {v.get('mcc', float('nan')):7.3f}  "
                         f"{t.get('mcc', float('nan')):8.3f}  {t.get('auroc', float('nan')):10.3f}  "
                         f"{t.get('accuracy', float('nan')):13.3f}"
                         + (f"  {e.get('mcc', float('nan')):12.3f}  "
                            f"{e.get('auroc', float('nan')):14.3f}" if external else ""))
        return "\n".join(lines)


def _measured(metrics: SplitMetrics) -> dict:
    """A site's figures, or nothing for an empty split (AUROC is absent where undefined)."""
    return metrics.scalars() if metrics.n > 0 else {}
