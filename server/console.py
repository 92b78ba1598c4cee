"""Per-round console table and final summary (through logging, never print), the same whether
the run is simulated (``medfed simulate``) or deployed (``medfed run``, which shows the
deployed ServerApp's lines: ``server/stream_log.py``).

The table has one line per site (by site id, with its train and evaluation seconds), a GLOBAL
line (pooled figures and the round's wall time) and, with evaluation-only sites, an EXTERNAL
line. A site's failure is one warning line naming the site and its one-line reason. The run
ends with the summary and where the results are (:func:`results_hint`).

With more than :data:`MAX_SITE_LINES` sites a round would be a screenful: the console shows
instead how many sites trained, evaluated and failed, each figure's quantiles over the sites
(min / 25% / median / 75% / max), the first few failures, and the GLOBAL line; every site's
line, failure and note goes to :data:`SITE_TABLE` in the run folder.

A figure that is undefined for a split is shown as ``n/a``, never as a number that reads like
a result (MCC of a single-class split is 0 by convention, not a measurement); a figure not
reported at all is ``-``. Why a figure is ``n/a`` is said once per site and split, in one line
after the round's table and again under the summary.
"""

from __future__ import annotations

import logging
import re
import statistics
import sys
from pathlib import Path

from models.metrics import SplitMetrics
from protocol import wire
from protocol.metrics import from_record, report_splits
from protocol.site_errors import one_line
from strategies.observed import RoundRecord
from strategies.pooling import pool_sites

log = logging.getLogger("medfed.server")

# Below this many studies a split's MCC/AUROC say more about the split than the model.
TINY_SPLIT = 5

# Correlation-type figures that a single-class or tiny split cannot support.
SPLIT_DEPENDENT = ("mcc", "auroc")

MAX_SITE_LINES = 20           # above this many sites a round is summarized (module docstring)
SITE_TABLE = "sites.tsv"      # in the run folder: every site's line when summarized
SHOWN_FAILURES = 3            # failures named on the console when summarized
COLUMNS = ("round", "site", "train_loss", "val_loss", "val_mcc", "test_acc", "test_mcc",
           "test_auc", "train_s", "eval_s", "status")

class _NotAvailable:
    """A figure the split cannot support (shown ``n/a``; ``-`` is a figure not reported)."""

    def __repr__(self) -> str:
        return "n/a"


NA = _NotAvailable()


