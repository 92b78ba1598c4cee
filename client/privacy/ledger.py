"""The site-owned privacy ledger: every DP training round a site ran, on the site's own disk.

A fresh ``PrivacyEngine`` per round or per process restart silently resets epsilon to zero.
The ledger prevents that: each round appends one row (the accountant's inputs plus the
site's cumulative epsilon after the round) to a sqlite file that outlives the process, and
``history()`` returns the rows in Opacus' accountant ``history`` format so the caller can
rebuild its accountant from disk. A privacy officer reads the same file with ``to_json`` or
``format_table``.

What protects the rows, and what does not:

- SQL triggers make both tables append-only: UPDATE and DELETE abort, and an INSERT must
  extend the chain at ``seq = last + 1`` (which also blocks ``INSERT OR REPLACE``). They stop
  honest mistakes and buggy code, not someone who can drop the triggers.
- Each row stores ``hash = sha256(prev_hash + canonical JSON of its fields)``; the first
  row's ``prev_hash`` is 64 zeros. Opening the ledger verifies the whole chain and raises
  ``LedgerCorrupt`` naming the first bad ``seq``, so an in-place edit of any row is caught.
- The chain has no secret, so it is tamper-*evident* only up to its tail: deleting the last
  rows leaves a valid shorter chain, and whoever can write the file can also recompute every
  hash after an edit. Both are detectable only if the site also keeps the latest ``hash``
  somewhere else (e.g. the privacy officer's signed report) and compares it with ``last()``.
- Plans (the noise multiplier calibrated once per run) are append-only but not chained: the
  ledger rows record the noise actually used, so a tampered plan cannot understate epsilon.

Each row says whom its guarantee trusts (``trust``): ``site`` (the site added the noise itself:
DP-SGD), ``sites>=m`` (distributed site-level DP: the sum carries the noise shares of at least
``m`` honest contributors, this site's among them; no server is trusted),
``sites>=m,server-counted`` (the same, but the secure aggregation was the semi-honest protocol:
that ``m`` contributors are in the sum, and that no single update is unmasked, is the server's
word) or ``server`` (the server was trusted to add the noise). Rows written before the column existed read back with
an empty ``trust`` and are hashed without it, so old ledgers still verify.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import operator
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import asdict, astuple, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
TRUST_SITE, TRUST_SERVER = "site", "server"
LEGACY_TRUST = ""              # rows from before the trust column (hashed without it)
SERVER_COUNTED = "server-counted"
_TRUST_SITES = re.compile(r"sites>=[1-9][0-9]*(,server-counted)?")


def trust_sites(min_contributors: int, *, server_counted: bool = False) -> str:
    """The trust of a distributed-DP row: the noise of at least this many honest sites (and,
    ``server_counted``, the server's word that they are in the sum)."""
    return f"sites>={int(min_contributors)}" + (f",{SERVER_COUNTED}" if server_counted else "")
_TIMEOUT_S = 30.0   # several processes of one site may wait on each other's BEGIN IMMEDIATE

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS ledger (
        seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL, server_round INTEGER NOT NULL,
        mechanism TEXT NOT NULL, sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL,
        steps INTEGER NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL,
        epsilon REAL NOT NULL, max_grad_norm REAL NOT NULL, trust TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS plans (
        run_id TEXT NOT NULL, mechanism TEXT NOT NULL, noise_multiplier REAL NOT NULL,
        sample_rate REAL NOT NULL, planned_steps INTEGER NOT NULL, target_epsilon REAL NOT NULL,
        delta REAL NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (run_id, mechanism))""",
    f"""CREATE TRIGGER IF NOT EXISTS ledger_append_at_tail BEFORE INSERT ON ledger
        WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM ledger)
          OR NEW.prev_hash IS NOT COALESCE(
               (SELECT hash FROM ledger ORDER BY seq DESC LIMIT 1), '{GENESIS_HASH}')
        BEGIN SELECT RAISE(ABORT, 'privacy ledger rows must extend the chain tail'); END""",
    """CREATE TRIGGER IF NOT EXISTS plans_first_wins BEFORE INSERT ON plans
        WHEN EXISTS (SELECT 1 FROM plans WHERE run_id = NEW.run_id AND mechanism = NEW.mechanism)
        BEGIN SELECT RAISE(ABORT, 'privacy plan already set for this run and mechanism'); END""",
) + tuple(
    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {op} refused'); END"
    for table in ("ledger", "plans") for op in ("UPDATE", "DELETE")
)


class LedgerCorrupt(ValueError):
    """The ledger file's hash chain does not verify; the message names the first bad seq."""


@dataclass(frozen=True)
class LedgerEntry:
    """One DP training round of this site; ``epsilon`` is cumulative over the whole ledger."""

    seq: int
    run_id: str
    server_round: int
    mechanism: str          # "dp-sgd" (sample-level) or "site-dp" (site-level update noise)
    sample_rate: float      # q, Poisson sampling rate of one step
    noise_multiplier: float
    steps: int              # accountant steps taken in this round, not cumulative
    delta: float
    accountant: str         # e.g. "rdp"; the accountant that produced ``epsilon``
    epsilon: float
    max_grad_norm: float
    trust: str              # who added the noise: site | sites>=m[,server-counted] | server
                            # ('' before the column)
    created_at: str         # ISO-8601 UTC
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Plan:
    """The noise multiplier calibrated once for (run_id, mechanism); restarts reuse it."""

    run_id: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    target_epsilon: float
    delta: float
    created_at: str


_ENTRY_COLUMNS = ", ".join(f.name for f in fields(LedgerEntry))   # columns == fields, in order
_PLAN_COLUMNS = ", ".join(f.name for f in fields(Plan))
_INSERT_ENTRY = (f"INSERT INTO ledger ({_ENTRY_COLUMNS}) "
                 f"VALUES ({', '.join('?' * len(fields(LedgerEntry)))})")
_INSERT_PLAN = f"INSERT INTO plans ({_PLAN_COLUMNS}) VALUES ({', '.join('?' * len(fields(Plan)))})"



def own_folder(folder: Path) -> None:
    """The site's state folder, its own user's alone: made 0700, and an existing one that
    others may read or enter (made before this rule, or by hand) tightened to 0700 with a
    warning - it holds the ledger, the pseudonym key, the query log and the sent replies."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _tighten(folder, 0o700)


def write_own_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically by a file of the site's own user alone (0600) holding
    ``data``: a crash mid-write never leaves half a file, and the temporary file is created
    O_EXCL|O_NOFOLLOW, never through a planted link (a crash's leftover is made afresh)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def own_file(path: Path) -> None:
    """An existing state file that others may read, tightened to 0600 with a warning."""
    _tighten(Path(path), 0o600)


def _tighten(path: Path, mode: int) -> None:
    current = path.stat().st_mode & 0o777
    if current & 0o077:
        os.chmod(path, mode)
        log.warning("%s was readable by others (mode %o): now %o", path, current, mode)

class PrivacyLedger:
    """Append-only, hash-chained record of a site's DP rounds in one sqlite file.

    Parameters
    ----------
    path : Path
        The sqlite file; parent directories and the schema are created if missing.

    Raises
    ------
    LedgerCorrupt
        If the existing file's hash chain does not verify.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        own_folder(self.path.parent)
        if not self.path.exists():      # made 0600 before SQLite opens it (its journals follow)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        else:
            own_file(self.path)         # one made before it was (0644): tightened, said
        with self._transaction() as con:
            for statement in _SCHEMA:
                con.execute(statement)
            columns = {row[1] for row in con.execute("PRAGMA table_info(ledger)")}
            if "trust" not in columns:          # a ledger from before the trust column
                con.execute("ALTER TABLE ledger ADD COLUMN trust TEXT NOT NULL DEFAULT ''")
        self.verify()

    def append(self, *, run_id: str, server_round: int, mechanism: str, sample_rate: float,
               noise_multiplier: float, steps: int, delta: float, accountant: str,
               epsilon: float, max_grad_norm: float, trust: str = TRUST_SITE) -> LedgerEntry:
        """Record one round; ``seq``, ``created_at`` and the hashes are assigned here.

        Raises
        ------
        ValueError
            If a string is empty, ``sample_rate`` is outside (0, 1], ``noise_multiplier`` or
            ``max_grad_norm`` is not finite and > 0, ``steps`` or ``server_round`` < 1,
            ``delta`` is outside (0, 1), or ``epsilon`` is not finite and >= 0.
        """
        _typed(LedgerEntry, {"epsilon": epsilon})
        return self.charge(lambda entries: epsilon, run_id=run_id, server_round=server_round,
                           mechanism=mechanism, sample_rate=sample_rate,
                           noise_multiplier=noise_multiplier, steps=steps, delta=delta,
                           accountant=accountant, max_grad_norm=max_grad_norm, trust=trust)

    def charge(self, admit: Callable[[list[LedgerEntry]], float], *, run_id: str,
               server_round: int, mechanism: str, sample_rate: float, noise_multiplier: float,
               steps: int, delta: float, accountant: str, max_grad_norm: float,
               trust: str = TRUST_SITE) -> LedgerEntry:
        """Check and record one round in one write transaction (check-then-charge cannot race).

        Two runs of one site authorising concurrently would otherwise both read the same
        history, both pass the budget check and both be charged: an overspend. Here the
        write lock (BEGIN IMMEDIATE) is taken first, ``admit`` sees every row as of that
        moment, and the row is inserted before the lock is released.

        Parameters
        ----------
        admit : callable
            ``entries -> epsilon``: given all rows (seq order), the site's cumulative epsilon
            after this round; raises to refuse the round, and then nothing is written.

        Raises
        ------
        ValueError
            As ``append``, for a value out of range (checked before ``admit`` runs).
        """
        content = _typed(LedgerEntry, dict(
            run_id=run_id, server_round=server_round, mechanism=mechanism,
            sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps, delta=delta,
            accountant=accountant, max_grad_norm=max_grad_norm, trust=trust))
        with self._transaction() as con:
            rows = con.execute(f"SELECT {_ENTRY_COLUMNS} FROM ledger ORDER BY seq").fetchall()
            entries = [_from_row(LedgerEntry, row) for row in rows]
            content |= _typed(LedgerEntry, {"epsilon": admit(entries)})
            seq, prev_hash = (entries[-1].seq + 1, entries[-1].hash) if entries else \
                (1, GENESIS_HASH)
            body = dict(seq=seq, **content, created_at=_utc_now())
            entry = LedgerEntry(**body, prev_hash=prev_hash, hash=_chain_hash(prev_hash, body))
            con.execute(_INSERT_ENTRY, astuple(entry))
        return entry

    def entries(self) -> list[LedgerEntry]:
        """All rows in seq order."""
        with self._connect() as con:
            rows = con.execute(f"SELECT {_ENTRY_COLUMNS} FROM ledger ORDER BY seq").fetchall()
        return [_from_row(LedgerEntry, row) for row in rows]

    def history(self) -> list[tuple[float, float, int]]:
        """``[(noise_multiplier, sample_rate, steps)]`` in seq order: Opacus' accountant history."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries()]

    def last(self) -> LedgerEntry | None:
        """The newest row; its ``hash`` is the anchor to keep elsewhere against truncation."""
        with self._connect() as con:
            row = con.execute(f"SELECT {_ENTRY_COLUMNS} FROM ledger "
                              "ORDER BY seq DESC LIMIT 1").fetchone()
        return _from_row(LedgerEntry, row) if row else None

    def verify(self) -> None:
        """Recompute the whole chain; raise ``LedgerCorrupt`` at the first row that disagrees."""
        prev_hash = GENESIS_HASH
        for expected_seq, entry in enumerate(self.entries(), start=1):
            body = {k: v for k, v in asdict(entry).items() if k not in ("prev_hash", "hash")}
            if body["trust"] == LEGACY_TRUST:
                del body["trust"]
            if entry.seq != expected_seq:
                problem = f"expected seq={expected_seq} (a row is missing or renumbered)"
            elif entry.prev_hash != prev_hash:
                problem = "prev_hash does not match the previous row's hash"
            elif entry.hash != _chain_hash(prev_hash, body):
                problem = "stored hash does not match the row's content"
            else:
                prev_hash = entry.hash
                continue
            raise LedgerCorrupt(f"privacy ledger {self.path.name} fails verification at "
                                f"seq={entry.seq}: {problem}")

    def set_plan(self, run_id: str, mechanism: str, *, noise_multiplier: float,
                 sample_rate: float, planned_steps: int, target_epsilon: float,
                 delta: float) -> Plan:
        """Store the calibrated plan for (run_id, mechanism), or return the one already stored.

        The first calibration wins and is never overwritten, so a restarted process cannot
        re-calibrate to a different noise multiplier mid-run. The numbers are keyword-only
        because a swapped ``sample_rate`` and ``noise_multiplier`` would both pass validation.

        Raises
        ------
        ValueError
            If a value is out of range (same ranges as ``append``; ``target_epsilon`` > 0).
        """
        plan = Plan(**_typed(Plan, dict(
            run_id=run_id, mechanism=mechanism, noise_multiplier=noise_multiplier,
            sample_rate=sample_rate, planned_steps=planned_steps, target_epsilon=target_epsilon,
            delta=delta)), created_at=_utc_now())
        with self._transaction() as con:
            existing = _select_plan(con, plan.run_id, plan.mechanism)
            if existing is not None:
                if existing.noise_multiplier != plan.noise_multiplier:
                    log.info("privacy plan for run %s / %s already set (sigma=%.4g); keeping it "
                             "instead of sigma=%.4g", plan.run_id, plan.mechanism,
                             existing.noise_multiplier, plan.noise_multiplier)
                return existing
            con.execute(_INSERT_PLAN, astuple(plan))
        return plan

    def get_plan(self, run_id: str, mechanism: str) -> Plan | None:
        """The stored plan for (run_id, mechanism), or None if none was set."""
        with self._connect() as con:
            return _select_plan(con, run_id, mechanism)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A short-lived autocommit connection; one per operation keeps handles from leaking."""
        con = sqlite3.connect(self.path, timeout=_TIMEOUT_S, isolation_level=None)
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE takes the write lock up front, so read-then-insert cannot race."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")


