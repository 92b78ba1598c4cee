"""The site privacy ledger: survives restarts, refuses edits, detects tampering, plans stick."""

from __future__ import annotations

import math
import sqlite3
import threading

import pytest

from client.privacy.ledger import (TRUST_SERVER, trust_sites,
    GENESIS_HASH,
    LedgerCorrupt,
    PrivacyLedger,
    format_table,
    to_json,
)

ROUND = dict(run_id="run-a", mechanism="dp-sgd", sample_rate=0.05, noise_multiplier=1.1,
             steps=40, delta=1e-5, accountant="rdp", max_grad_norm=1.0)


def _fill(ledger: PrivacyLedger, epsilons=(0.61, 0.93, 1.2)) -> None:
    """One row per cumulative epsilon, rounds numbered from 1."""
    for server_round, eps in enumerate(epsilons, start=1):
        ledger.append(**ROUND, server_round=server_round, epsilon=eps)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "site" / "privacy" / "ledger.sqlite"   # parents do not exist yet


def test_append_survives_reopen(path):
    ledger = PrivacyLedger(path)
    assert ledger.last() is None and ledger.entries() == [] and ledger.history() == []
    first = ledger.append(**ROUND, server_round=1, epsilon=0.61)
    ledger.append(**{**ROUND, "noise_multiplier": 1.3, "steps": 25}, server_round=2,
                  epsilon=0.87)
    assert first.seq == 1 and first.prev_hash == GENESIS_HASH
    assert first.created_at.endswith("+00:00")

    reopened = PrivacyLedger(path)   # a new process on the same file
    assert reopened.entries() == ledger.entries()
    assert [e.seq for e in reopened.entries()] == [1, 2]
    assert reopened.history() == [(1.1, 0.05, 40), (1.3, 0.05, 25)]
    assert reopened.last().epsilon == 0.87
    assert reopened.entries()[1].prev_hash == first.hash


def test_history_rebuilds_an_opacus_accountant(path):
    accountants = pytest.importorskip("opacus.accountants")
    ledger = PrivacyLedger(path)
    _fill(ledger)
    live = accountants.RDPAccountant()
    for noise, q, steps in ledger.history():
        for _ in range(steps):
            live.step(noise_multiplier=noise, sample_rate=q)
    rebuilt = accountants.RDPAccountant()
    rebuilt.history = PrivacyLedger(path).history()
    assert rebuilt.get_epsilon(delta=1e-5) == pytest.approx(live.get_epsilon(delta=1e-5))
    assert rebuilt.get_epsilon(delta=1e-5) > 0


@pytest.mark.parametrize("statement", [
    "UPDATE ledger SET epsilon = 0.0 WHERE seq = 2",
    "DELETE FROM ledger WHERE seq = 3",
    "DELETE FROM ledger",
    "INSERT OR REPLACE INTO ledger SELECT * FROM ledger WHERE seq = 1",
    "UPDATE plans SET noise_multiplier = 0.1",
    "DELETE FROM plans",
])
def test_raw_sql_cannot_rewrite_history(path, statement):
    ledger = PrivacyLedger(path)
    _fill(ledger)
    ledger.set_plan("run-a", "dp-sgd", noise_multiplier=1.1, sample_rate=0.05,
                    planned_steps=400, target_epsilon=8.0, delta=1e-5)
    con = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only|chain tail"):
        con.execute(statement)
    con.close()
    assert [e.epsilon for e in PrivacyLedger(path).entries()] == [0.61, 0.93, 1.2]
    assert PrivacyLedger(path).get_plan("run-a", "dp-sgd").noise_multiplier == 1.1


def test_edited_row_is_detected_on_open(path):
    _fill(PrivacyLedger(path))
    con = sqlite3.connect(path)
    con.execute("DROP TRIGGER ledger_no_update")
    con.execute("UPDATE ledger SET epsilon = 0.1 WHERE seq = 2")   # understate the spend
    con.commit()
    con.close()
    with pytest.raises(LedgerCorrupt, match=r"seq=2\b"):
        PrivacyLedger(path)


def test_deleted_middle_row_is_detected_on_open(path):
    _fill(PrivacyLedger(path))
    con = sqlite3.connect(path)
    con.execute("DROP TRIGGER ledger_no_delete")
    con.execute("DELETE FROM ledger WHERE seq = 2")
    con.commit()
    con.close()
    with pytest.raises(LedgerCorrupt, match=r"seq=3\b"):   # the first row after the gap
        PrivacyLedger(path)


def test_plan_first_calibration_wins_and_survives_reopen(path):
    ledger = PrivacyLedger(path)
    assert ledger.get_plan("run-a", "dp-sgd") is None
    first = ledger.set_plan("run-a", "dp-sgd", noise_multiplier=1.1, sample_rate=0.05,
                            planned_steps=400, target_epsilon=8.0, delta=1e-5)
    again = PrivacyLedger(path).set_plan("run-a", "dp-sgd", noise_multiplier=0.7,
                                         sample_rate=0.1, planned_steps=100,
                                         target_epsilon=3.0, delta=1e-6)
    assert again == first
    assert PrivacyLedger(path).get_plan("run-a", "dp-sgd") == first
    other = ledger.set_plan("run-a", "site-dp", noise_multiplier=0.9, sample_rate=1.0,
                            planned_steps=20, target_epsilon=4.0, delta=1e-5)
    assert other.noise_multiplier == 0.9 and ledger.get_plan("run-a", "dp-sgd") == first


