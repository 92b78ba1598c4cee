"""What ``medfed run`` shows of a deployed run's log stream (``flwr run --stream``).

The stream is the ServerApp process's output as Flower relays it: MedFed's lines, marked by
the ServerApp (``server/stream_log.py``: the per-round table of ``server/console.py``, site
failures by site id, the summary, where the results are), between Flower's own (its strategy
banner, the raw metric dump ``'val-f1_class_0': '4.8864e-01'``, tracebacks) and what libraries
print. ``medfed run`` shows MedFed's lines at their level, as ``medfed simulate`` does;
Flower's only with ``--verbose``. The last hidden lines are kept: if no run starts they are
the reason.
"""

from __future__ import annotations

import logging
import re
from collections import deque

from server.stream_log import streamed_line

from .process import ANSI, FLOWER_PREFIX

STREAM_DUPLICATE = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:")   # Flower echoes each line
KEPT = 40                        # hidden lines kept for an error report


class StreamFilter:
    """Call it with each raw line of the stream: ``(level, text)`` to show, or None.

    Parameters
    ----------
    verbose : bool
        Show Flower's lines too (at INFO, its ``INFO :`` prefix dropped).
    """

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.hidden: deque[str] = deque(maxlen=KEPT)

    def __call__(self, raw: str) -> tuple[int, str] | None:
        line = ANSI.sub("", raw.rstrip())
        if not line.strip() or STREAM_DUPLICATE.match(line):
            return None
        if (ours := streamed_line(line)) is not None:
            return ours
        text = FLOWER_PREFIX.sub("", line)
        if self.verbose:
            return logging.INFO, text
        self.hidden.append(text)
        return None
