"""Dependency chatter stays off the console but is kept in the run's medfed.log."""

from __future__ import annotations

import logging
import sys
import types
import warnings


from medfed.logs import MLFLOW_CONSOLE_LOGGER, setup_logging


class SADeprecationWarning(DeprecationWarning):
    """Stands in for sqlalchemy.exc.SADeprecationWarning (a DeprecationWarning subclass)."""


def _flowers_console(capsys_stream):
    """A handler like the one Flower attaches to its logger at import (prints to stderr)."""
    handler = logging.StreamHandler(capsys_stream)
    handler.set_name("flwr-console")
    logging.getLogger("flwr").addHandler(handler)
    return handler


def test_dependency_noise_goes_to_the_file_not_the_console(clean_logging, capsys, tmp_path,
                                                          monkeypatch):
    # MLflow prints through this module's stream; a stand-in keeps the test free of MLflow.
    fake = types.ModuleType("mlflow.utils.logging_utils")
    fake.MLFLOW_LOGGING_STREAM = sys.stderr
    monkeypatch.setitem(sys.modules, "mlflow.utils.logging_utils", fake)
    _flowers_console(sys.stderr)
    log_file = tmp_path / "medfed.log"
    setup_logging(log_file=log_file)

    logging.getLogger("flwr").warning(
        "DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed")
    warnings.warn("The Query.get() method is considered legacy (h3 test)", SADeprecationWarning)
    print("Registered model 'medfed-classifier' already exists. Creating a new version of "
          "this model...", file=fake.MLFLOW_LOGGING_STREAM)
    logging.getLogger("medfed").info("round 1: val_acc 0.7")

    out = capsys.readouterr()
    console = out.out + out.err
    kept = log_file.read_text()
    for line in ("run_simulation` function is deprecated", "Query.get() method",
                 "already exists. Creating a new version"):
        assert line not in console, line
        assert line in kept, line
    assert "round 1: val_acc 0.7" in console and "round 1: val_acc 0.7" in kept
    assert logging.getLogger(MLFLOW_CONSOLE_LOGGER).isEnabledFor(logging.INFO)


def test_real_warnings_still_reach_the_console(clean_logging, capsys, tmp_path):
    setup_logging(log_file=tmp_path / "medfed.log")
    warnings.warn("site-2 has 3 studies (h3 test)", UserWarning)
    logging.getLogger("flwr").warning("Connection to site-1 lost")
    _flowers_console(sys.stderr)
    setup_logging(log_file=tmp_path / "medfed.log")     # re-run: Flower's handler now filtered
    logging.getLogger("flwr").warning("Connection to site-2 lost")
    console = "".join(capsys.readouterr())
    assert "site-2 has 3 studies" in console and "Connection to site-2 lost" in console
    assert "Connection to site-1 lost" in (tmp_path / "medfed.log").read_text()
