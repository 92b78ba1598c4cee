"""One site's malformed evaluation values must not fail everyone's evaluation round, nor
crash the observers (console, MLflow) that see every reply, nor choose per-site metric keys.
Real Flower messages through Flower's FedAvg with MedFed's pooled evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import MetricRecord
from flwr.serverapp.strategy import FedAvg

from models.metrics import SplitMetrics
from protocol import wire
from protocol.metrics import to_record
from server.console import ConsoleTable
from strategies.external import ExternalSites
from strategies.observed import ObservedStrategy, RoundRecord
from strategies.pooling import aggregate_evaluate_records
from tests.strategies.test_guard_replies import HONEST, _guard, _message, _train_reply

pytestmark = pytest.mark.usefixtures("task_identity")

CONFUSION = np.array([[3, 1], [0, 1]])          # n = 5


def _values(split: str, **changes) -> MetricRecord:
    metrics = to_record(SplitMetrics(n=5, loss=0.4, confusion=CONFUSION, auroc=0.7,
                                     means={"dice": 0.5}, counts={"n_reports": 2.0}), split)
    for key, value in changes.items():
        metrics[f"{split}-{key}"] = value
    return metrics


def _evaluate_reply(node: int, split_changes: dict | None = None,
                    splits=wire.EVAL_SPLITS):
    metrics = MetricRecord({wire.NUM_EXAMPLES: 10, wire.EVAL_SECONDS: 1.0})
    for split in splits:
        # the attack is in the first split (val, or external) only
        metrics.update(_values(split, **(split_changes or {}) if split == splits[0] else {}))
    return _message(node, {wire.METRICS: metrics})


def _pooled_guard():
    return _guard(FedAvg(weighted_by_key=wire.NUM_EXAMPLES,
                         evaluate_metrics_aggr_fn=aggregate_evaluate_records))


HUGE = 2**49
# what the attacking site (node 9, first) sends in its val split instead of honest values
ATTACKS = {
    "auroc out of [0, 1]": {"auroc": [2.0]},
    "auroc list of two": {"auroc": [0.5, 0.5]},
    "confusion of another shape": {"confusion": [1, 1, 1, 1, 1, 0, 0, 0, 0],
                                   "confusion-shape": [3, 3]},
    "confusion list of the wrong length": {"confusion": [1, 2, 2]},
    "negative counts": {"confusion": [6, -1, 0, 0]},
    "NaN count": {"confusion": [3.0, float("nan"), 1.0, 1.0]},
    "NaN n": {"n": float("nan")},
    "NaN mean": {"mean-dice": float("nan")},
    "infinite mean": {"mean-dice": float("inf")},
    "infinite seconds": {"seconds": float("inf")},
    "huge n": {"n": float(2 * HUGE), "confusion": [HUGE, 0, 0, HUGE]},
    "huge count": {"count-n_reports": 1e300},
}


def _honest() -> list:
    return [_evaluate_reply(n) for n in (1, 2, 3)]


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_one_sites_evaluation_values_do_not_fail_the_round(attack):
    """Before: pooling raised ValueError (``auroc must be in [0, 1]``, different confusion
    shapes) out of aggregate_evaluate - every site's evaluation round failed - or pooled a
    NaN/huge value into every figure. Now the site is left out, counted, and the pooled
    figures are those of the honest sites alone."""
    guard = _pooled_guard()
    metrics = guard.aggregate_evaluate(1, [_evaluate_reply(9, ATTACKS[attack]), *_honest()])
    assert [(r.site_id, r.node) for r in guard.evaluate_rejected] == [("site-9", 9)]
    expected = aggregate_evaluate_records([m.content for m in _honest()], wire.NUM_EXAMPLES)
    assert dict(metrics) == pytest.approx(dict(expected))
    assert metrics["val-n"] == 15 and metrics["val-dice"] == pytest.approx(0.5)


@pytest.mark.parametrize("attack", ["auroc out of [0, 1]", "confusion of another shape"])
def test_attack_pooling_without_the_guard_leaves_the_site_out_too(attack):
    """The pooling (Flower's evaluate_metrics_aggr_fn) raised on its own; a strategy
    without the guard in front of it failed the round."""
    records = [_evaluate_reply(9, ATTACKS[attack]).content] + [m.content for m in _honest()]
    metrics = aggregate_evaluate_records(records, wire.NUM_EXAMPLES)
    assert metrics["val-n"] == 15 and metrics["test-n"] == 15


def test_two_sites_that_disagree_on_shapes_lose_the_pooled_figures_not_the_round():
    guard = _pooled_guard()
    replies = [_evaluate_reply(9, ATTACKS["confusion of another shape"]), _evaluate_reply(1)]
    assert guard.aggregate_evaluate(1, replies) is None     # no replies left: Flower logs none
    assert sorted(r.site_id for r in guard.evaluate_rejected) == ["site-1", "site-9"]


class _Recorder:
    def __init__(self):
        self.train: RoundRecord | None = None
        self.end: RoundRecord | None = None

    def on_train(self, record):
        self.train = record

    def on_round_end(self, record):
        self.end = record


def test_attack_observers_see_only_the_evaluations_the_guard_accepted():
    """Before: the console and the tracker decoded every site's raw evaluate reply
    (``from_record``) and raised on the attacker's: the round failed even with pooling
    fixed. Now the refused reply is in ``evaluate_rejected`` and shown as such."""
    recorder = _Recorder()
    strategy = ObservedStrategy(_pooled_guard(), [ConsoleTable(), recorder])
    strategy.aggregate_evaluate(1, [_evaluate_reply(9, {"auroc": [2.0]}), *_honest()])
    record = recorder.end
    assert [r.site_id for r in record.evaluate] == ["site-1", "site-2", "site-3"]
    assert [(r.site_id, r.node) for r in record.evaluate_rejected] == [("site-9", 9)]
    assert "auroc" in record.evaluate_rejected[0].reason


def test_attack_an_external_sites_malformed_evaluation_reaches_no_observer():
    """External sites' replies reach no pooling, only the observers, which decoded them."""
    recorder = _Recorder()
    external = ExternalSites(_pooled_guard())
    external.roles = {9: wire.ROLE_EXTERNAL, 1: wire.ROLE_TRAIN, 2: wire.ROLE_TRAIN,
                      3: wire.ROLE_TRAIN}
    strategy = ObservedStrategy(external, [ConsoleTable(), recorder])
    attacker = _evaluate_reply(9, {"auroc": [2.0]}, splits=(wire.EXTERNAL_SPLIT,))
    strategy.aggregate_evaluate(1, [attacker, *_honest()])
    assert [r.site_id for r in recorder.end.evaluate] == ["site-1", "site-2", "site-3"]
    assert [r.site_id for r in recorder.end.evaluate_rejected] == ["site-9"]


def test_an_honest_external_site_still_reaches_the_observers():
    recorder = _Recorder()
    external = ExternalSites(_pooled_guard())
    external.roles = {9: wire.ROLE_EXTERNAL}
    strategy = ObservedStrategy(external, [ConsoleTable(), recorder])
    honest = _evaluate_reply(9, splits=(wire.EXTERNAL_SPLIT,))
    strategy.aggregate_evaluate(1, [honest, *_honest()])
    assert [r.site_id for r in recorder.end.evaluate] == ["site-1", "site-2", "site-3", "site-9"]
    assert recorder.end.evaluate_rejected == []
    assert "external-n" in recorder.end.evaluate[-1].metrics


def test_attack_a_site_chooses_no_per_site_metric_key():
    """Before: every key of a site's train reply became ``site/<id>/train/<key>`` in MLflow
    (and a per-site figure), however many and whatever their names; now only the keys a
    majority of the round's replies carry."""
    recorder = _Recorder()
    strategy = ObservedStrategy(_guard(), [recorder])
    extra = {f"evil-{i}": 1.0 for i in range(50)}
    strategy.aggregate_train(1, [_train_reply(9, HONEST | {wire.NUM_EXAMPLES: 10} | extra),
                                 *map(_train_reply, (1, 2, 3))])
    keys = {site.site_id: set(site.metrics) for site in recorder.train.train}
    assert keys["site-9"] == keys["site-1"] == set(HONEST) | {wire.NUM_EXAMPLES}


def test_the_codec_refuses_mean_names_that_are_no_short_words():
    """Mean and count names become MLflow keys (per site and pooled)."""
    from protocol.metrics import from_record

    record = dict(_values("val"))
    record["val-mean-../../x"] = 1.0
    with pytest.raises(ValueError, match="not a short lower-case word"):
        from_record(record, "val")
    assert math.isclose(from_record(_values("val"), "val").means["dice"], 0.5)


def test_round_report_carries_the_evaluate_rejections():
    guard = _pooled_guard()
    guard.aggregate_evaluate(1, [_evaluate_reply(9, {"auroc": [2.0]}), *_honest()])
    assert [r.site_id for r in guard.round_report()["evaluate_rejected"]] == ["site-9"]


def test_attack_is_left_out_by_the_strategy_the_server_builds(tmp_path):
    """The guard checks evaluations where its aggregating strategy pools them: the chain
    ``server/federation.py`` builds from an experiment config (not a hand-made test chain)."""
    from server.config import load_experiment
    from server.federation import build_strategy
    from strategies.guard import GuardedStrategy
    from strategies.state import chain

    cfg = load_experiment(["experiment=smoke", f"runs_dir={tmp_path}"])
    strategy = build_strategy(cfg)
    guard = next(link for _, link in chain(strategy) if isinstance(link, GuardedStrategy))
    metrics = strategy.aggregate_evaluate(1, [_evaluate_reply(9, {"auroc": [2.0]}), *_honest()])
    assert [r.site_id for r in guard.evaluate_rejected] == ["site-9"]
    assert metrics["val-n"] == 15


def test_attack_is_left_out_behind_the_site_level_dp_wrapper():
    """Under site-level DP Flower's DP wrapper sits between the guard and the pooling."""
    from strategies.sitedp import SiteLevelDP
    from tests.strategies.rounds import fedavg, guard

    inner = fedavg(wire.DP_UNIT_WEIGHT, evaluate_metrics_aggr_fn=aggregate_evaluate_records)
    guarded = guard(SiteLevelDP(inner, noise_multiplier=1.0, clipping_norm=1.0, num_sites=3,
                                delta=1e-5))
    replies = [_evaluate_reply(9, {"auroc": [2.0]}), *_honest()]
    for msg in replies:
        msg.content[wire.METRICS][wire.DP_UNIT_WEIGHT] = 1.0
    metrics = guarded.aggregate_evaluate(1, replies)
    assert [r.site_id for r in guarded.evaluate_rejected] == ["site-9"]
    assert metrics["val-n"] == 15


def test_attack_an_external_site_cannot_report_training_splits():
    """An external node that answers with val/test splits would have been pooled into the
    training sites' figures by the console and the tracker (which pool per split)."""
    recorder = _Recorder()
    external = ExternalSites(_pooled_guard())
    external.roles = {9: wire.ROLE_EXTERNAL}
    strategy = ObservedStrategy(external, [ConsoleTable(), recorder])
    strategy.aggregate_evaluate(1, [_evaluate_reply(9), *_honest()])
    assert [r.site_id for r in recorder.end.evaluate] == ["site-1", "site-2", "site-3"]
    assert [r.site_id for r in recorder.end.evaluate_rejected] == ["site-9"]


# ---------------------------------------------------------------- review repros (session 21)

def _empty_evaluate_reply(node: int):
    """An honest site without evaluation studies: weight 0, every key (empty splits)."""
    metrics = MetricRecord({wire.NUM_EXAMPLES: 0, wire.EVAL_SECONDS: 0.1})
    for split in wire.EVAL_SPLITS:
        metrics.update(to_record(SplitMetrics(n=0, loss=0.0, confusion=np.zeros((2, 2), int),
                                              means={"dice": 0.0},
                                              counts={"n_reports": 0.0}), split))
    return _message(node, {wire.METRICS: metrics})


def test_attack_a_site_without_evaluation_studies_keeps_its_vote():
    """Evaluation replies always carry the whole key set: an honest site with weight 0
    still votes, so an attacker sending almost nothing cannot outvote the two honest ones
    and have both refused."""
    guard = _pooled_guard()
    attacker = _message(9, {wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 5})})
    guard.aggregate_evaluate(1, [attacker, _evaluate_reply(1), _empty_evaluate_reply(2)])
    assert [r.site_id for r in guard.evaluate_rejected] == ["site-9"]


