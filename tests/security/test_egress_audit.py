"""The site's egress audit lives outside the ClientApp: the site-owned runner writes one line
per reply before pushing it - refusals included - with names, sizes and digests, no values -
and after it how the push ended; the site's SuperNode adds how each send to the coordinator
ended."""

from __future__ import annotations

import hashlib
import json
import stat
from unittest.mock import ANY

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MessageType,
                      MetricRecord, RecordDict)
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus

import medfed.deploy.runner as runner
from medfed.deploy.allowlist import AllowList, fab_digest
from medfed.deploy.egress import (EgressAudit, egress_entry, outcome_entry, read_replies,
                                  record_digest)
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


def _run(monkeypatch, message, context, fab, allow, load_app, audit, push=None, status=None):
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.runtime.run_clientapp as flwr_runner

    pushed = []
    monkeypatch.setattr(heartbeat, "HeartbeatSender", _Beat)
    monkeypatch.setattr(flwr_runner, "pull_task_input",
                        lambda client: (message, context, None, fab))
    monkeypatch.setattr(flwr_runner, "push_message",
                        push or (lambda c, reply, ctx: pushed.append(reply)))
    monkeypatch.setattr(flwr_runner, "push_task_output",
                        lambda **kwargs: (status if status is not None else []).append(kwargs))
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
    lines = read_replies(audit.path)
    assert len(lines) == 2 == len(refused) + len(sent)
    assert [ln["outcomes"] for ln in lines] == [["pushed"], ["pushed"]]     # and both went
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


def test_an_error_replys_reason_is_audited_by_size_and_digest_not_text(monkeypatch, tmp_path):
    """An error reply's reason leaves the site too (a DP refusal's may carry the training
    count's 1/n): its line holds the reason's bytes and SHA-256, so the officer can match
    what the coordinator received, and not the text."""
    from client.mods.errors import SiteError

    reason = "dp-refused: 37 training studies (1/n = 0.027)"
    site_data = tmp_path / "data"
    site_data.mkdir()
    audit = EgressAudit(tmp_path / "state" / "egress.jsonl")
    bundle = _tampered_fab()
    message, context, fab = _task(site_data, bundle)

    def load_app():
        def app(message: Message, context: Context) -> Message:
            raise SiteError(*reason.split(": ", 1))
        return app

    sent = _run(monkeypatch, message, context, fab, AllowList(frozenset({fab_digest(bundle)})),
                load_app, audit)
    assert [r.error.reason for r in sent] == [reason]          # what the coordinator gets
    text = audit.path.read_text()
    (line,) = read_replies(audit.path)
    assert line["error_code"] == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert line["error_reason"] == {"bytes": len(reason.encode()),
                                    "sha256": hashlib.sha256(reason.encode()).hexdigest()}
    assert line["bytes"] == len(reason.encode())
    assert "37 training" not in text and "0.027" not in text and "studies" not in text
    # another reason, another digest: the line tells them apart
    other = egress_entry(Message(Error(code=2, reason=reason.replace("37", "38")),
                                 reply_to=message), 1)
    assert other["error_reason"]["sha256"] != line["error_reason"]["sha256"]


def _approved_task(tmp_path):
    """A task of the approved release, with the id a real task has (its replies refer to it)."""
    site_data = tmp_path / "data"
    site_data.mkdir(exist_ok=True)
    bundle = _tampered_fab()
    message, context, fab = _task(site_data, bundle)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message, context, fab, AllowList(frozenset({fab_digest(bundle)}))


def _metrics_app():
    def app(message: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 7})}),
                       reply_to=message)
    return app


def test_a_reply_whose_push_fails_is_logged_as_tried_and_failed_by_class_only(monkeypatch,
                                                                             tmp_path):
    """The push to the site's SuperNode raises: the log keeps the line written before it (the
    reply may have partly left) and adds the failure, with the exception's class and not its
    message (a transport error may quote what it was sending)."""
    audit = EgressAudit(tmp_path / "state" / "egress.jsonl")
    message, context, fab, allow = _approved_task(tmp_path)

    def push(client, reply, ctx):
        raise ConnectionError(f"lost while sending {SECRET_VALUE}")

    status = []
    with pytest.raises(ConnectionError):
        _run(monkeypatch, message, context, fab, allow, _metrics_app, audit, push=push,
             status=status)
    # the app completed, the reply did not reach the SuperNode: Flower hears the task failed
    (reported,) = status
    assert reported["sub_status"] == SubStatus.FAILED
    assert reported["details"] == "the reply was not pushed"
    assert SECRET_VALUE not in reported["details"]
    text = audit.path.read_text()
    tried, failed = [json.loads(ln) for ln in text.splitlines()]
    assert tried["event"] == "reply" and tried["records"]["metrics"]["entries"] == 1
    assert failed == {"time": failed["time"], "event": "push-failed", "run_id": 1,
                      "reply_to": message.metadata.message_id, "error": "ConnectionError"}
    assert tried["reply_to"] == message.metadata.message_id != ""
    assert SECRET_VALUE not in text
    (reply,) = read_replies(audit.path)
    assert reply["outcomes"] == ["push-failed: ConnectionError"]


