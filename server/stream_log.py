"""A deployed ServerApp's lines in Flower's log stream, marked so ``medfed run`` can tell them
from Flower's own.

A deployed ServerApp's output reaches ``medfed run`` through Flower's log stream
(``flwr run --stream``), mixed with Flower's lines (its strategy banner, the raw metric dump,
tracebacks) and what libraries print. :func:`stream_logging` writes every line MedFed logs
there with a mark (``[medfed INFO] ...``, each line of a multi-line record) and
:func:`streamed_line` reads the mark back on the other side. Standard library only:
``medfed run`` imports it without the server's stack.
"""

from __future__ import annotations

import logging
import re
import sys

STREAM_HANDLER = "medfed-stream"
STREAM_MARK = re.compile(r"^\[medfed (DEBUG|INFO|WARNING|ERROR|CRITICAL)\] ?(.*)$")
# Whose INFO lines a deployed ServerApp streams; from others (MLflow, alembic, ...) warnings only.
OWN_PACKAGES = ("medfed", "server", "strategies", "protocol", "models")


class StreamFormatter(logging.Formatter):
    """Every line of a record (the summary spans several) starts ``[medfed LEVEL] ``."""

    def format(self, record: logging.LogRecord) -> str:
        mark = f"[medfed {record.levelname}] "
        return "\n".join(mark + line for line in super().format(record).split("\n"))


class _StreamRecords(logging.Filter):
    """Flower's records are printed by Flower's own handler (once, unmarked); of other
    libraries' records only warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        package = record.name.split(".", 1)[0]
        if package == "flwr":
            return False
        return package in OWN_PACKAGES or record.levelno >= logging.WARNING


def stream_logging() -> None:
    """Logging of a deployed ServerApp process, whose output Flower streams to ``medfed run``:
    MedFed's lines marked (:class:`StreamFormatter`), each once (no command configured this
    process; opacus' ``basicConfig`` handler, if imported, would print every line again)."""
    root = logging.getLogger()
    for stale in [h for h in root.handlers
                  if type(h) is logging.StreamHandler or h.get_name() == STREAM_HANDLER]:
        root.removeHandler(stale)
    handler = logging.StreamHandler(sys.stdout)    # Flower mirrors this process's stdout
    handler.set_name(STREAM_HANDLER)
    handler.setFormatter(StreamFormatter("%(message)s"))
    handler.addFilter(_StreamRecords())
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def streamed_line(line: str) -> tuple[int, str] | None:
    """(level, message) of a line :func:`stream_logging` wrote; None for any other line
    (Flower's own, what libraries print)."""
    if m := STREAM_MARK.match(line):
        return logging.getLevelName(m.group(1)), m.group(2)
    return None