class ConsoleTable:
    """Logs one line per site and one global line per round, and keeps them for a summary;
    above :data:`MAX_SITE_LINES` sites a per-round summary, the site lines in ``run_dir``."""

    def __init__(self, run_dir: Path | None = None, max_site_lines: int = MAX_SITE_LINES):
        self.rows: list[tuple[int, str, dict]] = []
        self.notes: dict[str, str] = {}     # "site-2 val" -> why its figures are n/a
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.max_site_lines = max_site_lines

    def _summarized(self, n_sites: int) -> bool:
        return n_sites > self.max_site_lines

    def on_train(self, record: RoundRecord) -> None:
        warnings = [f"training reply failed: {one_line(str(f))}"
                    for f in record.failures.get("train", [])]
        warnings += [f"update from {r.site_id} excluded: {r.reason}" for r in record.rejected]
        many = self._summarized(len(record.train) + len(record.failures.get("train", [])))
        self._warn(record.round, warnings, many)

    def _warn(self, rnd: int, warnings: list[str], many: bool) -> None:
        shown = warnings[:SHOWN_FAILURES] if many else warnings
        for warning in shown:
            log.warning("round %d: %s", rnd, warning)
        if len(warnings) > len(shown):
            where = self.run_dir / SITE_TABLE if self.run_dir else "the MLflow run"
            log.warning("round %d: ... and %d more (all in %s)", rnd,
                        len(warnings) - len(shown), where)

    def on_round_end(self, record: RoundRecord) -> None:
        train = {r.site_id: r.metrics for r in record.train}
        failed = record.failures.get("evaluate", [])
        many = self._summarized(len(record.evaluate) + len(failed))
        if not self.rows:
            log.info("%5s %-9s %10s %8s %8s %8s %8s %8s %7s %7s", "round", "site", "train_loss",
                     "val_loss", "val_mcc", "test_acc", "test_mcc", "test_auc", "train_s",
                     "eval_s")
        external, lines = [], []
        new_notes = len(self.notes)
        for reply in record.evaluate:
            site = reply.site_id
            if wire.EXTERNAL_SPLIT in report_splits(reply.metrics):   # evaluation-only site:
                external.append(from_record(reply.metrics, wire.EXTERNAL_SPLIT))   # its studies
                lines.append((site, None, {},
                              self._shown(f"{site} {wire.EXTERNAL_SPLIT}", external[-1]),
                              (None, reply.metrics.get(wire.EVAL_SECONDS))))
                continue
            val, test = (self._shown(f"{site} {s}", from_record(reply.metrics, s))
                         for s in ("val", "test"))
            trained = train.get(site, {})
            lines.append((site, trained.get("train_loss"), val, test,
                          (trained.get(wire.TRAIN_SECONDS), reply.metrics.get(wire.EVAL_SECONDS))))
        site_notes = list(self.notes)[new_notes:]
        if many:
            self._write_sites(record, lines, [f"{w}: {self.notes[w]}" for w in site_notes])
            self._round_summary(record, lines)
        else:
            for site, train_loss, val, test, seconds in lines:
                self._line(record.round, site, train_loss, val, test, seconds=seconds)
        self._warn(record.round, [f"evaluation reply failed: {one_line(str(f))}" for f in failed]
                   + [f"evaluation from {r.site_id} excluded: {r.reason}"
                      for r in record.evaluate_rejected], many)
        trained = [r for r in record.evaluate if wire.EXTERNAL_SPLIT not in report_splits(r.metrics)]
        new_notes = len(self.notes)
        val = self._shown("GLOBAL val", pool_sites([from_record(r.metrics, "val") for r in trained]))
        test = self._shown("GLOBAL test",
                           pool_sites([from_record(r.metrics, "test") for r in trained]))
        self._line(record.round, "GLOBAL", record.train_metrics.get("train_loss"), val, test,
                   suffix=f"  ({record.wall_seconds:.1f}s)")
        ext = self._shown("EXTERNAL", pool_sites(external))
        if ext:
            self._line(record.round, "EXTERNAL", None, {}, ext)
        self.rows.append((record.round, "GLOBAL", {"val": val, "test": test, "external": ext}))
        global_notes = list(self.notes)[new_notes:]        # before any site note is dropped
        if many:       # the sites' notes are in the site table; the GLOBAL ones here
            for where in site_notes:
                del self.notes[where]
            if site_notes:
                log.info("note: %d site splits show n/a (why: %s)", len(site_notes),
                         self.run_dir / SITE_TABLE if self.run_dir else "-")
            site_notes = []
        for where in site_notes + global_notes:
            log.info("note: %s: %s", where, self.notes[where])

    def _round_summary(self, record: RoundRecord, lines: list) -> None:
        """A round of many sites in a few lines: counts, then quantiles of each figure."""
        def figures(pick):
            return [v for v in map(pick, lines) if isinstance(v, float)]

        failures = {phase: len(record.failures.get(phase, [])) for phase in ("train", "evaluate")}
        where = self.run_dir / SITE_TABLE if self.run_dir else "the MLflow run"
        log.info("round %d: %d sites trained (%d failed, %d updates excluded), %d evaluated "
                 "(%d failed, %d excluded); every site's line: %s", record.round,
                 len(record.train), failures["train"], len(record.rejected),
                 len(record.evaluate), failures["evaluate"], len(record.evaluate_rejected),
                 where)
        columns = {"train_loss": lambda x: x[1], "val_loss": lambda x: x[2].get("loss"),
                   "val_mcc": lambda x: x[2].get("mcc"), "test_acc": lambda x: x[3].get("accuracy"),
                   "test_mcc": lambda x: x[3].get("mcc"), "test_auc": lambda x: x[3].get("auroc"),
                   "train_s": lambda x: x[4][0], "eval_s": lambda x: x[4][1]}
        log.info("round %d: %-10s %8s %8s %8s %8s %8s %6s", record.round, "over sites", "min",
                 "25%", "median", "75%", "max", "sites")
        for name, pick in columns.items():
            values = figures(pick)
            if values:
                log.info("round %d: %-10s %s %6d", record.round, name,
                         " ".join(f"{q:8.3f}" for q in quantiles(values)), len(values))

    def _write_sites(self, record: RoundRecord, lines: list, notes: list[str]) -> None:
        """Every site's line of this round (and its failures and notes) in the site table."""
        if self.run_dir is None:
            return
        def cell(v):
            return f"{v:.4f}" if isinstance(v, float) else _blank(v)

        path = self.run_dir / SITE_TABLE
        rows = [] if path.exists() else ["\t".join(COLUMNS)]
        for site, train_loss, val, test, seconds in lines:
            rows.append("\t".join([str(record.round), site, cell(train_loss),
                                   cell(val.get("loss")), cell(val.get("mcc")),
                                   cell(test.get("accuracy")), cell(test.get("mcc")),
                                   cell(test.get("auroc")), cell(seconds[0]), cell(seconds[1]),
                                   "ok"]))
        for phase in ("train", "evaluate"):
            for failure in record.failures.get(phase, []):
                rows.append("\t".join([str(record.round), failure.site, *["-"] * 8,
                                       f"{phase} failed: {one_line(str(failure))}"]))
        for phase, rejected in (("update", record.rejected),
                                ("evaluation", record.evaluate_rejected)):
            rows += ["\t".join([str(record.round), r.site_id, *["-"] * 8,
                                f"{phase} excluded: {r.reason}"]) for r in rejected]
        rows += [f"# round {record.round} note: {note}" for note in notes]
        with path.open("a") as out:
            out.write("\n".join(rows) + "\n")

    def _shown(self, where: str, metrics: SplitMetrics | None) -> dict:
        """A split's figures for display: ``{}`` if not measured, split-dependent figures set
        to :data:`NA` (with a note, once) where the split cannot support them."""
        if metrics is None or metrics.n == 0:
            return {}
        figures = metrics.scalars()
        reason = undefined_reason(metrics)
        if reason:
            self.notes.setdefault(where, reason)
            figures |= {key: NA for key in SPLIT_DEPENDENT}
        return figures

    def _line(self, rnd, site, train_loss, val, test, suffix="", seconds=(None, None)):
        def fmt(v):
            return f"{v:8.3f}" if isinstance(v, float) else f"{_blank(v):>8}"

        def secs(v):
            return f"{v:7.1f}" if isinstance(v, float) else f"{'-':>7}"
        log.info("%5d %-9s %10s %s %s %s %s %s %s %s%s", rnd, site,
                 fmt(train_loss).strip().rjust(10), fmt(val.get("loss")), fmt(val.get("mcc")),
                 fmt(test.get("accuracy")), fmt(test.get("mcc")), fmt(test.get("auroc")),
                 secs(seconds[0]), secs(seconds[1]), suffix)

    def summary(self) -> str:
        """The GLOBAL figures per round, then one line per split whose figures were n/a."""
        external = any(m.get("external") for _, _, m in self.rows)
        lines = ["round  val_mcc  test_mcc  test_auroc  test_accuracy"
                 + ("  external_mcc  external_auroc" if external else "")]
        for rnd, _, m in self.rows:
            v, t, e = m["val"], m["test"], m.get("external", {})
            lines.append(f"{rnd:5d}  {_cell(v, 'mcc', 7)}  {_cell(t, 'mcc', 8)}  "
                         f"{_cell(t, 'auroc', 10)}  {_cell(t, 'accuracy', 13)}"
                         + (f"  {_cell(e, 'mcc', 12)}  {_cell(e, 'auroc', 14)}"
                            if external else ""))
        lines += [f"note: {where}: {why}" for where, why in self.notes.items()]
        return "\n".join(lines)


