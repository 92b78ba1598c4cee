"""A site's failure as the coordinator shows it: one line from the error reason Flower carried.

Flower writes an exception a ClientApp raised as ``<class 'ValueError'>:<'the message'>``; in
simulation the class is Ray's task error and the message its remote traceback, ending in
``Exception ClientAppException occurred. Message: <what the site raised>``. A site raises only
``client.mods.errors.SiteError`` (``<code>: <message>``, one line, no site data), so that last
message is the line to show. The preflight, the fault guard and the console all say a site's
failure with :func:`one_line`.
"""

from __future__ import annotations

import re

_RAISED = re.compile(r"<class '(?:[\w.()]*\.)?([\w()]+)'>:<'(.*)'>", re.S)
_CLIENT_APP = "ClientAppException occurred. Message: "
_TRACEBACK = "Traceback (most recent call last):"


def one_line(reason: str) -> str:
    """``reason`` as one line: the site's own message when Flower wrapped it (a simulation's
    Ray traceback included), ``ValueError: message`` for Flower's ``<class ...>:<...>`` form of
    anything else, the last line of a traceback, the first line of any other text. Text before
    Flower's form (a caller's ``site (node N): `` prefix) is kept."""
    prefix = ""
    if m := _RAISED.search(reason):
        prefix, name, inner = reason[:m.start()], m.group(1), m.group(2)
        if _CLIENT_APP in inner:     # the site's message, whatever Ray's traceback says first
            message = inner.rsplit(_CLIENT_APP, 1)[1]
            return prefix + (next((ln.strip() for ln in message.splitlines() if ln.strip()),
                                  "") or "no reason given")
        reason = prefix + f"{name}: {inner}"
    head, traceback, trace = reason.partition(_TRACEBACK)
    first = next((line.strip() for line in head.splitlines() if line.strip()), "")
    last = next((line.strip() for line in reversed(trace.splitlines()) if line.strip()), "")
    return " ".join(part for part in (first, last if traceback else "") if part) \
        or "no reason given"
