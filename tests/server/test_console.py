"""The console table shows an undefined figure as n/a (with the reason once), never as 0.000."""

from __future__ import annotations

import logging

import numpy as np

from models.metrics import SplitMetrics
from protocol.metrics import to_record
from server.console import ConsoleTable
from strategies.observed import RoundRecord, SiteFailure, SiteReply


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


def test_each_site_line_has_its_train_and_eval_seconds(caplog):
    from protocol import wire

    train = [SiteReply("site-0", 1, {"train_loss": 0.7, wire.TRAIN_SECONDS: 12.34}),
             SiteReply("site-1", 2, {"train_loss": 0.9})]            # no timing reported
    evaluate = [_reply("site-0", _split(GOOD), _split(GOOD)),
                _reply("site-1", _split(GOOD), _split(GOOD))]
    evaluate[0].metrics[wire.EVAL_SECONDS] = 3.21
    record = RoundRecord(round=1, train=train, evaluate=evaluate, wall_seconds=20.0)
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        ConsoleTable().on_round_end(record)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].split()[-2:] == ["train_s", "eval_s"]
    assert _row(lines, "site-0")[-2:] == ["12.3", "3.2"]
    assert _row(lines, "site-1")[-2:] == ["-", "-"]
    assert _row(lines, "GLOBAL")[-1] == "(20.0s)"


def test_a_site_failure_is_one_line_naming_the_site(caplog):
    from protocol.site_errors import one_line

    raised = "c (node 17): <class 'client.job.JobRefused'>:<'no privacy budget left\nsee log'>"
    assert one_line(raised) == "c (node 17): JobRefused: no privacy budget left"
    trace = "b (node 3): Traceback (most recent call last):\n  File \"x\", line 1\nOSError: disk"
    assert one_line(trace) == "b (node 3): OSError: disk"
    assert one_line("a (node 1): Error: Node Unavailable\n") == "a (node 1): Error: Node Unavailable"
    failure = SiteFailure("c", 17, raised.split(": ", 1)[1])
    assert str(failure) == raised
    record = RoundRecord(round=2, failures={"train": [failure]})
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        ConsoleTable().on_train(record)
    assert [r.getMessage() for r in caplog.records] == [
        "round 2: training reply failed: c (node 17): JobRefused: no privacy budget left"]


def test_an_evaluation_the_guard_left_out_is_one_line_naming_the_site(caplog):
    from strategies.guard import Rejection

    record = RoundRecord(round=3, evaluate=[_reply("site-0", _split(GOOD), _split(GOOD))],
                         evaluate_rejected=[Rejection("site-9", "auroc out of [0, 1]", 9)])
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        ConsoleTable().on_round_end(record)
    assert "round 3: evaluation from site-9 excluded: auroc out of [0, 1]" in [
        r.getMessage() for r in caplog.records]


def test_the_results_hint_names_the_store_and_the_command_that_opens_it():
    from server.console import results_hint

    local = results_hint("sqlite:////srv/runs/demo-1/mlflow.db")
    assert local.startswith("results: MLflow store sqlite:////srv/runs/demo-1/mlflow.db; ")
    assert local.split("open it with:  ", 1)[1].startswith("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false ")
    assert local.endswith(" ui --backend-store-uri sqlite:////srv/runs/demo-1/mlflow.db --port 5000")
    server = results_hint("https://alice:s3cret@mlflow.example.org:5000/?token=x")
    assert server == "results: MLflow tracking server https://mlflow.example.org:5000/ (open it in a browser)"
    assert "s3cret" not in results_hint("postgresql://alice:s3cret@db/mlflow")


def _many_sites(n: int, failed: int) -> RoundRecord:
    from protocol import wire

    train = [SiteReply(f"site-{i:03d}", i, {"train_loss": float(i), wire.TRAIN_SECONDS: 1.0})
             for i in range(n)]
    evaluate = [_reply(f"site-{i:03d}", _split(GOOD), _split(SINGLE if i == 0 else GOOD))
                for i in range(n)]
    failures = [SiteFailure(f"site-{n + i:03d}", n + i, "<class 'OSError'>:<'disk full'>")
                for i in range(failed)]
    return RoundRecord(round=4, train=train, evaluate=evaluate, wall_seconds=9.0,
                       failures={"train": failures, "evaluate": []},
                       train_metrics={"train_loss": 50.0})


