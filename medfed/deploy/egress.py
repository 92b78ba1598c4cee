"""The site's egress audit, kept outside the ClientApp: one JSON line per reply the site lets
out, written by the site-owned runner (``medfed.deploy.runner``) just before the reply is
pushed - error replies and refusals included - and, for the one reply the runner never sees
(Flower's ``CLIENT_APP_CRASHED``, "ClientApp stopped responding.", when a task's runner died
or hung), by the site's SuperNode just before it sends it (``medfed.deploy.supernode``).

A reply line (``"event": "reply"``) holds what a security officer needs to see what left, and
nothing patient-derived: time, run id, the id of the task it answers (``reply_to``), message
type, the error code (if any) with the UTF-8 bytes and SHA-256 of the error's reason text (a
refusal's reason leaves the site too, and may carry a number: a DP refusal's 1/n), and per
record its kind, number of entries, payload bytes and a SHA-256 over its contents. No array
values, metric values, config strings or reason texts are written - the hashes let the
officer match a line against the message the coordinator received (``record_digest``,
``reason_digest``) without the log itself becoming a copy of it.

The reply line comes first, so that everything that may leave has a line even if the process
dies on the way; lines with the same ``run_id`` and ``reply_to`` then say how the reply went:
the runner's push to the site's SuperNode (``"event": "pushed"`` or ``"push-failed"``), then
the SuperNode's send to the coordinator (``"sent"`` or ``"send-failed"``; a crash reply has
only this one). A failure names the exception's class in ``error``, never its message. A
reply with no ``sent`` line did not reach the coordinator, or the process stopped before it
could say so. ``read_replies`` pairs the lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

EGRESS_LOG = "egress.jsonl"
REPLY = "reply"                     # a line's ``event``; the others are the outcomes below
# a reply's way out: the runner's push to the site's SuperNode, the SuperNode's send onwards
OUTCOMES = {"push": ("pushed", "push-failed"), "send": ("sent", "send-failed")}


def record_digest(record) -> tuple[str, int, int]:
    """``(sha256 hex, entries, payload bytes)`` of one Flower record, in a canonical order."""
    h, size = hashlib.sha256(), 0
    for key in sorted(record.keys()):
        value = record[key]
        h.update(key.encode() + b"\0")
        if isinstance(record, ArrayRecord):
            meta = f"{value.dtype}|{tuple(value.shape)}|{value.stype}".encode()
            h.update(meta + b"\0" + value.data)
            size += len(value.data)
        else:
            blob = json.dumps(value, sort_keys=True, default=repr).encode()
            h.update(blob + b"\0")
            size += len(blob)
    return h.hexdigest(), len(record), size


def reason_digest(reason: str) -> dict:
    """``{"bytes", "sha256"}`` of an error reply's reason text (UTF-8), never the text."""
    blob = reason.encode()
    return {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def _kind(record) -> str:
    if isinstance(record, ArrayRecord):
        return "arrays"
    if isinstance(record, MetricRecord):
        return "metrics"
    return "config" if isinstance(record, ConfigRecord) else type(record).__name__


def _head(event: str, reply: Message, run_id: int | None) -> dict:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event,
            "run_id": run_id, "reply_to": reply.metadata.reply_to_message_id}


def egress_entry(reply: Message, run_id: int | None) -> dict:
    """The audit line for ``reply`` (no values, only names, sizes and digests)."""
    entry: dict = _head(REPLY, reply, run_id) | {
        "message_type": reply.metadata.message_type, "error_code": None,
        "error_reason": None, "records": {}, "bytes": 0}
    if reply.has_error():
        entry["error_code"] = int(reply.error.code)
        entry["error_reason"] = reason_digest(reply.error.reason or "")
        entry["bytes"] = entry["error_reason"]["bytes"]
        return entry
    for name, record in reply.content.items():
        digest, entries, size = record_digest(record)
        entry["records"][name] = {"kind": _kind(record), "entries": entries, "bytes": size,
                                  "sha256": digest}
        entry["bytes"] += size
    return entry


def outcome_entry(reply: Message, run_id: int | None, step: str,
                  error: BaseException | None) -> dict:
    """The line saying how ``step`` (``"push"``, ``"send"``) of ``reply`` ended: the exception's
    class, not its text (a transport error may quote what it was sending)."""
    done, failed = OUTCOMES[step]
    if error is None:
        return _head(done, reply, run_id)
    return _head(failed, reply, run_id) | {"error": type(error).__name__}


def read_replies(path: Path) -> list[dict]:
    """The reply lines of the egress log at ``path`` in order, each with ``"outcomes"``: the
    events of the later lines with its ``run_id`` and ``reply_to`` (a failure as
    ``"push-failed: ConnectionError"``), ``[]`` where there are none. Lines written before
    outcomes were logged (no ``event``, no ``reply_to``) are replies without outcomes."""
    replies: list[dict] = []
    latest: dict[tuple, dict] = {}              # the last reply line of each (run, task)
    for line in Path(path).read_text().splitlines():
        entry = json.loads(line)
        key = (entry.get("run_id"), entry.get("reply_to"))
        if entry.get("event", REPLY) == REPLY:
            latest[key] = entry | {"outcomes": []}
            replies.append(latest[key])
        elif key in latest:
            latest[key]["outcomes"].append(
                ": ".join([entry["event"]] + ([entry["error"]] if "error" in entry else [])))
    return replies


class EgressAudit:
    """Append-only JSON-lines log of every reply leaving the site (owner-only file)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _append(self, entry: dict) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:        # one write per line: the site's runners and SuperNode share the file
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)
        return entry

    def record(self, reply: Message, run_id: int | None) -> dict:
        """Write ``reply``'s line; call it before the reply is pushed."""
        return self._append(egress_entry(reply, run_id))

    def outcome(self, reply: Message, run_id: int | None, step: str,
                error: BaseException | None = None) -> dict:
        """Write how ``step`` of ``reply`` (recorded before) ended: done, or ``error``."""
        return self._append(outcome_entry(reply, run_id, step, error))

    @contextmanager
    def sending(self, reply: Message, run_id: int | None, step: str) -> Iterator[None]:
        """``reply``'s line, then the block (``step``), then the line of its outcome; an
        exception from the block is recorded by class and raised on."""
        self.record(reply, run_id)
        try:
            yield
        except BaseException as err:    # a signal mid-push ends the push too
            self.outcome(reply, run_id, step, err)
            raise
        self.outcome(reply, run_id, step)
