"""The guard against one site failing everyone's round through the shape of its reply (extra
or missing records and metric keys: Flower's consistency check raises for the whole round)
or standing for several sites (a secure-aggregation site count in a plain reply's metrics).
Real Flower messages through Flower's FedAvg behind the guard."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from models.metrics import SplitMetrics
from protocol import wire
from protocol.metrics import to_record
from strategies.guard import GuardedStrategy, QuorumError, SummedReply
from strategies.pooling import aggregate_evaluate_records

pytestmark = pytest.mark.usefixtures("task_identity")

REF = {"w": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
HONEST = {"loss": 0.5, wire.TRAIN_SECONDS: 2.0}          # what every honest site reports


def _update(site: int) -> dict[str, np.ndarray]:
    return {k: v + 0.01 * site for k, v in REF.items()}


def _message(node: int, records: dict) -> Message:
    """A reply from node ``node`` (site ``site-<node>``) carrying ``records``."""
    sent = Message(content=RecordDict({wire.CONFIG: ConfigRecord()}), dst_node_id=node,
                   message_type="train")
    records = records | {wire.SITE: ConfigRecord({wire.SITE_ID: f"site-{node}"})}
    return Message(content=RecordDict(records), reply_to=sent)


def _train_reply(node: int, metrics: dict | None = None, **extra) -> Message:
    arrays = ArrayRecord({k: Array(v) for k, v in _update(node).items()})
    metrics = HONEST | {wire.NUM_EXAMPLES: 10} if metrics is None else metrics
    return _message(node, {wire.ARRAYS: arrays, wire.METRICS: MetricRecord(metrics)} | extra)


def _guard(inner=None, min_train_sites: int = 2) -> GuardedStrategy:
    guard = GuardedStrategy(inner or FedAvg(weighted_by_key=wire.NUM_EXAMPLES),
                            min_available_sites=1, min_train_sites=min_train_sites,
                            quorum_timeout=1)
    guard._reference, guard._dtypes = REF, {k: v.dtype for k, v in REF.items()}
    return guard


EVIL = ArrayRecord({k: Array(np.full_like(v, 1e6)) for k, v in REF.items()})

# what the attacking site (node 9, first among the replies) sends instead of an honest reply
TRAIN_ATTACKS = {
    "extra ArrayRecord": dict(extra={"evil": EVIL}),
    "extra MetricRecord": dict(extra={"evil": MetricRecord({"loss": 1e9})}),
    "extra metric key": dict(metrics=HONEST | {wire.NUM_EXAMPLES: 10, "evil": 1.0}),
    "missing metric key": dict(metrics={wire.NUM_EXAMPLES: 10}),
    "list for a number": dict(metrics=HONEST | {wire.NUM_EXAMPLES: 10, "loss": [1.0, 2.0]}),
}
REJECTED = {"missing metric key": "metrics lack 2 key(s) the other sites send (first: 'loss')",
            "list for a number": "metric 'loss' is a list of 2, the other sites send a number"}


@pytest.mark.parametrize("attack", sorted(TRAIN_ATTACKS))
def test_attack_one_sites_reply_shape_does_not_fail_the_train_round(attack):
    """Without the guard's reply shape (reply_shape), Flower raises
    InconsistentMessageReplies here and the round fails for every site. With it, extras are
    stripped (the attacker's update counts, its extras nowhere: the aggregate is the plain
    mean of four updates) and a reply lacking what the honest majority sends, or sending it
    in another form, is rejected. The attacker replies first: a rule that took the first
    reply's keys as the round's would let it choose them."""
    args = TRAIN_ATTACKS[attack]
    attacker = _train_reply(9, args.get("metrics"), **args.get("extra", {}))
    guard = _guard()
    arrays, metrics = guard.aggregate_train(1, [attacker, *map(_train_reply, (1, 2, 3))])
    if attack in REJECTED:
        assert [(r.site_id, r.reason) for r in guard.rejected] == [("site-9", REJECTED[attack])]
        counted = (1, 2, 3)
    else:
        assert guard.rejected == []
        counted = (9, 1, 2, 3)
    for key, value in REF.items():
        expected = np.mean([_update(n)[key] for n in counted], axis=0)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=0, atol=1e-6)
    assert set(metrics) == set(HONEST)
    assert metrics["loss"] == pytest.approx(0.5)


def test_two_disagreeing_sites_lose_the_disputed_metric_not_the_round():
    """No majority: the key only one of two sites sends is left out, for both."""
    guard = _guard()
    _, metrics = guard.aggregate_train(1, [_train_reply(9, {wire.NUM_EXAMPLES: 10}),
                                           _train_reply(1)])
    assert guard.rejected == [] and dict(metrics) == {}


def _evaluate_reply(node: int, auroc: float | None = 0.7, **changes) -> Message:
    metrics = MetricRecord({wire.NUM_EXAMPLES: 10, wire.EVAL_SECONDS: 1.0})
    for split in wire.EVAL_SPLITS:
        metrics.update(to_record(SplitMetrics(n=5, loss=0.4, auroc=auroc), split))
    extra = changes.pop("extra", {})
    for key, value in changes.items():
        if value is None:
            del metrics[key]
        else:
            metrics[key] = value
    return _message(node, {wire.METRICS: metrics} | extra)


EVALUATE_ATTACKS = {
    "extra MetricRecord": dict(extra={"evil": MetricRecord({"val-loss": 1e9})}),
    "extra metric key": {"evil": 1.0},
    "missing metric key": {"val-loss": None},
    "list for a number": {"val-loss": [0.1, 0.2]},
    "missing weight": {wire.NUM_EXAMPLES: None},
}


@pytest.mark.parametrize("attack", sorted(EVALUATE_ATTACKS))
def test_attack_one_sites_reply_shape_does_not_fail_the_evaluation(attack):
    """The same through the evaluate path (the pooled evaluation MedFed's strategies use).
    Honest sites' AUROC lists differ in length ([] where undefined): not a disagreement."""
    inner = FedAvg(weighted_by_key=wire.NUM_EXAMPLES,
                   evaluate_metrics_aggr_fn=aggregate_evaluate_records)
    guard = _guard(inner)
    attacker = _evaluate_reply(9, **EVALUATE_ATTACKS[attack])
    honest = [_evaluate_reply(1), _evaluate_reply(2, auroc=None), _evaluate_reply(3)]
    metrics = guard.aggregate_evaluate(1, [attacker, *honest])
    rejected = [r.site_id for r in guard.evaluate_rejected]
    assert rejected == ([] if attack.startswith("extra") else ["site-9"])
    assert metrics["val-n"] == (15 if rejected else 20)   # 5 per site
    assert metrics["val-loss"] == pytest.approx(0.4)


def test_attack_a_nan_evaluation_weight_is_left_out_not_averaged():
    """Flower's default evaluate aggregation weighs every metric by num-examples: one NaN
    weight made every evaluation figure of the round NaN."""
    guard = _guard(FedAvg(weighted_by_key=wire.NUM_EXAMPLES))
    replies = [_message(n, {wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: w, "acc": 0.8})})
               for n, w in ((9, float("nan")), (1, 10), (2, 10))]
    metrics = guard.aggregate_evaluate(1, replies)
    assert [r.site_id for r in guard.evaluate_rejected] == ["site-9"]
    assert metrics["acc"] == pytest.approx(0.8)