def to_json(entries: list[LedgerEntry]) -> list[dict]:
    """Rows as plain dicts for a privacy officer's report (short keys: ``round``, ``q``)."""
    return [dict(seq=e.seq, run_id=e.run_id, round=e.server_round, mechanism=e.mechanism,
                 q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps,
                 delta=e.delta, accountant=e.accountant, epsilon=e.epsilon,
                 max_grad_norm=e.max_grad_norm, trust=e.trust or "unrecorded",
                 created_at=e.created_at, hash=e.hash)
            for e in entries]


def format_table(entries: list[LedgerEntry]) -> str:
    """A fixed-width terminal table of the rounds and the cumulative epsilon after each."""
    if not entries:
        return "no rounds recorded"
    header = ("run", "round", "mechanism", "trust", "q", "sigma", "steps", "delta",
              "cumulative epsilon")
    rows = [(e.run_id, str(e.server_round), e.mechanism, e.trust or "-", f"{e.sample_rate:.4g}",
             f"{e.noise_multiplier:.4g}", str(e.steps), f"{e.delta:.1e}", f"{e.epsilon:.4f}")
            for e in entries]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i in (0, 2, 3) else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in (header, *rows))


# Ranges outside which the subsampled-Gaussian accountant is undefined or the row meaningless.
# NaN fails every comparison, so it is refused by each of these.
_RANGES = {
    "server_round": (lambda v: v >= 1, ">= 1"),
    "sample_rate": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "noise_multiplier": (lambda v: 0.0 < v < math.inf, "finite and > 0"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "planned_steps": (lambda v: v >= 1, ">= 1"),
    "delta": (lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    "epsilon": (lambda v: 0.0 <= v < math.inf, "finite and >= 0"),
    "target_epsilon": (lambda v: 0.0 < v < math.inf, "finite and > 0"),
    "max_grad_norm": (lambda v: 0.0 < v < math.inf, "finite and > 0"),
    "trust": (lambda v: v in (TRUST_SITE, TRUST_SERVER) or bool(_TRUST_SITES.fullmatch(v)),
              f"{TRUST_SITE!r}, {TRUST_SERVER!r} or 'sites>=<m>[,{SERVER_COUNTED}]'"),
}
_CASTS = {"int": operator.index, "float": float, "str": str}  # annotations are strings here


def _typed(cls: type, values: dict) -> dict:
    """Coerce to ``cls``'s field types and check ranges; ValueError names the bad field."""
    types = {f.name: f.type for f in fields(cls)}
    # Coerce before hashing: an int 1 hashes as "1" but reads back from a REAL column as "1.0".
    typed = {name: _CASTS[types[name]](value) for name, value in values.items()}
    for name, value in typed.items():
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{name} must be a non-empty string")
        check, expected = _RANGES.get(name, (lambda v: True, ""))
        if not check(value):
            raise ValueError(f"{name} must be {expected}, got {value}")
    return typed


def _chain_hash(prev_hash: str, body: dict) -> str:
    """sha256 of the previous hash followed by the canonical JSON of this row's fields."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256((prev_hash + canonical).encode("utf-8")).hexdigest()


def _from_row(cls: type, row: tuple):
    """Re-type a sqlite row, since sqlite columns carry only an affinity, not a type."""
    return cls(*(_CASTS[f.type](value) for f, value in zip(fields(cls), row)))


def _select_plan(con: sqlite3.Connection, run_id: str, mechanism: str) -> Plan | None:
    """Read one plan row inside the caller's connection (and transaction, if any)."""
    row = con.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE run_id = ? AND mechanism = ?",
                      (run_id, mechanism)).fetchone()
    return _from_row(Plan, row) if row else None


def _utc_now() -> str:
    """ISO-8601 UTC timestamp with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")

