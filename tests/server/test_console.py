"""The console table shows an undefined figure as n/a (with the reason once), never as 0.000."""

from __future__ import annotations

import logging

import numpy as np

from models.metrics import SplitMetrics
from protocol.metrics import to_record
from server.console import ConsoleTable
from strategies.observed import RoundRecord, SiteReply


def _reply(site: str, val: SplitMetrics, test: SplitMetrics) -> SiteReply:
    metrics = dict(to_record(val, "val")) | dict(to_record(test, "test"))
    return SiteReply(site_id=site, node_id=hash(site) % 1000, metrics=metrics)


def _split(confusion) -> SplitMetrics:
    cm = np.array(confusion)
    return SplitMetrics(n=int(cm.sum()), loss=0.5, confusion=cm)


GOOD = [[5, 1, 0], [1, 6, 1], [0, 1, 5]]          # 20 studies, three classes
SINGLE = [[0, 0, 0], [0, 0, 0], [3, 2, 4]]        # 9 studies, all "cyst": MCC undefined
TINY = [[1, 0, 0], [0, 1, 0], [0, 1, 0]]          # 3 studies


def _round(caplog, table: ConsoleTable, rnd: int = 1) -> list[str]:
    record = RoundRecord(round=rnd, evaluate=[
        _reply("site-0", _split(GOOD), _split(GOOD)),
        _reply("site-1", _split(TINY), _split(GOOD)),
        _reply("site-2", _split(SINGLE), _split(GOOD)),
    ])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        table.on_round_end(record)
    return [r.getMessage() for r in caplog.records]


def _row(lines: list[str], site: str) -> list[str]:
    return next(line for line in lines if line.split()[1:2] == [site]).split()


def test_single_class_and_tiny_splits_show_na_with_one_hint_each(caplog):
    table = ConsoleTable()
    lines = _round(caplog, table)
    # columns: round site train_loss val_loss val_mcc test_acc test_mcc test_auc
    assert _row(lines, "site-2")[4] == "n/a"            # not 0.000 (mcc() says 0 here)
    assert _row(lines, "site-1")[4] == "n/a"
    assert _row(lines, "site-0")[4] not in ("n/a", "-")
    assert _row(lines, "site-2")[6] not in ("n/a", "-")  # its test split is fine
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == ["note: site-1 val: only 3 studies in split (< 5; MCC/AUROC not shown)",
                     "note: site-2 val: single class in split (MCC/AUROC undefined)"]
    assert lines.index(notes[0]) > lines.index(next(l for l in lines if " GLOBAL " in l))
    # the next round says it again in the table, but the hint only once
    again = _round(caplog, table, rnd=2)
    assert _row(again, "site-2")[4] == "n/a"
    assert not [line for line in again if line.startswith("note:")]
    assert table.summary().splitlines()[-2:] == notes


def test_single_class_pooled_split_is_na_in_the_summary(caplog):
    table = ConsoleTable()
    record = RoundRecord(round=1, evaluate=[_reply("site-0", _split(SINGLE), _split(SINGLE))])
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        table.on_round_end(record)
    first = table.summary().splitlines()[1].split()
    assert first[:3] == ["1", "n/a", "n/a"]            # round, val_mcc, test_mcc
    assert "note: GLOBAL val: single class in split (MCC/AUROC undefined)" in table.summary()
