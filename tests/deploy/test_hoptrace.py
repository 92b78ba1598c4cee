"""Hop tracing of deployed messages: off by default, identifiers only when on, and the SuperNode
wrappers hand Flower's calls through unchanged."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from bench import deploy_timeline
from medfed.deploy import supernode
from protocol import hoptrace


@pytest.fixture
def trace(tmp_path, monkeypatch):
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(hoptrace.ENV, str(path))
    yield path
    for handler in list(hoptrace.log.handlers):      # leave the logger as found
        hoptrace.log.removeHandler(handler)
    hoptrace.log.propagate = True
    hoptrace.log.setLevel(logging.NOTSET)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_off_unless_the_variable_names_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv(hoptrace.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    hoptrace.hop("runner.pulled", "a" * 64, site="a")
    assert not hoptrace.enabled()
    assert not hoptrace.log.handlers
    assert list(tmp_path.iterdir()) == []


def test_a_line_carries_the_hop_a_short_id_and_small_ids_only(trace):
    hoptrace.hop("runner.pulled", "f" * 64, site="a", task=7)
    hoptrace.hop("serverapp.push")
    first, second = _lines(trace)
    assert set(first) == {"t", "hop", "msg", "pid", "site", "task"}
    assert first["msg"] == "f" * 12 and first["hop"] == "runner.pulled"
    assert second["msg"] == "" and second["t"] >= first["t"]
    assert oct(trace.stat().st_mode & 0o777) == "0o600"


def _message(mid, reply_to=""):
    meta = SimpleNamespace(message_id=mid, run_id=3, message_type="train",
                           reply_to_message_id=reply_to)
    return SimpleNamespace(metadata=meta)


def test_supernode_wrappers_pass_flowers_calls_through_and_count_objects(trace):
    calls = []

    def pull_and_store(**kw):          # what Flower's _pull_and_store_message does with them
        msg, _tree = kw["receive"]()
        kw["pull_object"](3, "o1")
        kw["pull_object"](3, "o2")
        kw["confirm_message_received"](3, msg.metadata.message_id)
        return 3

    def push_messages(**kw):
        kw["send"](_message("r" * 64, reply_to="m" * 64), "tree", 0.5)
        kw["push_object"](3, "s", "o", b"x")
        return "pushed"

    pull = supernode.traced_pull(pull_and_store)
    assert pull(receive=lambda: (_message("m" * 64), "tree"),
                pull_object=lambda run, oid: calls.append(("pull", run, oid)),
                confirm_message_received=lambda run, mid: calls.append(("confirm", run))) == 3
    push = supernode.traced_push(push_messages)
    assert push(send=lambda m, t, r: calls.append(("send", t, r)),
                push_object=lambda *a: calls.append(("push", *a))) == "pushed"
    assert calls == [("pull", 3, "o1"), ("pull", 3, "o2"), ("confirm", 3),
                     ("send", "tree", 0.5), ("push", 3, "s", "o", b"x")]
    hops = {x["hop"]: x for x in _lines(trace)}
    assert hops["supernode.received"]["msg"] == "m" * 12
    assert hops["supernode.received"]["kind"] == "train"
    assert hops["supernode.stored"]["pulls"] == 2
    assert hops["supernode.reply_seen"]["msg"] == "m" * 12      # traced under the instruction
    assert hops["supernode.replied"]["pushes"] == 1


def test_supernode_install_adds_the_tracing_wrappers_only_when_on(trace, monkeypatch):
    import flwr.supernode.start_client_internal as loop

    for name in ("time", "pull_objects", "_push_messages", "_pull_and_store_message",
                 "get_fused_config_from_fab"):
        monkeypatch.setattr(loop, name, getattr(loop, name))
    original = loop._pull_and_store_message
    supernode.install(0.5)
    assert loop._pull_and_store_message is not original
    monkeypatch.setattr(loop, "_pull_and_store_message", original)
    monkeypatch.delenv(hoptrace.ENV)
    supernode.install(0.5)
    assert loop._pull_and_store_message is original


def test_timeline_lines_up_one_exchange():
    m = "m" * 12
    lines = [
        {"t": 10.0, "hop": "serverapp.push", "msg": ""},
        {"t": 10.1, "hop": "supernode.received", "msg": m, "kind": "train"},
        {"t": 10.2, "hop": "serverapp.pushed", "msg": m},
        {"t": 10.15, "hop": "launcher.claimed", "msg": "", "site": "a"},
        {"t": 10.16, "hop": "runner.start", "msg": "", "site": "a"},
        {"t": 10.3, "hop": "supernode.stored", "msg": m},
        {"t": 10.4, "hop": "runner.pulled", "msg": m, "site": "a"},
        {"t": 11.4, "hop": "runner.handled", "msg": m, "site": "a"},
        {"t": 11.5, "hop": "supernode.replied", "msg": m},
        {"t": 11.7, "hop": "serverapp.collected", "msg": m},
        {"t": 12.0, "hop": "serverapp.push", "msg": ""},
    ]
    report = deploy_timeline.summarize(lines, skip_first_round=False)["train"]
    assert report["exchanges"] == 1
    assert report["exchange_ms"] == pytest.approx(1700, abs=0.2)
    assert report["after_last_reply_to_next_push_ms"] == pytest.approx(300, abs=0.2)
    assert report["hops"]["runner.handled"]["gap_ms"] == pytest.approx(1000, abs=0.2)
    assert report["hops"]["launcher.claimed"]["at_ms"] == pytest.approx(150, abs=0.2)