def test_attack_a_refused_reply_does_not_choose_the_keys_observers_keep():
    """A refused reply does not vote on the per-site keys: with it voting, an honest site's
    split figures were cut away and the console's decode raised ('val-n' is missing)."""
    recorder = _Recorder()
    strategy = ObservedStrategy(_pooled_guard(), [ConsoleTable(), recorder])
    attacker = _message(9, {wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: -1})})
    strategy.aggregate_evaluate(1, [attacker, _evaluate_reply(1), _empty_evaluate_reply(2)])
    assert [r.site_id for r in recorder.end.evaluate_rejected] == ["site-9"]
    assert "val-n" in recorder.end.evaluate[0].metrics


def test_attack_a_rejected_update_does_not_cut_an_honest_sites_train_figures():
    recorder = _Recorder()
    """Two updates the guard refuses (NaN weights) omit the figures: voting with the two
    honest replies they left those without a majority, and cut from the honest sites."""
    from flwr.app import Array, ArrayRecord

    from tests.strategies.test_guard_replies import REF

    recorder = _Recorder()
    strategy = ObservedStrategy(_guard(), [recorder])
    attackers = [_train_reply(n, {wire.NUM_EXAMPLES: 10, "loss": [1.0, 2.0]}) for n in (8, 9)]
    for attacker in attackers:
        attacker.content[wire.ARRAYS] = ArrayRecord(
            {k: Array(np.full_like(v, np.nan)) for k, v in REF.items()})
    strategy.aggregate_train(1, [*attackers, _train_reply(1), _train_reply(2)])
    assert {r.site_id for r in recorder.train.rejected} == {"site-8", "site-9"}
    figures = {r.site_id: set(r.metrics) for r in recorder.train.train}
    assert figures["site-1"] == figures["site-2"] == set(HONEST) | {wire.NUM_EXAMPLES}
    assert "loss" not in figures["site-9"]          # a list: never a per-site figure


