"""strategies.site_names: a site id is bound to one Flower node for a run."""

from __future__ import annotations

import logging

import pytest
from flwr.app import ConfigRecord

from protocol import wire
from strategies.observed import ObservedStrategy, RoundRecord
from strategies.site_names import SiteNames
from tests.strategies.rounds import SITES, Grid, arrays, fedavg, reply


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """Real Flower messages need the identity Flower sets in a running app."""


class _Recorder:
    def __init__(self):
        self.seen: list[RoundRecord] = []

    def on_train(self, record):
        self.seen.append(record)

    def on_round_end(self, record):
        pass


def _round(strategy, server_round: int, claims: dict[int, str], absent=()):
    """A training round whose node n names itself ``claims.get(n, f"site-{n}")``; the
    ``absent`` nodes do not reply."""
    sent = list(strategy.configure_train(server_round, arrays(), ConfigRecord(), Grid(SITES)))
    replies = []
    for m in sent:
        node = m.metadata.dst_node_id
        if node in absent:
            continue
        r = reply(m, {k: a.numpy() + 0.01 for k, a in m.content[wire.ARRAYS].items()})
        r.content[wire.SITE][wire.SITE_ID] = claims.get(node, f"site-{node}")
        replies.append(r)
    strategy.aggregate_train(server_round, replies)


def test_attack_a_node_taking_the_name_of_a_site_that_did_not_reply_is_flagged(caplog):
    """Attack: round 1, sites 1 and 3 answer as themselves (node 2 is not there yet);
    round 2, site-1 does not reply and node 2 answers as "site-1". Within round 2 it is the
    name's only claimant, so naming by each phase's claims alone put node 2's figures under
    site-1 in MLflow. The run bound site-1 to node 1: node 2 is shown as node-2, and the
    claim is logged and kept in the round record (which MLflow tags)."""
    recorder = _Recorder()
    strategy = ObservedStrategy(fedavg(), [recorder])
    _round(strategy, 1, {}, absent={2})
    caplog.set_level(logging.WARNING, logger="strategies.observed")
    _round(strategy, 2, {2: "site-1"}, absent={1})
    record = recorder.seen[-1]
    assert sorted((r.site_id, r.node_id) for r in record.train) == [("node-2", 2),
                                                                     ("site-3", 3)]
    assert [(r.node, r.site_id) for r in record.names_refused] == [(2, "site-1")]
    assert "which node 1 holds in this run: shown as node-2" in str(record.names_refused[0])
    assert [r.getMessage() for r in caplog.records if r.name == "strategies.observed"] == [
        f"site id refused: {record.names_refused[0]}"]
    _round(strategy, 3, {})          # everyone as themselves: site-1 is still node 1's
    assert sorted((r.site_id, r.node_id) for r in recorder.seen[-1].train) == [
        ("site-1", 1), ("site-2", 2), ("site-3", 3)]


def test_the_preflights_names_are_bound_before_round_1():
    """Node 2, which did not answer the preflight, answers round 1 with node 1's preflight
    name: node 1 keeps it, node 2 is shown as node-2."""
    recorder = _Recorder()
    strategy = ObservedStrategy(fedavg(), [recorder],
                                sites=SiteNames({1: "site-1", 3: "site-3"}))
    _round(strategy, 1, {2: "site-1"})
    assert sorted(r.site_id for r in recorder.seen[-1].train) == ["node-2", "site-1", "site-3"]
    assert [(r.node, r.site_id) for r in recorder.seen[-1].names_refused] == [(2, "site-1")]


def test_the_binding_rules():
    names = SiteNames({1: "a"})
    assert names.claim([(1, "a"), (2, "b")]) == []                        # held, then new
    assert names.bound() == {1: "a", 2: "b"}
    refused = names.claim([(3, "c"), (4, "c"), (5, "node-1"), (6, "x/../y"), (7, "node-7")])
    assert [(r.node, r.site_id) for r in refused] == [(3, "c"), (4, "c"), (5, "node-1")]
    assert names.claim([(3, "c")])[0].reason.startswith("which two nodes claimed at once")
    assert [names.name(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [
        "a", "b", "node-3", "node-4", "node-5", "node-6", "node-7"]
    (second,) = names.claim([(2, "d")])              # a node speaks for one site
    assert second.reason.startswith("but it holds 'b'") and names.name(2) == "b"
    assert "d" not in names.bound().values()
    with pytest.raises(ValueError, match="cannot be bound"):
        SiteNames({1: "a", 2: "a"})


def test_attack_the_guards_console_lines_name_the_node_not_the_site_it_claims(caplog, tmp_path):
    """Attack: the preflight bound site-1 to node 1; in round 1 node 1 does not reply and
    node 3 answers as "site-1" - the name's only claimant in the phase - with an extra record
    (stripped) and a NaN update (rejected). The guard named a reply by the id it claims, so
    the server console blamed site-1 for both. The chain ``server/federation.py`` builds is
    given the run's binding: the lines and the rejection name node-3."""
    from flwr.app import Message, MetricRecord, RecordDict

    from client.mods.faults import corrupt
    from server.config import load_experiment
    from server.federation import build_strategy
    from strategies.guard import GuardedStrategy
    from strategies.state import chain

    cfg = load_experiment(["experiment=smoke", f"data.root={tmp_path}", f"runs_dir={tmp_path}",
                           "federation.num_sites=3", "strategy.min_train_sites=1",
                           "tracking.log_models=false"])
    names = SiteNames({1: "site-1", 2: "site-2"})      # node 3 did not answer the preflight
    guarded = build_strategy(cfg, sites=names)
    strategy = ObservedStrategy(guarded, [_Recorder()], sites=names)
    replies = []
    for m in strategy.configure_train(1, arrays(), ConfigRecord(), Grid(SITES)):
        node = m.metadata.dst_node_id
        if node == 1:
            continue
        update = arrays({k: a.numpy() + 0.01 for k, a in m.content[wire.ARRAYS].items()})
        content = RecordDict({
            wire.ARRAYS: corrupt(update, "nan") if node == 3 else update,
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10}),
            wire.SITE: ConfigRecord({wire.SITE_ID: "site-1" if node == 3 else "site-2"})})
        if node == 3:
            content["evil"] = MetricRecord({"loss": 1e9})
        replies.append(Message(content=content, reply_to=m))
    with caplog.at_level(logging.WARNING, logger="strategies.guard"):
        strategy.aggregate_train(1, replies)
    lines = [r.getMessage() for r in caplog.records if r.name == "strategies.guard"]
    assert len(lines) == 2, lines
    assert "unexpected record(s) from node-3 left out" in lines[0]
    assert lines[1].startswith("round 1: rejected update from node-3: ")
    assert not any("site-1" in line for line in lines)
    guard = next(link for _, link in chain(guarded) if isinstance(link, GuardedStrategy))
    assert [(r.site_id, r.node) for r in guard.rejected] == [("node-3", 3)]