def test_a_pushed_reply_is_logged_as_tried_then_pushed(monkeypatch, tmp_path):
    audit = EgressAudit(tmp_path / "state" / "egress.jsonl")
    message, context, fab, allow = _approved_task(tmp_path)
    order = []

    def push(client, reply, ctx):                     # the reply line is already there
        order.append(len(audit.path.read_text().splitlines()))

    status = []
    _run(monkeypatch, message, context, fab, allow, _metrics_app, audit, push=push,
         status=status)
    assert [s["sub_status"] for s in status] == [SubStatus.COMPLETED]
    tried, pushed = [json.loads(ln) for ln in audit.path.read_text().splitlines()]
    assert order == [1] and tried["event"] == "reply" and tried["error_code"] is None
    assert pushed == {"time": pushed["time"], "event": "pushed", "run_id": 1,
                      "reply_to": message.metadata.message_id}


def test_outcome_lines_pair_with_their_reply_by_run_and_task(tmp_path):
    """Runners and the SuperNode share the file: lines of different replies interleave."""
    entries = []

    def reply(run, task):
        m = Message(Error(code=2, reason="x"), reply_to=Message(
            RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN))
        m.metadata.__dict__["_reply_to_message_id"] = task
        return m, run

    a, b = reply(1, "task-a"), reply(2, "task-b")
    for entry in (egress_entry(*a), egress_entry(*b), outcome_entry(*b, "push", None),
                  outcome_entry(*a, "push", OSError()), outcome_entry(*b, "send", None)):
        entries.append(json.dumps(entry))
    path = tmp_path / "egress.jsonl"
    path.write_text("\n".join(entries) + "\n")
    assert [(r["reply_to"], r["outcomes"]) for r in read_replies(path)] == [
        ("task-a", ["push-failed: OSError"]), ("task-b", ["pushed", "sent"])]


def test_a_changed_reply_changes_its_digest():
    a = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    b = ArrayRecord({"w": Array(np.array([0, 0, 1e-7], np.float32))})
    assert record_digest(a)[0] != record_digest(b)[0]
    assert record_digest(MetricRecord({"n": 1}))[0] != record_digest(MetricRecord({"n": 2}))[0]


@pytest.mark.parametrize("build", [
    lambda log: launcher_command("127.0.0.1:9094", AllowList(), "a", log,
                                 runtime_secret=log.parent / "secret",
                                 node_config=log.parent / "node-config.json",
                                 supernode_pid=log.parent / "supernode.pid"),
    lambda log: worker_command("127.0.0.1:9094", AllowList(), "a", log,
                               node_config=log.parent / "node-config.json",
                               supernode_pid=log.parent / "supernode.pid")])
def test_the_site_passes_its_egress_log_to_launcher_and_runner(build, tmp_path):
    argv = build(tmp_path / "egress.jsonl")
    assert argv[argv.index("--egress-log") + 1] == str(tmp_path / "egress.jsonl")


def _supernode_replies(monkeypatch):
    """A SuperNode's state holding two replies to send: run 8's, made (and audited) by its
    runner, and run 7's, made by Flower itself (``CLIENT_APP_CRASHED``: its runner died, the
    task token expired and the SuperNode's expiry hook, called here, answered)."""
    import time as real_time
    from types import SimpleNamespace

    import flwr.supernode.start_client_internal as loop
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata
    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    for name in ("time", "pull_objects", "_push_messages", "get_fused_config_from_fab"):
        monkeypatch.setattr(loop, name, getattr(loop, name))          # put back afterwards
    store_factory = ObjectStoreFactory()
    state, store = NodeStateFactory(objectstore_factory=store_factory).state(), \
        store_factory.store()

    def task_message(run_id: int) -> Message:
        msg = make_message(Metadata(run_id=run_id, message_id="", src_node_id=0, dst_node_id=1,
                                    reply_to_message_id="", group_id="",
                                    created_at=real_time.time(), ttl=600,
                                    message_type=MessageType.TRAIN),
                           content=RecordDict({"config": ConfigRecord({"x": 1})}))
        loop._insert_message(msg, state, store)
        return msg

    task_message(7)
    refused = task_message(8)
    assert len(state.get_messages_legacy(is_reply=False)) == 2      # both handed to runners
    runner_reply = Message(Error(code=ErrorCode.INVALID_FAB, reason="not approved"),
                           reply_to=refused)
    loop._insert_message(runner_reply, state, store)
    state._on_task_tokens_expired([SimpleNamespace(type=TaskType.CLIENT_APP, run_id=7)])
    return loop, state, store, runner_reply