def test_a_round_without_an_aggregated_evaluation_reports_no_old_rejections():
    from flwr.app import ArrayRecord, ConfigRecord

    from tests.strategies.rounds import Grid

    guard = _pooled_guard()
    guard.aggregate_evaluate(1, [_evaluate_reply(9, {"auroc": [2.0]}), *_honest()])
    assert guard.evaluate_rejected and guard.round_report()["evaluate_rejected"]
    guard.quorum_timeout, guard.min_available_sites = 0, 0
    guard.configure_evaluate(2, ArrayRecord(), ConfigRecord(), Grid(3))
    assert guard.round_report()["evaluate_rejected"] == []


def test_attack_a_site_claiming_another_sites_name_writes_under_neither():
    recorder = _Recorder()
    strategy = ObservedStrategy(_pooled_guard(), [recorder])
    spoof = _evaluate_reply(9)
    spoof.content[wire.SITE][wire.SITE_ID] = "site-1"
    strategy.aggregate_evaluate(1, [spoof, *_honest()])
    assert sorted(r.site_id for r in recorder.end.evaluate) == [
        "node-1", "node-9", "site-2", "site-3"]


def test_a_task_with_more_classes_than_the_wire_carries_is_refused_at_config():
    from models.metrics import MAX_CATEGORIES
    from models.tasks import ClassificationConfig

    ClassificationConfig(num_classes=MAX_CATEGORIES)
    with pytest.raises(ValueError, match="num_classes must be in"):
        ClassificationConfig(num_classes=MAX_CATEGORIES + 1)


