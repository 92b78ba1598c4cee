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
import re
import sys
import warnings
from pathlib import Path

# Our handlers carry this name, so a second setup in one process (tests call ``main`` many
# times) replaces them instead of writing every line twice or into an earlier run's log file.
HANDLER_NAME = "medfed"

# Dependencies whose INFO lines are about their own plumbing (DB migrations, HTTP requests).
QUIET_LOGGERS = ("alembic", "mlflow", "urllib3", "git", "httpx")

# Lines that are true but not actionable for a MedFed user: kept in the run's medfed.log (whoever
# upgrades a dependency reads them there), dropped from the console. Matched against the
# formatted message; a warning captured by logging carries its category name in it.
CONSOLE_NOISE = re.compile("|".join((
    r"The `run_simulation` function is deprecated",          # Flower: our CLI is the entry point
    r"\b\w*(DeprecationWarning|FutureWarning)\b",             # e.g. SQLAlchemy's SADeprecationWarning
    r"Registered model .* already exists\. Creating a new version",   # MLflow; our table says
    r"Successfully registered model ",                        # which version was registered
    # Flower's preface to the exception record it logs next (which says what was raised)
    r"An exception was raised when processing a message by RayBackend",
)))

# A site's refusal as a traceback prints its class (pinned to client.mods.errors.SiteError by
# tests/medfed/test_quiet_console.py; not imported: it would import Flower). In simulation
# Flower logs every ClientApp exception twice with Ray's remote traceback; for a SiteError that
# is noise: the coordinator prints its one line (server/console.py), the site logged the trace.
SITE_ERROR = "client.mods.errors.SiteError"
_SITE_ERROR_LINE = re.compile(rf"^{re.escape(SITE_ERROR)}: (.+)$", re.M)

# Lines of Ray actors that Ray's driver drops before printing (``ray_console_environment``):
# Flower's actor teardown at the end of every simulation, as its logger and as the root
# logger (opacus' basicConfig in the actor) print it.
RAY_WORKER_NOISE = r"Manually terminating ClientAppActor"

# Where MLflow's eprint() lines go once routed (see ``route_dependency_consoles``).
MLFLOW_CONSOLE_LOGGER = "medfed.mlflow"


def site_refusal_trace(message: str) -> bool:
    """Whether ``message`` is Flower's report of a ClientApp that raised a site's refusal:
    the ``ClientAppException`` Flower made of a :data:`SITE_ERROR` (its message is that
    error's text), not another exception that merely has one in its chain."""
    return any(f"ClientAppException occurred. Message: {line.group(1)}" in message
               for line in _SITE_ERROR_LINE.finditer(message))


class ConsoleNoise(logging.Filter):
    """Drop :data:`CONSOLE_NOISE` records and Flower's traceback of a site's refusal
    (:func:`site_refusal_trace`); on console handlers only, never on the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return CONSOLE_NOISE.search(message) is None and not site_refusal_trace(message)


class _LineLogger:
    """A write-only text stream that logs each complete line (MLflow prints, it does not log)."""

    def __init__(self, logger: logging.Logger):
        self._logger, self._pending = logger, ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if line.strip():
                self._logger.info(line.rstrip())
        return len(text)

    def flush(self) -> None:
        pass


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
    console = logging.StreamHandler(sys.stdout)
    console.addFilter(ConsoleNoise())
    handlers: list[logging.Handler] = [console]
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
        # ...but what it still says (warnings) belongs in the run's log file too.
        for stale in [h for h in flwr.handlers if h.get_name() == HANDLER_NAME]:
            flwr.removeHandler(stale)
        if log_file is not None:
            flwr.addHandler(handlers[-1])
        # From here on a warning is a log record: filtered from the console, kept in the file.
        # Dependencies' deprecations were ignored until now (nowhere to keep them); show each
        # once, into the log.
        # Off then on: re-installs logging's hook even if someone swapped showwarning since
        # an earlier setup in this process (captureWarnings(True) alone is then a no-op).
        logging.captureWarnings(False)
        logging.captureWarnings(True)
        if log_file is not None:
            for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
                warnings.filterwarnings("default", category=category)
        route_dependency_consoles()


def route_dependency_consoles() -> None:
    """Put :class:`ConsoleNoise` in front of what dependencies print on their own.

    Flower's console handler is attached when Flower is imported, and MLflow's ``eprint``
    writes to stderr directly; both are reached only if already imported (this module imports
    neither). Idempotent: call it again after importing them.
    """
    for handler in logging.getLogger("flwr").handlers:
        if handler.get_name() != HANDLER_NAME and \
                not any(isinstance(f, ConsoleNoise) for f in handler.filters):
            handler.addFilter(ConsoleNoise())
    mlflow_logging = sys.modules.get("mlflow.utils.logging_utils")
    if mlflow_logging is not None and not isinstance(mlflow_logging.MLFLOW_LOGGING_STREAM,
                                                      _LineLogger):
        mlflow_logging.MLFLOW_LOGGING_STREAM = _LineLogger(
            logging.getLogger(MLFLOW_CONSOLE_LOGGER))


def ray_console_environment() -> dict[str, str]:
    """How Ray's driver prints its actors' lines (environment, read when Ray is imported):
    every line as it comes, each site's own (none merged into ``[repeated Nx across
    cluster]``), except :data:`RAY_WORKER_NOISE`. Ray skips lines only in its deduplicator,
    so that runs, and every other line matches its never-deduplicate pattern."""
    return {"RAY_DEDUP_LOGS": "1",
            "RAY_DEDUP_LOGS_ALLOW_REGEX": rf"^(?!.*(?:{RAY_WORKER_NOISE}))",
            "RAY_DEDUP_LOGS_SKIP_REGEX": RAY_WORKER_NOISE}


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
