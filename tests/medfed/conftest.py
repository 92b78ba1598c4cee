"""Fixtures shared by the CLI/console tests."""

from __future__ import annotations

import logging
import warnings

import pytest

from medfed.logs import HANDLER_NAME


@pytest.fixture()
def clean_logging(monkeypatch):
    """Root/flwr/medfed loggers, warning capture and filters as they were, afterwards."""
    root, flwr, medfed = logging.getLogger(), logging.getLogger("flwr"), logging.getLogger("medfed")
    saved = (list(root.handlers), root.level, flwr.propagate, flwr.level, list(flwr.handlers),
             medfed.level)
    with warnings.catch_warnings():
        yield
        logging.captureWarnings(False)
    for logger in (root, flwr):
        for handler in logger.handlers:
            if handler.get_name() == HANDLER_NAME:
                handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    flwr.propagate, flwr.level, flwr.handlers[:] = saved[2], saved[3], saved[4]
    medfed.setLevel(saved[5])
