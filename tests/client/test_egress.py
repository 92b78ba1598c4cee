"""The egress audit log keeps one record per reply, also for replies within one clock tick."""

from __future__ import annotations

import json

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict

from client.mods import egress
from client.mods.egress import egress_log


def test_two_replies_in_one_clock_tick_are_two_records(tmp_path, monkeypatch, task_identity):
    """Two simulated sites (two processes) replied within the clock's resolution and wrote
    one file together: a record that was neither reply (seen as a JSON file with two
    documents in make test)."""
    monkeypatch.setattr(egress.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    mod = egress_log(tmp_path)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    for loss in (1.0, 2.0):
        request = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
        content = RecordDict({"metrics": MetricRecord({"train_loss": loss})})
        mod(request, context, lambda msg, ctx, c=content: Message(c, reply_to=msg))
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert sorted(r["records"]["metrics"]["train_loss"] for r in records) == [1.0, 2.0]
    assert len(list(tmp_path.glob("*.pb"))) == 2
