"""ObservedStrategy: what the wrappers below it did reaches the round record."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from protocol import wire

from strategies.external import ExternalSites
from strategies.observed import ObservedStrategy, RoundRecord
from tests.strategies.rounds import SITES, Grid, arrays, fedavg, guard, train_round


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """Real Flower messages need the identity Flower sets in a running app."""


class _Recorder:
    """An observer keeping every training round's record in ``seen``."""

    def __init__(self, seen: list[RoundRecord]):
        self.seen = seen

    def on_train(self, record):
        self.seen.append(record)

    def on_round_end(self, record):
        pass


def test_a_rejection_behind_external_sites_reaches_the_round_record():
    """BUG 2: ExternalSites forwarded nothing, so the observer saw no rejection and no norm."""
    seen: list[RoundRecord] = []
    guarded = guard(fedavg(), max_update_norm=1.0)
    strategy = ObservedStrategy(ExternalSites(guarded), [_Recorder(seen)])

    def updates(node, current):        # site-2 sends a huge update: over the norm bound
        return {k: v + (100.0 if node == 2 else 0.01) for k, v in current.items()}

    train_round(strategy, 1, arrays(), Grid(SITES), updates)
    record = seen[-1]
    assert [(r.site_id, "exceeds bound" in r.reason) for r in record.rejected] == [("site-2", True)]
    assert sorted(record.update_norms) == ["site-1", "site-2", "site-3"]
    assert record.update_norms["site-2"] > 100


def _round_where_node_2_fails(strategy, server_round, current, reason):
    """A training round whose node 2 replies with an error carrying ``reason``."""
    from flwr.app import Error, Message

    from tests.strategies.rounds import reply

    sent = list(strategy.configure_train(server_round, current, ConfigRecord(), Grid(SITES)))
    for i, m in enumerate(sent):            # ids are set when the grid pushes them
        m.metadata.__dict__["_message_id"] = f"instruction-{i}"
    replies = [reply(m, {k: a.numpy() for k, a in m.content[wire.ARRAYS].items()})
               for m in sent if m.metadata.dst_node_id != 2]
    failed = next(m for m in sent if m.metadata.dst_node_id == 2)
    replies.append(Message(Error(code=0, reason=reason), reply_to=failed))
    strategy.aggregate_train(server_round, replies)


def test_a_failed_reply_is_recorded_under_the_site_id_its_node_answered_with_before():
    """A failure names its site from that node's earlier replies (what the console table and
    MLflow's ``site/<id>/train/dropped`` show), whatever text the error reason holds."""
    seen: list[RoundRecord] = []
    strategy = ObservedStrategy(fedavg(), [_Recorder(seen)])
    current = train_round(strategy, 1, arrays(), Grid(SITES))
    _round_where_node_2_fails(strategy, 2, current, "site-9 (node 9): a misleading reason")
    record = seen[-1]
    assert [(f.site, f.node) for f in record.failures["train"]] == [("site-2", 2)]
    assert record.dropped("train") == ["site-2"] and record.dropped("evaluate") == []
    assert str(record.failures["train"][0]) == "site-2 (node 2): site-9 (node 9): a misleading reason"


def test_a_site_claiming_another_sites_name_cannot_put_its_update_norm_under_it():
    """Attack: node 2 answers as "site-1" (node 1's name) with a huge update. Its norm must
    not stand under site-1 (MLflow ``site/site-1/train/update_norm``, the console), nor
    overwrite site-1's own: the guard keeps norms by node, the observer names them as the
    replies are named (a name two nodes claimed: node-<id> for both)."""
    from tests.strategies.rounds import reply

    seen: list[RoundRecord] = []
    strategy = ObservedStrategy(guard(fedavg(), max_update_norm=1.0), [_Recorder(seen)])
    sent = list(strategy.configure_train(1, arrays(), ConfigRecord(), Grid(SITES)))
    replies = []
    for m in sent:
        node = m.metadata.dst_node_id
        current = {k: a.numpy() for k, a in m.content[wire.ARRAYS].items()}
        r = reply(m, {k: v + (100.0 if node == 2 else 0.01) for k, v in current.items()})
        if node == 2:
            r.content[wire.SITE][wire.SITE_ID] = "site-1"
        replies.append(r)
    strategy.aggregate_train(1, replies)
    norms = seen[-1].update_norms
    assert sorted(norms) == ["node-1", "node-2", "site-3"]
    assert norms["node-2"] > 100 and norms["node-1"] < 1


def test_a_site_failing_in_round_1_is_named_by_what_it_answered_the_preflight_with():
    """Round 1: no reply of the run has named the failing node yet; the names the nodes
    answered the preflight with (``sites``) do (walkthrough finding: node id only)."""
    seen: list[RoundRecord] = []
    strategy = ObservedStrategy(fedavg(), [_Recorder(seen)], sites={2: "site-2"})
    _round_where_node_2_fails(strategy, 1, arrays(), "the ClientApp raised OSError")
    assert [(f.site, f.node) for f in seen[-1].failures["train"]] == [("site-2", 2)]


def test_a_round_failing_its_quorum_names_the_failed_sites_not_only_their_node_ids():
    """The run's error when too few sites trained named each failure ``node <id>`` only
    (walkthrough finding); the names the nodes answered the preflight with say which site."""
    from strategies.guard import GuardedStrategy, QuorumError

    strict = GuardedStrategy(fedavg(), min_available_sites=SITES, min_train_sites=SITES,
                             quorum_timeout=1)
    strategy = ObservedStrategy(strict, [_Recorder([])], sites={2: "site-2"})
    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::run()\n"
              "Exception ClientAppException occurred. Message: site-policy: budget spent'>")
    with pytest.raises(QuorumError) as failed:
        _round_where_node_2_fails(strategy, 1, arrays(), reason)
    assert str(failed.value).endswith("; site errors: site-2 (node 2): site-policy: budget "
                                      "spent"), str(failed.value)
