"""Egress audit log: a copy of every reply this site sends, for its security officer.

Each outgoing reply is written twice under the audit directory: the exact protobuf bytes of
its RecordDict (what crosses the wire) and a JSON summary of its records (names, keys, array
shapes, config and metric values). A hospital can then answer "what left our network?"
without trusting the server, and tests scan these files for PHI.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.serde import recorddict_to_proto


def summarize(message: Message) -> dict:
    """JSON-able description of a message's records (values for configs/metrics, shapes for arrays)."""
    out: dict = {"message_type": message.metadata.message_type, "records": {}}
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            out["records"][name] = {k: list(a.shape) for k, a in record.items()}
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            out["records"][name] = {k: v if not isinstance(v, bytes) else f"<{len(v)} bytes>"
                                    for k, v in record.items()}
    return out


def egress_log(directory: str | Path) -> Mod:
    """Mod that records every reply (not errors' contents, which carry none) before it leaves."""
    directory = Path(directory)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        directory.mkdir(parents=True, exist_ok=True)
        # time first (files sort by it), then unique: two processes (simulated sites, or a
        # site's runners) replying within the clock's resolution wrote one file together,
        # leaving a record that is neither reply
        stem = (f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:12]}-"
                f"{msg.metadata.message_type.replace('.', '_')}")
        if reply.has_content():
            (directory / f"{stem}.pb").write_bytes(
                recorddict_to_proto(reply.content).SerializeToString())
            (directory / f"{stem}.json").write_text(json.dumps(summarize(reply), default=str))
        else:
            (directory / f"{stem}.json").write_text(json.dumps({"error": reply.error.reason}))
        return reply

    return mod