@pytest.mark.parametrize("bad", [
    dict(sample_rate=0.0), dict(sample_rate=1.5), dict(noise_multiplier=0.0),
    dict(noise_multiplier=-1.0), dict(delta=1.0), dict(delta=0.0), dict(epsilon=math.nan),
    dict(epsilon=math.inf), dict(epsilon=-0.1), dict(steps=0), dict(run_id=""),
    dict(mechanism=" "), dict(accountant=""), dict(max_grad_norm=0.0),
])
def test_bad_append_is_refused_and_not_written(path, bad):
    ledger = PrivacyLedger(path)
    with pytest.raises(ValueError):
        ledger.append(**{**ROUND, "server_round": 1, "epsilon": 0.5, **bad})
    assert ledger.entries() == []


def test_int_arguments_are_stored_as_floats_so_the_chain_verifies(path):
    ledger = PrivacyLedger(path)
    ledger.append(**{**ROUND, "sample_rate": 1, "max_grad_norm": 2}, server_round=1, epsilon=0)
    assert PrivacyLedger(path).history() == [(1.1, 1.0, 40)]


def test_to_json_and_format_table(path):
    ledger = PrivacyLedger(path)
    assert format_table(ledger.entries()) == "no rounds recorded"
    _fill(ledger)
    rows = to_json(ledger.entries())
    assert [set(r) for r in rows] == [{
        "seq", "run_id", "round", "mechanism", "q", "noise_multiplier", "steps", "delta",
        "accountant", "epsilon", "max_grad_norm", "trust", "created_at", "hash"}] * 3
    assert [(r["round"], r["q"], r["epsilon"]) for r in rows] == [
        (1, 0.05, 0.61), (2, 0.05, 0.93), (3, 0.05, 1.2)]
    table = format_table(ledger.entries())
    lines = table.splitlines()
    assert "cumulative epsilon" in lines[0] and len(lines) == 4
    assert all(eps in table for eps in ("0.6100", "0.9300", "1.2000"))


def test_two_instances_appending_alternately_keep_one_chain(path):
    a, b = PrivacyLedger(path), PrivacyLedger(path)
    for server_round in range(1, 7):
        writer = a if server_round % 2 else b
        writer.append(**ROUND, server_round=server_round, epsilon=0.1 * server_round)
    for ledger in (a, b, PrivacyLedger(path)):
        assert [e.seq for e in ledger.entries()] == [1, 2, 3, 4, 5, 6]
        ledger.verify()


def test_concurrent_writers_serialize(path):
    PrivacyLedger(path)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        ledger = PrivacyLedger(path)   # own instance, own connections: like another process
        try:
            for i in range(10):
                ledger.append(**ROUND, server_round=worker * 100 + i + 1, epsilon=1.0)
        except BaseException as exc:   # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ledger = PrivacyLedger(path)
    assert [e.seq for e in ledger.entries()] == list(range(1, 41))
    ledger.verify()


def test_rows_say_whom_they_trust_and_refuse_an_unknown_trust(path):
    ledger = PrivacyLedger(path)
    ledger.append(**ROUND, server_round=1, epsilon=0.5)                       # DP-SGD: site
    ledger.append(**ROUND, server_round=2, epsilon=0.6, trust=TRUST_SERVER)
    ledger.append(**ROUND, server_round=3, epsilon=0.7, trust=trust_sites(5))
    for bad in ("", "anyone", "sites>=0", "sites>=x"):
        with pytest.raises(ValueError, match="trust"):
            ledger.append(**ROUND, server_round=4, epsilon=0.8, trust=bad)
    entries = PrivacyLedger(path).entries()
    assert [e.trust for e in entries] == ["site", "server", "sites>=5"]
    assert [r["trust"] for r in to_json(entries)] == ["site", "server", "sites>=5"]
    assert "sites>=5" in format_table(entries)


def test_a_ledger_from_before_the_trust_column_still_verifies_and_grows(path):
    """Old rows were hashed without ``trust``; opening adds the column and keeps the chain."""
    import hashlib
    import json
    import sqlite3
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.execute("""CREATE TABLE ledger (
        seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL, server_round INTEGER NOT NULL,
        mechanism TEXT NOT NULL, sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL,
        steps INTEGER NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL,
        epsilon REAL NOT NULL, max_grad_norm REAL NOT NULL, created_at TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""")
    body = dict(seq=1, run_id="old", server_round=1, mechanism="site-dp", sample_rate=1.0,
                noise_multiplier=2.0, steps=1, delta=1e-5, accountant="rdp", epsilon=1.5,
                max_grad_norm=1.0, created_at="2026-01-01T00:00:00.000000+00:00")
    digest = hashlib.sha256(("0" * 64 + json.dumps(body, sort_keys=True, separators=(",", ":")))
                            .encode()).hexdigest()
    con.execute("INSERT INTO ledger VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (*body.values(), "0" * 64, digest))
    con.commit()
    con.close()
    ledger = PrivacyLedger(path)                   # migrates, verifies
    ledger.append(**ROUND, server_round=2, epsilon=2.0, trust=TRUST_SERVER)
    entries = PrivacyLedger(path).entries()        # the whole chain verifies again
    assert [e.trust for e in entries] == ["", "server"]
    assert to_json(entries)[0]["trust"] == "unrecorded"