def _lines(log) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_the_supernode_audits_flowers_own_crash_reply_once_before_sending_it(monkeypatch,
                                                                              tmp_path):
    """A claimed task whose runner died: Flower's SuperNode answers the coordinator itself with
    ``CLIENT_APP_CRASHED`` ("ClientApp stopped responding."), a reply no runner sees. The
    site's SuperNode writes its egress line before sending it; a reply the runner made (and
    audited itself) gets no second line there. Each send that went through gets its line."""
    from medfed.deploy import supernode
    from medfed.deploy.site import SiteSettings, supernode_command

    loop, state, store, _ = _supernode_replies(monkeypatch)
    log = tmp_path / "egress.jsonl"
    supernode.install(0.5, audit=EgressAudit(log))
    sent = []

    def send(message, _tree, _runtime):
        sent.append((message.metadata.run_id, message.error.code,
                     [(x["run_id"], x["event"]) for x in _lines(log)]))
        return set(), "session"

    loop._push_messages(state=state, object_store=store, send=send,
                        push_object=lambda *args: None)
    assert {run: code for run, code, _ in sent} == {7: ErrorCode.CLIENT_APP_CRASHED,
                                                    8: ErrorCode.INVALID_FAB}
    assert [(7, "reply") in seen for run, _, seen in sent if run == 7] == [True]  # line first
    lines = _lines(log)
    assert sorted((x["run_id"], x["event"]) for x in lines) == [(7, "reply"), (7, "sent"),
                                                                (8, "sent")]
    (line,) = [x for x in lines if x["event"] == "reply"]           # none for run 8 here
    assert (line["run_id"], line["error_code"]) == (7, ErrorCode.CLIENT_APP_CRASHED)
    assert line["error_reason"]["bytes"] == len("ClientApp stopped responding.")
    # the site starts its SuperNode with the audit (the same file as the runner's)
    settings = SiteSettings(site_id="a", data_dir=tmp_path, superlink="x:1",
                            root_cert=tmp_path / "ca", auth_key=tmp_path / "k",
                            state_dir=tmp_path / "s")
    cmd = supernode_command(settings)
    assert cmd[cmd.index("--egress-log") + 1] == str(settings.state_dir / "egress.jsonl")
    import importlib

    flower_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the module

    installed = []
    monkeypatch.setattr(supernode, "install", lambda *args: installed.append(args))
    monkeypatch.setattr(flower_cli, "flower_supernode", lambda: None)
    monkeypatch.setattr("sys.argv", ["test"])                      # main hands Flower its own
    supernode.main(cmd[3:])
    ((_interval, _allow, audit),) = installed
    assert audit.path == settings.state_dir / "egress.jsonl"


