"""The site's egress audit lives outside the ClientApp: the site-owned runner writes one line
per reply before pushing it - refusals included - with names, sizes and digests, no values."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MessageType,
                      MetricRecord, RecordDict)
from flwr.common.constant import ErrorCode

import medfed.deploy.runner as runner
from medfed.deploy.allowlist import AllowList, fab_digest
from medfed.deploy.egress import EgressAudit, record_digest
from medfed.deploy.launcher import launcher_command, worker_command

from .test_app_allowlist import _tampered_fab, _task

pytestmark = pytest.mark.usefixtures("task_identity")

SECRET_VALUE = "value-only-the-coordinator-may-see"


class _Beat:
    is_running = False

    def __init__(self, *_):
        pass

    def start(self):
        pass


class _Client:
    def close(self):
        pass


def _run(monkeypatch, message, context, fab, allow, load_app, audit):
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.runtime.run_clientapp as flwr_runner

    pushed = []
    monkeypatch.setattr(heartbeat, "HeartbeatSender", _Beat)
    monkeypatch.setattr(flwr_runner, "pull_task_input",
                        lambda client: (message, context, None, fab))
    monkeypatch.setattr(flwr_runner, "push_message", lambda c, reply, ctx: pushed.append(reply))
    monkeypatch.setattr(flwr_runner, "push_task_output", lambda **kwargs: None)
    runner.run_task(_Client(), allow, node_config=context.node_config, load_app=load_app,
                    audit=audit)
    return pushed


def test_every_reply_is_audited_before_it_leaves_with_digests_and_no_values(
        monkeypatch, tmp_path):
    site_data = tmp_path / "data"
    site_data.mkdir()
    audit = EgressAudit(tmp_path / "state" / "egress.jsonl")
    # a refused app: the error reply is audited too
    message, context, fab = _task(site_data, _tampered_fab())
    refused = _run(monkeypatch, message, context, fab, AllowList(frozenset({"c" * 64})),
                   None, audit)
    # an approved app whose reply carries arrays, metrics and a config record
    bundle = _tampered_fab()
    message, context, fab = _task(site_data, bundle)

    def load_app():
        def app(message: Message, context: Context) -> Message:
            return Message(RecordDict({
                "arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32))}),
                "metrics": MetricRecord({"num-examples": 7}),
                "site": ConfigRecord({"note": SECRET_VALUE})}), reply_to=message)
        return app

    sent = _run(monkeypatch, message, context, fab, AllowList(frozenset({fab_digest(bundle)})),
                load_app, audit)
    text = audit.path.read_text()
    lines = [json.loads(ln) for ln in text.splitlines()]
    assert len(lines) == 2 == len(refused) + len(sent)
    assert lines[0]["error_code"] == ErrorCode.INVALID_FAB and lines[0]["records"] == {}
    assert lines[1]["error_code"] is None
    assert lines[1]["message_type"] == MessageType.TRAIN
    for name, record in sent[0].content.items():      # what left, byte for byte
        digest, entries, size = record_digest(record)
        assert lines[1]["records"][name] == {"kind": name if name != "site" else "config",
                                             "entries": entries, "bytes": size,
                                             "sha256": digest}
    assert lines[1]["records"]["arrays"]["bytes"] >= 6 * 4     # serialised: values + header
    assert SECRET_VALUE not in text                   # names, sizes and digests only
    assert stat.S_IMODE(audit.path.stat().st_mode) == 0o600


def test_a_changed_reply_changes_its_digest():
    a = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    b = ArrayRecord({"w": Array(np.array([0, 0, 1e-7], np.float32))})
    assert record_digest(a)[0] != record_digest(b)[0]
    assert record_digest(MetricRecord({"n": 1}))[0] != record_digest(MetricRecord({"n": 2}))[0]


@pytest.mark.parametrize("build", [
    lambda log: launcher_command("127.0.0.1:9094", AllowList(), "a", log,
                                 runtime_secret=log.parent / "secret",
                                 node_config=log.parent / "node-config.json"),
    lambda log: worker_command("127.0.0.1:9094", AllowList(), "a", log,
                               node_config=log.parent / "node-config.json")])
def test_the_site_passes_its_egress_log_to_launcher_and_runner(build, tmp_path):
    argv = build(tmp_path / "egress.jsonl")
    assert argv[argv.index("--egress-log") + 1] == str(tmp_path / "egress.jsonl")
