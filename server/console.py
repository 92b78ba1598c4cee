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
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from models.metrics import SplitMetrics
from protocol import wire
from protocol.metrics import from_record, report_splits
from protocol.site_errors import one_line
from strategies.observed import RoundRecord
from strategies.pooling import pool_sites

log = logging.getLogger("medfed.server")

# Below this many studies a split's split-dependent figures say more about the split than
# the model.
TINY_SPLIT = 5

# Correlation-type figures that a single-class or tiny split cannot support.
SPLIT_DEPENDENT = ("mcc", "auroc")

MAX_SITE_LINES = 20           # above this many sites a round is summarized (module docstring)
SITE_TABLE = "sites.tsv"      # in the run folder: every site's line when summarized
SHOWN_FAILURES = 3            # failures named on the console when summarized
SOURCES = ("train", "val", "test", "site", wire.EXTERNAL_SPLIT)   # of a figure: see Column


@dataclass(frozen=True)
class Column:
    """One figure of a line, declared once: the console header and lines, the site table's
    header and rows and the per-round quantiles are all written from :data:`FIGURES`.

    ``source`` says where the value comes from, ``key`` which entry of it:

    - ``"train"``: training metrics (a site's reply; on GLOBAL the round's aggregate);
    - ``"val"``, ``"test"``: a split's shown figures (an evaluation-only site's and the
      EXTERNAL line's figures are in the ``test`` columns);
    - ``"site"``: the site's own replies (training and evaluation), e.g. its compute seconds;
      a pooled line has none: its time is the round's wall time, after the line;
    - ``"external"``: the pooled external split (the run summary's columns only).
    """

    name: str
    source: str
    key: str
    width: int = 8          # console width
    decimals: int = 3       # console decimals (the site table has 4 for every figure)

    def __post_init__(self):
        if self.source not in SOURCES:     # a misspelt source would show "-" for ever
            raise ValueError(f"column {self.name!r}: source {self.source!r} is not one of "
                             f"{', '.join(SOURCES)}")

    def value(self, sources: dict[str, dict]):
        """The figure in ``sources`` (source -> figures); None where not reported."""
        return sources.get(self.source, {}).get(self.key)

    def shown(self, sources: dict[str, dict]) -> str:
        """The console cell: the figure right-aligned in ``width``, or ``n/a`` / ``-``."""
        value = self.value(sources)
        if isinstance(value, float):
            return f"{value:{self.width}.{self.decimals}f}"
        return f"{_blank(value):>{self.width}}"

    def cell(self, sources: dict[str, dict]) -> str:
        """The site table's cell."""
        value = self.value(sources)
        return f"{value:.4f}" if isinstance(value, float) else _blank(value)


