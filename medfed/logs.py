"""How a ``medfed`` process logs: one format on stdout (and optionally a file), quiet
dependencies.

Library code only calls ``logging.getLogger(...)``; the command line decides here, once per
process, where the lines go. Two kinds of process share this setup: an interactive command (a
simulation prints a round table, so Flower's own round-by-round dump is silenced) and a
long-running deployment process (coordinator, site daemon, run submission), whose lines carry
the date and which keeps Flower's output because it relays it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

# Our handlers carry this name, so a second setup in one process (tests call ``main`` many
# times) replaces them instead of writing every line twice or into an earlier run's log file.
HANDLER_NAME = "medfed"

# Dependencies whose INFO lines are about their own plumbing (DB migrations, HTTP requests).
QUIET_LOGGERS = ("alembic", "mlflow", "urllib3", "git", "httpx")


def setup_logging(verbose: bool = False, log_file: Path | None = None, *,
                  deploy: bool = False) -> None:
    """Send log records to stdout (and ``log_file``) in one format.

    Parameters
    ----------
    verbose : bool
        ``medfed`` loggers at DEBUG (and, outside deployment, Flower's too); INFO otherwise.
    log_file : Path, optional
        Also append every line to this file (a run's ``medfed.log``).
    deploy : bool
        A deployment process: timestamps carry the date (daemons run for days) and Flower's
        logger is left as Flower set it up, since these processes relay its output.
    """
    datefmt = "%Y-%m-%d %H:%M:%S" if deploy else "%H:%M:%S"
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", datefmt)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    # opacus calls logging.basicConfig() on import: its plain console handler would print
    # every line a second time, in another format. Others' handlers (pytest's) stay.
    for stale in [h for h in root.handlers
                  if type(h) is logging.StreamHandler or h.get_name() == HANDLER_NAME]:
        root.removeHandler(stale)
        if stale.get_name() == HANDLER_NAME:
            stale.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.set_name(HANDLER_NAME)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    logging.getLogger("medfed").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not deploy:
        # Flower has its own console handler; our round table replaces its round-by-round dump.
        flwr = logging.getLogger("flwr")
        flwr.propagate = False
        flwr.setLevel(logging.DEBUG if verbose else logging.WARNING)


def quiet_third_parties() -> None:
    """Deprecation chatter from dependencies is not actionable for a MedFed user.

    Sets warning filters for this process and environment defaults that child processes
    (Ray workers, MLflow) inherit; call it before importing the heavy dependencies.
    """
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*noload.*")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
