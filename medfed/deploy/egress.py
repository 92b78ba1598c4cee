"""The site's egress audit, kept outside the ClientApp: one JSON line per reply the site lets
out, written by the site-owned runner (``medfed.deploy.runner``) just before the reply is
pushed - error replies and refusals included - and, for the one reply the runner never sees
(Flower's ``CLIENT_APP_CRASHED``, "ClientApp stopped responding.", when a task's runner died
or hung), by the site's SuperNode just before it sends it (``medfed.deploy.supernode``).

A line holds what a security officer needs to see what left, and nothing patient-derived:
time, run id, message type, the error code (if any) with the UTF-8 bytes and SHA-256 of the
error's reason text (a refusal's reason leaves the site too, and may carry a number: a DP
refusal's 1/n), and per record its kind, number of entries, payload bytes and a SHA-256 over
its contents. No array values, metric values, config strings or reason texts are written -
the hashes let the officer match a line against the message the coordinator received
(``record_digest``, ``reason_digest``) without the log itself becoming a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

EGRESS_LOG = "egress.jsonl"


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


def egress_entry(reply: Message, run_id: int | None) -> dict:
    """The audit line for ``reply`` (no values, only names, sizes and digests)."""
    entry: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "run_id": run_id, "message_type": reply.metadata.message_type,
                   "error_code": None, "error_reason": None, "records": {}, "bytes": 0}
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


class EgressAudit:
    """Append-only JSON-lines log of every reply leaving the site (owner-only file)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def record(self, reply: Message, run_id: int | None) -> dict:
        entry = egress_entry(reply, run_id)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        return entry