def test_a_send_to_the_coordinator_that_fails_is_logged_by_the_supernode(monkeypatch,
                                                                        tmp_path):
    """Flower's SuperNode logs a failed send and drops the reply: the run stopped
    (``RunNotRunningException`` from the send), or the coordinator did not take an object of
    it. The site's SuperNode writes the failure, by class, on the reply's lines: a reply the
    runner pushed (``pushed``) is not taken for one that reached the coordinator."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectPushError
    from flwr.supercore.run import RunNotRunningException

    from medfed.deploy import supernode

    loop, state, store, runner_reply = _supernode_replies(monkeypatch)
    log = tmp_path / "egress.jsonl"
    audit = EgressAudit(log)
    with audit.sending(runner_reply, 8, "push"):                  # what run 8's runner wrote
        pass
    supernode.install(0.5, audit=audit)

    def send(message, tree, _runtime):
        if message.metadata.run_id == 8:
            raise RunNotRunningException
        return {t.object_id for t in loop.iterate_object_tree(tree)}, "session"

    def push_object(run_id, session_id, object_id, _content):
        raise ObjectPushError(object_id, run_id, session_id)

    loop._push_messages(state=state, object_store=store, send=send, push_object=push_object)
    replies = {r["run_id"]: r for r in read_replies(log)}
    assert replies[8]["outcomes"] == ["pushed", "send-failed: RunNotRunningException"]
    assert replies[7]["error_code"] == ErrorCode.CLIENT_APP_CRASHED
    assert replies[7]["outcomes"] == ["send-failed: ObjectPushError"]
    assert "session" not in log.read_text()                       # the class, not the text


def test_a_reply_whose_objects_cannot_be_read_is_not_logged_as_sent(monkeypatch, tmp_path):
    """The coordinator took the header, then Flower's object iterator failed reading the
    site's store (not an object push): Flower logs and drops the reply. Its line says the
    send failed, by class - not ``sent``."""
    from medfed.deploy import supernode

    loop, state, store, runner_reply = _supernode_replies(monkeypatch)
    log = tmp_path / "egress.jsonl"
    supernode.install(0.5, audit=EgressAudit(log))
    real_get, pushed = store.get, []
    broken = runner_reply.object_id

    def get(object_id):
        if object_id == broken:
            raise OSError(f"store read failed for {SECRET_VALUE}")
        return real_get(object_id)

    monkeypatch.setattr(store, "get", get)

    def send(message, tree, _runtime):
        return {t.object_id for t in loop.iterate_object_tree(tree)}, f"s{message.metadata.run_id}"

    loop._push_messages(state=state, object_store=store, send=send,
                        push_object=lambda run_id, session, object_id, _c: pushed.append(run_id))
    replies = {r["run_id"]: r for r in read_replies(log)}
    assert replies[7]["outcomes"] == ["sent"] and 7 in pushed      # the other reply went out
    assert [x for x in _lines(log) if x["run_id"] == 8] == [
        {"time": ANY, "event": "send-failed", "run_id": 8,
         "reply_to": runner_reply.metadata.reply_to_message_id, "error": "OSError"}]
    assert SECRET_VALUE not in log.read_text()
    assert loop.push_object_contents_from_iterable.__name__ != "audited_contents"  # put back


def test_read_replies_keeps_lines_written_before_outcomes_were_logged(tmp_path):
    """egress.jsonl is append-only: an upgraded site's log starts with lines that have no
    ``event`` or ``reply_to``; they are replies (without outcomes), not an error."""
    import json

    path = tmp_path / "egress.jsonl"
    old = {"time": "2026-12-01T00:00:00Z", "run_id": 1, "message_type": "train"}
    new = {"time": "2026-12-06T00:00:00Z", "run_id": 2, "message_type": "train",
           "event": "reply", "reply_to": "m2"}
    outcome = {"time": "2026-12-06T00:00:01Z", "run_id": 2, "event": "pushed",
               "reply_to": "m2"}
    path.write_text("".join(json.dumps(e) + "\n" for e in (old, new, outcome)))
    first, second = read_replies(path)
    assert first["run_id"] == 1 and first["outcomes"] == []
    assert second["outcomes"] == ["pushed"]


def test_a_late_object_failure_of_one_reply_is_not_logged_against_the_next(tmp_path):
    """Flower stops waiting for a reply's other object pushes once one fails; one of those can
    fail after the next reply was sent. It is settled by its send session: the first reply
    shows one failure, the next one was sent."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

    from medfed.deploy import supernode

    log = tmp_path / "egress.jsonl"
    first, second = (Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN,
                             group_id="g") for _ in range(2))
    for run, reply in ((5, first), (6, second)):
        reply.metadata.__dict__["_run_id"] = run
        reply.metadata.__dict__["_reply_to_message_id"] = f"m{run}"

    def push_messages(*, send, push_object):          # Flower's order of calls, replayed
        send(first, None, None)
        with pytest.raises(ObjectPushError):
            push_object(5, "s-first", "a", b"")
        send(second, None, None)
        with pytest.raises(ObjectPushError):           # first's straggler, after second's send
            push_object(5, "s-first", "b", b"")
        push_object(6, "s-second", "c", b"")

    def send(message, _tree, _runtime):
        return set(), f"s-{'first' if message is first else 'second'}"

    def push_object(run_id, session_id, object_id, _content):
        if session_id == "s-first":
            raise ObjectPushError(object_id, run_id, session_id)

    supernode.audited(push_messages, EgressAudit(log))(send=send, push_object=push_object)
    outcomes = [(x["run_id"], x["event"]) for x in _lines(log)]
    assert outcomes == [(5, "send-failed"), (6, "sent")]