def test_attack_a_site_cannot_count_as_several_towards_the_quorum():
    """A plain reply claiming to be a secure sum of 5 sites counted as 5 towards
    min_train_sites: one site alone made a round that needs 2. It counts as 1."""
    claims = _train_reply(9, HONEST | {wire.NUM_EXAMPLES: 10, wire.SECAGG_SITES: 5})
    with pytest.raises(QuorumError, match="1 usable update"):
        _guard(min_train_sites=2).aggregate_train(1, [claims])


def test_attack_a_nan_site_count_is_no_failed_round():
    """int(nan) raised ValueError out of the guard: the round failed. (Alone, the site is
    its round's majority, so its key is not stripped: the count itself is ignored.)"""
    claims = _train_reply(9, HONEST | {wire.NUM_EXAMPLES: 10,
                                       wire.SECAGG_SITES: float("nan")})
    guard = _guard(min_train_sites=1)
    arrays, _ = guard.aggregate_train(1, [claims])
    assert guard.rejected == []
    np.testing.assert_allclose(arrays["w"].numpy(), _update(9)["w"])


@pytest.mark.parametrize("sites, sampled, ok", [(3, 3, True), (1, 3, True), (4, 3, False),
                                                (0, 3, False), (True, 3, False)])
def test_a_secure_sum_counts_as_its_sites_within_those_sampled(sites, sampled, ok):
    """Only a SummedReply (made by the server's SecAgg+ wrapper) stands for several sites,
    and never for more than the round sampled or fewer than one."""
    honest = _train_reply(1)
    summed = SummedReply(honest.content, reply_to=Message(
        content=RecordDict(), dst_node_id=1, message_type="train"), sites=sites)
    guard = _guard(min_train_sites=3)
    guard._sampled = sampled
    if ok and sites >= 3:
        guard.aggregate_train(1, [summed])
        assert guard.rejected == []
        return
    with pytest.raises(QuorumError) as failed:
        guard.aggregate_train(1, [summed])
    assert ("secure sum of" in str(failed.value)) == (not ok)