def quantiles(values: list[float]) -> list[float]:
    """min, 25%, median, 75%, max (inclusive quartiles; one value is all five)."""
    if len(values) == 1:
        return values * 5
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [min(values), q1, q2, q3, max(values)]


def undefined_reason(metrics: SplitMetrics) -> str | None:
    """Why a split's MCC/AUROC are not figures of the model, or None when they are."""
    if metrics.confusion is not None and int((metrics.confusion.sum(axis=1) > 0).sum()) < 2:
        return "single class in split (MCC/AUROC undefined)"
    if metrics.n < TINY_SPLIT:
        return f"only {metrics.n} studies in split (< {TINY_SPLIT}; MCC/AUROC not shown)"
    return None


def _blank(value) -> str:
    return "n/a" if value is NA else "-"


def _cell(figures: dict, key: str, width: int) -> str:
    value = figures.get(key)
    return f"{value:{width}.3f}" if isinstance(value, float) else f"{_blank(value):>{width}}"


def results_hint(uri: str) -> str:
    """Where a run's results are and the command that opens them (one line, no credentials)."""
    from .tracking_store import without_credentials

    if uri.startswith(("http://", "https://")):
        return f"results: MLflow tracking server {without_credentials(uri)} (open it in a browser)"
    return (f"results: MLflow store {without_credentials(uri)}; open it with:  "
            f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {_mlflow_command()} ui "
            f"--backend-store-uri {without_credentials(uri)} --port 5000")


def _mlflow_command() -> str:
    """This install's ``mlflow`` script: relative to the working directory when inside it."""
    script = Path(sys.executable).parent / "mlflow"
    if not script.exists():
        return "mlflow"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)