FIGURES = (
    Column("train_loss", "train", "train_loss", width=10),
    Column("val_loss", "val", "loss"),
    Column("val_mcc", "val", "mcc"),
    Column("test_acc", "test", "accuracy"),
    Column("test_mcc", "test", "mcc"),
    Column("test_auc", "test", "auroc"),
    Column("train_s", "site", wire.TRAIN_SECONDS, width=7, decimals=1),
    Column("eval_s", "site", wire.EVAL_SECONDS, width=7, decimals=1),
)
COLUMNS = ("round", "site", *(c.name for c in FIGURES), "status")   # the site table's header
# The figures of :meth:`ConsoleTable.summary` (GLOBAL, per round), picked from FIGURES by name
# (a misspelt one fails at import); the summary names them ``<split>_<key>`` and adds the
# external split's split-dependent figures.
RUN_SUMMARY = tuple({c.name: c for c in FIGURES}[name]
                    for name in ("val_mcc", "test_mcc", "test_auc", "test_acc"))


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
            log.info("%s", _console_line("round", "site", [f"{c.name:>{c.width}}"
                                                           for c in FIGURES]))
        external, lines = [], []       # lines: (site, source -> figures), see Column
        new_notes = len(self.notes)
        for reply in record.evaluate:
            site = reply.site_id
            if wire.EXTERNAL_SPLIT in report_splits(reply.metrics):   # evaluation-only site:
                external.append(from_record(reply.metrics, wire.EXTERNAL_SPLIT))   # its studies
                lines.append((site, {"site": reply.metrics, "test": self._shown(
                    f"{site} {wire.EXTERNAL_SPLIT}", external[-1])}))
                continue
            trained = train.get(site, {})
            shown = {s: self._shown(f"{site} {s}", from_record(reply.metrics, s))
                     for s in ("val", "test")}
            lines.append((site, {"train": trained, "site": {**trained, **reply.metrics}, **shown}))
        site_notes = list(self.notes)[new_notes:]
        if many:
            self._write_sites(record, lines, [f"{w}: {self.notes[w]}" for w in site_notes])
            self._round_summary(record, lines)
        else:
            for site, sources in lines:
                self._line(record.round, site, sources)
        self._warn(record.round, [f"evaluation reply failed: {one_line(str(f))}" for f in failed]
                   + [f"evaluation from {r.site_id} excluded: {r.reason}"
                      for r in record.evaluate_rejected], many)
        trained = [r for r in record.evaluate
                   if wire.EXTERNAL_SPLIT not in report_splits(r.metrics)]
        new_notes = len(self.notes)
        val, test = (self._shown(f"GLOBAL {s}", pool_sites([from_record(r.metrics, s)
                                                            for r in trained]))
                     for s in ("val", "test"))
        self._line(record.round, "GLOBAL", {"train": record.train_metrics, "val": val,
                                            "test": test},
                   suffix=f"  ({record.wall_seconds:.1f}s)")
        ext = self._shown("EXTERNAL", pool_sites(external))
        if ext:
            self._line(record.round, "EXTERNAL", {"test": ext})
        self.rows.append((record.round, "GLOBAL",
                          {"val": val, "test": test, wire.EXTERNAL_SPLIT: ext}))
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
        failures = {phase: len(record.failures.get(phase, [])) for phase in ("train", "evaluate")}
        where = self.run_dir / SITE_TABLE if self.run_dir else "the MLflow run"
        log.info("round %d: %d sites trained (%d failed, %d updates excluded), %d evaluated "
                 "(%d failed, %d excluded); every site's line: %s", record.round,
                 len(record.train), failures["train"], len(record.rejected),
                 len(record.evaluate), failures["evaluate"], len(record.evaluate_rejected),
                 where)
        log.info("round %d: %-10s %8s %8s %8s %8s %8s %6s", record.round, "over sites", "min",
                 "25%", "median", "75%", "max", "sites")
        for column in FIGURES:
            values = [v for _, sources in lines
                      if isinstance(v := column.value(sources), float)]
            if values:
                log.info("round %d: %-10s %s %6d", record.round, column.name,
                         " ".join(f"{q:8.3f}" for q in quantiles(values)), len(values))

    def _write_sites(self, record: RoundRecord, lines: list, notes: list[str]) -> None:
        """Every site's line of this round (and its failures and notes) in the site table."""
        if self.run_dir is None:
            return
        path = self.run_dir / SITE_TABLE
        rows = [] if path.exists() else ["\t".join(COLUMNS)]
        rows += [_site_row(record.round, site, [c.cell(sources) for c in FIGURES], "ok")
                 for site, sources in lines]
        not_reported = ["-"] * len(FIGURES)          # a failed or excluded site's figures
        for phase in ("train", "evaluate"):
            rows += [_site_row(record.round, failure.site, not_reported,
                               f"{phase} failed: {one_line(str(failure))}")
                     for failure in record.failures.get(phase, [])]
        for phase, rejected in (("update", record.rejected),
                                ("evaluation", record.evaluate_rejected)):
            rows += [_site_row(record.round, r.site_id, not_reported,
                               f"{phase} excluded: {r.reason}") for r in rejected]
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

    def _line(self, rnd: int, site: str, sources: dict[str, dict], suffix: str = "") -> None:
        log.info("%s%s", _console_line(rnd, site, [c.shown(sources) for c in FIGURES]), suffix)

    def summary(self) -> str:
        """The GLOBAL figures per round, then one line per split whose figures were n/a."""
        splits = [(c.source, c.key) for c in RUN_SUMMARY]
        if any(m.get(wire.EXTERNAL_SPLIT) for _, _, m in self.rows):
            splits += [(wire.EXTERNAL_SPLIT, key) for key in SPLIT_DEPENDENT]
        columns = [Column(f"{s}_{k}", s, k, width=len(f"{s}_{k}")) for s, k in splits]
        lines = ["  ".join(["round", *(c.name for c in columns)])]
        lines += ["  ".join([f"{rnd:5d}", *(c.shown(m) for c in columns)])
                  for rnd, _, m in self.rows]
        lines += [f"note: {where}: {why}" for where, why in self.notes.items()]
        return "\n".join(lines)


def quantiles(values: list[float]) -> list[float]:
    """min, 25%, median, 75%, max (inclusive quartiles; one value is all five)."""
    if len(values) == 1:
        return values * 5
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [min(values), q1, q2, q3, max(values)]


def undefined_reason(metrics: SplitMetrics) -> str | None:
    """Why a split's :data:`SPLIT_DEPENDENT` figures are not figures of the model, or None
    when they are."""
    named = "/".join(key.upper() for key in SPLIT_DEPENDENT)          # "MCC/AUROC"
    if metrics.confusion is not None and int((metrics.confusion.sum(axis=1) > 0).sum()) < 2:
        return f"single class in split ({named} undefined)"
    if metrics.n < TINY_SPLIT:
        return f"only {metrics.n} studies in split (< {TINY_SPLIT}; {named} not shown)"
    return None


def _console_line(rnd: int | str, site: str, cells: list[str]) -> str:
    """A console table line (or its header): round, site, then the cells of FIGURES."""
    return f"{rnd:>5} {site:<9} " + " ".join(cells)


def _site_row(rnd: int, site: str, cells: list[str], status: str) -> str:
    """A site table line: round, site, the cells of FIGURES, then the site's status."""
    return "\t".join([str(rnd), site, *cells, status])


def _blank(value) -> str:
    return "n/a" if value is NA else "-"


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