@pytest.mark.parametrize("weight, reason", [
    (float("nan"), "dp-unit-weight nan is not a finite number >= 0"),
    (2.0, "dp-unit-weight 2.0 is not 1.0 (site-level DP: one vote per site)"),
    (0.0, "dp-unit-weight 0.0 is not 1.0 (site-level DP: one vote per site)")])
def test_attack_a_unit_weight_other_than_one_under_site_level_dp_is_rejected(weight, reason):
    """Site-level DP weighs by dp-unit-weight, and Flower's DP wrapper sits between the
    guard and FedAvg: the guard checked num-examples instead, and the wrapper's accounted
    aggregation raised ValueError (the round failed) on a NaN, zero or unequal unit weight.
    The weight checked is the aggregating strategy's, found down the chain. (With a reply
    left out, Flower's strict DP accounting skips the round: no aggregate, no failure.)"""
    from tests.strategies.rounds import Grid, arrays, reply, site_dp_chain

    guard = site_dp_chain()
    sent = list(guard.configure_train(1, arrays(), ConfigRecord(), Grid()))
    replies = [reply(m, {k: a.numpy() + 0.01 for k, a in m.content[wire.ARRAYS].items()})
               for m in sent]
    replies[0].content[wire.METRICS][wire.DP_UNIT_WEIGHT] = weight
    new, _ = guard.aggregate_train(1, replies)
    site = f"site-{sent[0].metadata.dst_node_id}"
    assert [(r.site_id, r.reason) for r in guard.rejected] == [(site, reason)]
    assert new is None


# ---------------------------------------------------------------- weight 0, site ids

