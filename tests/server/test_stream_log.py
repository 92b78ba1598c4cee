"""A deployed ServerApp marks each MedFed line once in Flower's log stream; Flower's own records
are left to Flower's handler (not printed a second time), other libraries only warn."""

from __future__ import annotations

import io
import logging
import sys

from server.stream_log import STREAM_HANDLER, stream_logging, streamed_line


def test_medfed_lines_are_marked_once_and_flower_records_are_not_repeated(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)          # what Flower mirrors into the stream
    monkeypatch.setattr(logging.getLogger("flwr"), "propagate", True)    # Flower's default
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    opacus_like = logging.StreamHandler(io.StringIO())     # opacus' basicConfig on import
    root.addHandler(opacus_like)
    try:
        stream_logging()
        stream_logging()                                     # a second call adds nothing
        ours = [h for h in root.handlers if h.get_name() == STREAM_HANDLER]
        assert len(ours) == 1 and opacus_like not in root.handlers
        logging.getLogger("medfed.server").info("summary (pooled over sites):\nround  val_mcc\n"
                                                "    1    0.500")
        logging.getLogger("strategies.guard").warning("update from b excluded: NaN")
        logging.getLogger("flwr").info("[ROUND 1/2]")    # Flower's handler prints these
        logging.getLogger("flwr").error("ServerApp thread raised an exception")
        logging.getLogger("alembic.runtime.migration").info("Running upgrade")
        logging.getLogger("some_library.client").warning("retrying")   # (mlflow sets its own
        # logger not to propagate once imported, so a named library here depends on test order)
    finally:
        root.handlers[:], root.level = saved
    lines = out.getvalue().splitlines()
    assert lines == ["[medfed INFO] summary (pooled over sites):",
                     "[medfed INFO] round  val_mcc",
                     "[medfed INFO]     1    0.500",
                     "[medfed WARNING] update from b excluded: NaN",
                     "[medfed WARNING] retrying"]
    assert streamed_line(lines[2]) == (logging.INFO, "    1    0.500")
    assert streamed_line(lines[3]) == (logging.WARNING, "update from b excluded: NaN")
    assert streamed_line("INFO :      [ROUND 1/2]") is None
    assert streamed_line("\t└──> Aggregated MetricRecord: {'val-f1_class_0': 0.5}") is None
