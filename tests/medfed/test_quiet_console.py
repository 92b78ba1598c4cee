"""Dependency chatter stays off the console but is kept in the run's medfed.log."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import types
import warnings

import pytest

from medfed.logs import (MLFLOW_CONSOLE_LOGGER, SITE_ERROR, ray_console_environment,
                         setup_logging)


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


def _flowers_report(error: Exception, *, while_handling: Exception | None = None) -> str:
    """What Flower's simulation logs for a ClientApp that raised ``error``: the traceback of
    the ``ClientAppException`` it makes of it (``ray_actor.py``: ``raise
    ClientAppException(str(ex)) from ex``)."""
    from flwr.clientapp.client_app import ClientAppException

    try:
        try:
            try:
                raise while_handling or error
            except Exception:
                raise error
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
    except ClientAppException:
        return traceback.format_exc()


def test_the_site_error_flowers_traceback_names_is_ours():
    from client.mods.errors import SiteError

    assert SITE_ERROR == f"{SiteError.__module__}.{SiteError.__qualname__}"


@pytest.mark.parametrize("raised, while_handling, on_console", [
    ("site", None, False),                  # the site's refusal: its one line is said elsewhere
    ("other", None, True),                  # anything else keeps Flower's traceback
    ("other", "site", True),                # ... even with a refusal earlier in its chain
])
def test_flowers_traceback_of_a_site_refusal_stays_off_the_console(
        clean_logging, capsys, tmp_path, raised, while_handling, on_console):
    from client.mods.errors import SiteError

    errors = {"site": SiteError("site-policy", "epsilon budget 1 spent (h3 test)"),
              "other": KeyError("layer4 (h3 test)")}
    _flowers_console(sys.stderr)
    setup_logging(log_file=tmp_path / "medfed.log")
    report = _flowers_report(errors[raised], while_handling=errors.get(while_handling))
    flwr = logging.getLogger("flwr")
    flwr.error("An exception was raised when processing a message by RayBackend")
    flwr.error(report)
    console = "".join(capsys.readouterr())
    kept = (tmp_path / "medfed.log").read_text()
    assert "h3 test" in kept and "processing a message by RayBackend" in kept
    assert ("ClientAppException occurred" in console) is on_console
    assert "processing a message by RayBackend" not in console   # a preface saying nothing


def test_flowers_actor_teardown_lines_are_dropped_by_rays_driver(monkeypatch):
    """What Ray's driver prints of its actors' lines under ``ray_console_environment``:
    every site line, each site's own (not merged), and no actor teardown."""
    import ray._private.ray_logging as ray_logging
    from ray._common.utils import env_bool

    for name, value in ray_console_environment().items():
        monkeypatch.setenv(name, value)
    # Ray reads these once, at import; this test process imported it already
    monkeypatch.setattr(ray_logging, "RAY_DEDUP_LOGS", env_bool("RAY_DEDUP_LOGS", False))
    dedup = ray_logging.LogDeduplicator(5, os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"],
                                        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    teardown = ["\x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor",
                "12/06/2026 01:27:09:WARNING:Manually terminating ClientAppActor"]
    site = "12/06/2026 01:27:09:ERROR:train message failed (site-policy sent to the server)"
    printed = []
    for pid in (7, 8):                          # two sites saying the same line: both shown
        batches = dedup.deduplicate({"ip": "192.0.2.2", "pid": pid,
                                     "lines": [*teardown, site, ""]})
        printed += [line for batch in batches for line in batch["lines"]]
    assert printed == [site, "", site, ""]