def test_a_site_with_nothing_to_train_on_is_not_rejected_for_the_figures_it_cannot_send():
    """A site with no training study replies weight 0 and no train figures (client.engine):
    it neither votes on the round's keys nor is rejected for lacking them (filled with 0,
    which its weight 0 keeps out of every mean)."""
    empty = _train_reply(4, {wire.NUM_EXAMPLES: 0, wire.TRAIN_SECONDS: 0.1})
    guard = _guard()
    arrays, metrics = guard.aggregate_train(1, [empty, *map(_train_reply, (1, 2))])
    assert guard.rejected == []
    assert metrics["loss"] == pytest.approx(0.5)
    for key, value in REF.items():
        expected = np.mean([_update(n)[key] for n in (1, 2)], axis=0)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=0, atol=1e-6)
    # with one other site, its vote would leave the honest site's figures without a majority
    guard = _guard(min_train_sites=1)
    empty = _train_reply(4, {wire.NUM_EXAMPLES: 0, wire.TRAIN_SECONDS: 0.1})   # unfilled
    _, metrics = guard.aggregate_train(1, [empty, _train_reply(1)])
    assert guard.rejected == [] and metrics["loss"] == pytest.approx(0.5)


def test_a_round_where_no_site_had_anything_to_train_on_keeps_the_model():
    """Every accepted weight 0: FedAvg would divide by their sum and fail the round."""
    replies = [_train_reply(n, {wire.NUM_EXAMPLES: 0, **HONEST}) for n in (1, 2)]
    assert _guard().aggregate_train(1, replies) == (None, None)


@pytest.mark.parametrize("claimed", ["site/../x", "a" * 65, "", "tab\there", 7])
def test_attack_a_site_id_that_is_not_a_plain_name_is_replaced_by_the_node_id(claimed):
    """The claimed id names MLflow metrics and tags and console rows; an odd one could fail
    the tracker's writer (and with it the run)."""
    from strategies.observed import site_replies

    attacker = _train_reply(9, HONEST | {wire.NUM_EXAMPLES: 10, "loss": [1.0, 2.0]})
    attacker.content[wire.SITE] = ConfigRecord({wire.SITE_ID: claimed})
    guard = _guard()
    guard.aggregate_train(1, [attacker, *map(_train_reply, (1, 2))])
    assert [r.site_id for r in guard.rejected] == ["node-9"]
    ok, _ = site_replies([attacker])
    assert [r.site_id for r in ok] == ["node-9"]


def test_attack_observers_see_only_numbers_in_a_training_sites_figures():
    """A rejected reply's list under an agreed key must not reach the per-site MLflow metric
    (the tracker logs float(value): a list would fail its writer, then the run)."""
    from strategies.observed import ObservedStrategy

    seen = []

    class Keep:
        def on_train(self, record):
            seen.append(record)

        def on_round_end(self, record):
            pass

    observed = ObservedStrategy(_guard(), [Keep()])
    attacker = _train_reply(9, HONEST | {wire.NUM_EXAMPLES: 10, "loss": [1.0, 2.0]})
    observed.aggregate_train(1, [attacker, *map(_train_reply, (1, 2))])
    (record,) = seen
    assert {r.site_id for r in record.train} == {"site-9", "site-1", "site-2"}
    for reply in record.train:
        assert all(isinstance(v, float) for v in reply.metrics.values()), reply


def test_a_rejected_secure_sum_is_named_as_one_not_after_the_site_it_replies_for(caplog):
    """A SummedReply answers the first summed site's instruction, so its node is that
    site's: named by node, a rejected sum blamed that one site on the console and in MLflow.
    It is ``secure-sum``, with no node."""
    from strategies.guard import SECURE_SUM
    from strategies.site_names import SiteNames

    content = _train_reply(1).content
    del content[wire.SITE]                              # the server's sum names no site
    summed = SummedReply(content, reply_to=Message(
        content=RecordDict(), dst_node_id=1, message_type="train"), sites=4)
    guard = _guard(min_train_sites=1)
    guard.sites, guard._sampled = SiteNames({1: "site-1"}), 3
    with caplog.at_level("WARNING", logger="strategies.guard"), \
            pytest.raises(QuorumError, match="0 usable"):
        guard.aggregate_train(1, [summed])
    assert [(r.site_id, r.node) for r in guard.rejected] == [(SECURE_SUM, None)]
    assert "rejected update from secure-sum: a secure sum of 4 sites" in caplog.text
    assert "site-1" not in caplog.text
