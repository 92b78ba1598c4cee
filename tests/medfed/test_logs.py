"""One logging setup for every ``medfed`` process (interactive and deployment)."""

from __future__ import annotations

import logging
import re

import pytest

from medfed.logs import HANDLER_NAME, setup_logging


@pytest.fixture()
def root_logger():
    """The root, medfed and flwr loggers as pytest left them, restored afterwards."""
    root, flwr, medfed = logging.getLogger(), logging.getLogger("flwr"), logging.getLogger("medfed")
    saved = (list(root.handlers), root.level, flwr.propagate, flwr.level, medfed.level)
    yield root
    for handler in root.handlers:
        if handler.get_name() == HANDLER_NAME:
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    flwr.propagate = saved[2]
    flwr.setLevel(saved[3])
    medfed.setLevel(saved[4])


def test_second_setup_replaces_ours_and_basic_config_keeps_others(root_logger, tmp_path):
    foreign = logging.NullHandler()             # e.g. pytest's capture handler
    root_logger.addHandler(foreign)
    root_logger.addHandler(logging.StreamHandler())   # what opacus' basicConfig() adds
    setup_logging(log_file=tmp_path / "first.log")
    setup_logging(log_file=tmp_path / "second.log")      # a second run in one process
    ours = [h for h in root_logger.handlers if h.get_name() == HANDLER_NAME]
    assert len(ours) == 2 and foreign in root_logger.handlers
    assert [h for h in root_logger.handlers if type(h) is logging.StreamHandler] == ours[:1]
    logging.getLogger("medfed.test").info("round 1 done")
    for handler in ours:
        handler.flush()
    assert "round 1 done" in (tmp_path / "second.log").read_text()
    assert (tmp_path / "first.log").read_text() == ""


def test_deploy_lines_carry_the_date_and_leave_flower_alone(root_logger, capsys):
    flwr = logging.getLogger("flwr")
    flwr.propagate = True
    flwr.setLevel(logging.INFO)
    setup_logging(deploy=True)
    assert flwr.propagate and flwr.level == logging.INFO
    logging.getLogger("medfed.deploy").info("site online")
    logging.getLogger("httpx").info("HTTP Request: GET /")
    out = capsys.readouterr().out
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO    site online$", out, re.M)
    assert "HTTP Request" not in out


def test_interactive_lines_silence_flowers_dump_unless_verbose(root_logger, capsys):
    setup_logging()
    assert not logging.getLogger("flwr").propagate
    assert logging.getLogger("flwr").level == logging.WARNING
    logging.getLogger("medfed").debug("hidden")
    logging.getLogger("medfed").info("shown")
    out = capsys.readouterr().out
    assert re.search(r"^\d\d:\d\d:\d\d INFO    shown$", out, re.M) and "hidden" not in out
    setup_logging(verbose=True)
    logging.getLogger("medfed").debug("now shown")
    assert "now shown" in capsys.readouterr().out
    assert logging.getLogger("flwr").level == logging.DEBUG