def test_attack_a_refused_evaluations_site_id_is_not_printed_as_sent(caplog):
    """The pooling's log line names the refused site only by a plain id: a forged one (a
    line break, a fake log record) is not written to the server's log."""
    from flwr.app import RecordDict

    attacker = _evaluate_reply(9, {"auroc": [2.0]})
    attacker.content[wire.SITE][wire.SITE_ID] = "x\nINFO forged line"
    records = [RecordDict(m.content) for m in [attacker, *_honest()]]
    with caplog.at_level("WARNING", logger="strategies.pooling"):
        aggregate_evaluate_records(records, wire.NUM_EXAMPLES)
    assert "left out of the pooled metrics" in caplog.text
    assert "forged line" not in caplog.text


def test_attack_a_refused_evaluation_is_logged_by_its_nodes_name_not_the_one_it_claims(caplog):
    """Attack: the run bound site-1 and site-2 to nodes 1 and 2, which do not evaluate this
    round; training node 9 answers as "site-1" and external node 8 as "site-2", each with
    an AUROC of 2 (refused). The guard and ``ExternalSites`` named a refused reply by its
    claim: the console blamed site-1 and site-2. Given the run's binding, they name the
    nodes."""
    import logging

    from strategies.site_names import SiteNames

    names = SiteNames({1: "site-1", 2: "site-2"})
    guard = _pooled_guard()
    guard.sites = names
    external = ExternalSites(guard, sites=names)
    external.roles = {8: wire.ROLE_EXTERNAL}
    recorder = _Recorder()
    strategy = ObservedStrategy(external, [recorder], sites=names)
    training = _evaluate_reply(9, {"auroc": [2.0]})
    outside = _evaluate_reply(8, {"auroc": [2.0]}, splits=(wire.EXTERNAL_SPLIT,))
    for msg, claim in ((training, "site-1"), (outside, "site-2")):
        msg.content[wire.SITE][wire.SITE_ID] = claim
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_evaluate(1, [training, outside,
                                        *(_evaluate_reply(n) for n in (3, 4, 5))])
    lines = [r.getMessage() for r in caplog.records
             if r.name in ("strategies.guard", "medfed.server")]
    assert len(lines) == 2, lines
    assert any("evaluation from node-9 left out" in line for line in lines)
    assert any("evaluation from external site node-8 left out" in line for line in lines)
    assert not any("site-1" in line or "site-2" in line for line in lines)
    assert [r.site_id for r in guard.evaluate_rejected] == ["node-9"]
    assert [r.site_id for r in external.rejected] == ["node-8"]