def test_more_than_twenty_sites_print_a_round_summary_and_the_full_table_goes_to_a_file(
        caplog, tmp_path):
    from server.console import SITE_TABLE

    table = ConsoleTable(tmp_path)
    record = _many_sites(101, failed=5)
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        table.on_train(record)
        table.on_round_end(record)
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if line.split()[1:2] == ["site-050"]]   # no site lines
    assert len(lines) < 20                                    # a summary, not 101 lines
    assert lines[0] == "round 4: training reply failed: site-101 (node 101): OSError: disk full"
    assert len([line for line in lines if "training reply failed" in line]) == 3
    assert f"round 4: ... and 2 more (all in {tmp_path / SITE_TABLE})" in lines
    counts = next(line for line in lines if "sites trained" in line)
    assert counts.startswith("round 4: 101 sites trained (5 failed, 0 updates excluded), "
                             "101 evaluated (0 failed, 0 excluded)")
    train_loss = next(line for line in lines if line.startswith("round 4: train_loss")).split()
    assert train_loss[3:] == ["0.000", "25.000", "50.000", "75.000", "100.000", "101"]
    test_mcc = next(line for line in lines if line.startswith("round 4: test_mcc")).split()
    assert test_mcc[-1] == "100"                       # site-000's single-class split: n/a
    assert _row(lines, "GLOBAL")[-1] == "(9.0s)"
    assert "note: 1 site splits show n/a" in " ".join(lines)

    rows = (tmp_path / SITE_TABLE).read_text().splitlines()
    assert rows[0].split("\t")[:3] == ["round", "site", "train_loss"]
    sites = [r.split("\t") for r in rows[1:] if not r.startswith("#")]
    assert [s[1] for s in sites if s[-1] == "ok"] == [f"site-{i:03d}" for i in range(101)]
    assert sites[50][2] == "50.0000"
    assert sites[0][6] == "n/a"                                      # test_mcc of site-000
    assert [s[1] for s in sites if s[-1].startswith("train failed")] == \
        [f"site-{i:03d}" for i in range(101, 106)]
    assert "# round 4 note: site-000 test: single class in split (MCC/AUROC undefined)" in rows


def test_twenty_sites_still_get_one_line_each(caplog, tmp_path):
    from server.console import SITE_TABLE

    record = _many_sites(20, failed=0)
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        ConsoleTable(tmp_path).on_round_end(record)
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if line.split()[1:2] == ["site-019"]]) == 1
    assert not (tmp_path / SITE_TABLE).exists()


def test_many_sites_still_log_why_a_global_figure_is_n_a(caplog, tmp_path):
    """Above 20 sites the sites' notes go to the site table; the pooled (GLOBAL) notes are
    still logged, however many site notes came before them."""
    record = _many_sites(30, failed=0)
    record.evaluate[:] = [_reply(r.site_id, _split(SINGLE), _split(GOOD)) for r in record.evaluate]
    table = ConsoleTable(tmp_path)
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        table.on_train(record)
        table.on_round_end(record)
    lines = [r.getMessage() for r in caplog.records]
    assert "note: GLOBAL val: single class in split (MCC/AUROC undefined)" in lines
    assert "note: 30 site splits show n/a" in " ".join(lines)


def _evaluation_only(site: str) -> SiteReply:
    from protocol import wire

    return SiteReply(site_id=site, node_id=77,
                     metrics=dict(to_record(_split(GOOD), wire.EXTERNAL_SPLIT)))


def _every_kind_of_line() -> RoundRecord:
    """Trained sites, an evaluation-only site (and so an EXTERNAL line), a failure in each
    phase and an excluded reply of each kind."""
    from strategies.guard import Rejection

    return RoundRecord(
        round=1, train=[SiteReply("site-0", 1, {"train_loss": 0.7})],
        evaluate=[_reply("site-0", _split(GOOD), _split(GOOD)),
                  _reply("site-1", _split(TINY), _split(GOOD)), _evaluation_only("ext-0")],
        failures={"train": [SiteFailure("site-2", 2, "<class 'OSError'>:<'disk full'>")],
                  "evaluate": [SiteFailure("site-3", 3, "Error: Node Unavailable")]},
        rejected=[Rejection("site-4", "update norm 9.0 > 3.0", 4)],
        evaluate_rejected=[Rejection("site-5", "auroc out of [0, 1]", 5)], wall_seconds=2.0)


def test_every_line_has_as_many_fields_as_its_header(caplog, tmp_path):
    """Console lines (site, evaluation-only site, GLOBAL, EXTERNAL) and site-table rows
    (including failed and excluded sites' rows) line up with their header."""
    import re

    from server.console import SITE_TABLE

    with caplog.at_level(logging.INFO, logger="medfed.server"):
        ConsoleTable().on_round_end(_every_kind_of_line())
    lines = [r.getMessage() for r in caplog.records]
    header = next(line for line in lines if line.split()[1:2] == ["site"])
    rows = [line for line in lines if line.split()[0].isdigit()]
    assert {row.split()[1] for row in rows} == {"site-0", "site-1", "ext-0", "GLOBAL", "EXTERNAL"}
    ends = [m.end() for m in re.finditer(r"\S+", header)][2:]     # figures are right-aligned
    for row in rows:
        fields = row.split()[:-1] if row.split()[1] == "GLOBAL" else row.split()  # (2.0s)
        assert len(fields) == len(header.split()), (header, row)
        assert [m.end() for m in re.finditer(r"\S+", row)][2:len(fields)] == ends, (header, row)

    with caplog.at_level(logging.INFO, logger="medfed.server"):
        ConsoleTable(tmp_path, max_site_lines=2).on_round_end(_every_kind_of_line())
    table = [r.split("\t") for r in (tmp_path / SITE_TABLE).read_text().splitlines()
             if not r.startswith("#")]
    statuses = [row[-1].split(":")[0] for row in table[1:]]
    assert statuses == ["ok"] * 3 + ["train failed", "evaluate failed", "update excluded",
                                     "evaluation excluded"]
    assert {len(row) for row in table} == {len(table[0])}, table
