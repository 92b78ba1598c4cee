"""Where a deployed message's time goes: one timestamped line per hop, off unless asked for.

A deployed exchange crosses four processes (the coordinator's ServerApp, its SuperLink, a
site's SuperNode, the site's launcher and runner). Each of them calls ``hop`` at the points
where the message changes hands (pushed, pulled, claimed, handled, replied, collected); with
``MEDFED_HOP_TRACE=<file>`` in the environment of every process (``bench/deploy.py --trace``
sets it), each call appends one JSON line to that file at DEBUG level of the ``medfed.hops``
logger: wall-clock time (one machine on loopback, so one clock), the hop's name, the first 12
characters of the Flower message id it concerns and small identifiers (run id, node id, site
id, task id). Nothing else: no content, no path, no metric. Without the variable ``hop`` is a
dictionary lookup and returns.

``bench.deploy_timeline`` turns the lines into a per-exchange table.
"""

from __future__ import annotations

import json
import logging
import os
import time

ENV = "MEDFED_HOP_TRACE"
log = logging.getLogger("medfed.hops")


class _JsonLines(logging.Handler):
    """Appends each record's message as one line (O_APPEND: whole lines from many processes)."""

    def __init__(self, path: str):
        super().__init__(level=logging.DEBUG)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:       # a trace that cannot be written never breaks the hop it traces
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (record.getMessage() + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            self.handleError(record)


def enabled() -> bool:
    """True when ``MEDFED_HOP_TRACE`` names a file (the handler is attached on first use)."""
    path = os.environ.get(ENV)
    if not path:
        return False
    if not any(isinstance(h, _JsonLines) for h in log.handlers):
        log.addHandler(_JsonLines(path))
        log.setLevel(logging.DEBUG)
        log.propagate = False           # the trace is for the file, not the console
    return True


def hop(name: str, message_id: str = "", **ids: int | str) -> None:
    """Record that a message reached ``name`` now (no-op unless tracing is switched on).

    Parameters
    ----------
    name : str
        The hop, e.g. ``"serverapp.push"`` or ``"runner.handled"``.
    message_id : str
        The Flower id of the instruction message the hop concerns (a reply is traced under
        the id of the message it answers); only its first 12 characters are kept.
    **ids
        Small identifiers only (run, node, site, task); never content.
    """
    if not enabled():
        return
    line = {"t": round(time.time(), 4), "hop": name, "msg": message_id[:12], "pid": os.getpid(),
            **ids}
    log.debug("%s", json.dumps(line, separators=(",", ":")))
