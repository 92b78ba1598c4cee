"""FedNova: Flower's FedAvg on step-normalised updates."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from server.config import ConfigError, load_experiment, validate
from protocol import wire
from strategies.fednova import FedNova

@pytest.fixture(autouse=True)
def _run_identity(monkeypatch):
    # building a Message outside a running Flower app needs the run/node/task identity Flower sets
    from flwr.supercore.task_identity import TaskIdentity
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


START = {"w": np.zeros(4, np.float32), "count": np.array([7], np.int64)}


def _reply(node: int, arrays: dict, metrics: dict) -> Message:
    sent = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          wire.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=sent)


def _aggregate(strategy, replies):
    strategy._global = ArrayRecord({k: Array(v.copy()) for k, v in START.items()})
    arrays, _ = strategy.aggregate_train(1, replies)
    return {k: a.numpy() for k, a in arrays.items()}


def test_sites_count_by_their_data_not_by_data_times_steps():
    # fixed-size (Adam-like) steps: site a takes 10 steps along d_a, site b 30 along d_b
    d_a, d_b = np.array([1, 0, 0, 0], np.float32), np.array([0, 1, 0, 0], np.float32)
    replies = lambda: [  # noqa: E731 - fresh messages: FedNova rewrites replies in place
        _reply(1, {"w": 10 * d_a, "count": START["count"] + 1},
               {wire.NUM_EXAMPLES: 10, wire.LOCAL_STEPS: 10.0}),
        _reply(2, {"w": 30 * d_b, "count": START["count"] + 1},
               {wire.NUM_EXAMPLES: 30, wire.LOCAL_STEPS: 30.0})]
    nova = _aggregate(FedNova(weighted_by_key=wire.NUM_EXAMPLES,
                              arrayrecord_key=wire.ARRAYS), replies())
    tau_eff = (10 * 10 + 30 * 30) / 40
    np.testing.assert_allclose(nova["w"], tau_eff * (0.25 * d_a + 0.75 * d_b), rtol=1e-6)
    assert nova["count"].tolist() == [8]                 # non-float arrays as FedAvg has them
    # FedAvg gives site a a tenth of the direction (10*10 vs 30*30), FedNova its data share
    from flwr.serverapp.strategy import FedAvg
    plain = _aggregate(FedAvg(weighted_by_key=wire.NUM_EXAMPLES, arrayrecord_key=wire.ARRAYS),
                       replies())
    assert plain["w"][0] / plain["w"].sum() == pytest.approx(0.1)
    assert nova["w"][0] / nova["w"].sum() == pytest.approx(0.25)


def test_equal_steps_is_fedavg():
    replies = lambda: [_reply(i, {"w": np.full(4, i, np.float32), "count": START["count"]},  # noqa: E731
                              {wire.NUM_EXAMPLES: 5 * i, wire.LOCAL_STEPS: 4.0}) for i in (1, 2)]
    from flwr.serverapp.strategy import FedAvg
    kwargs = dict(weighted_by_key=wire.NUM_EXAMPLES, arrayrecord_key=wire.ARRAYS)
    np.testing.assert_allclose(_aggregate(FedNova(**kwargs), replies())["w"],
                               _aggregate(FedAvg(**kwargs), replies())["w"], rtol=1e-6)


def test_a_reply_without_local_steps_is_a_clear_error():
    strategy = FedNova(weighted_by_key=wire.NUM_EXAMPLES, arrayrecord_key=wire.ARRAYS)
    with pytest.raises(ValueError, match="steps"):
        _aggregate(strategy, [_reply(1, dict(START), {wire.NUM_EXAMPLES: 3})])


def test_the_guard_rejects_a_reply_without_local_steps_and_aggregates_the_rest():
    from strategies.guard import GuardedStrategy
    strategy = FedNova(weighted_by_key=wire.NUM_EXAMPLES, arrayrecord_key=wire.ARRAYS)
    guard = GuardedStrategy(strategy, min_available_sites=1, min_train_sites=2, quorum_timeout=1)
    guard._reference = dict(START)
    guard._dtypes = {k: v.dtype for k, v in START.items()}
    strategy._global = ArrayRecord({k: Array(v.copy()) for k, v in START.items()})
    good = [_reply(i, {"w": np.full(4, i, np.float32), "count": START["count"]},
                   {wire.NUM_EXAMPLES: 5, wire.LOCAL_STEPS: 4.0}) for i in (1, 2)]
    stepless = _reply(3, {"w": np.full(4, 9, np.float32), "count": START["count"]},
                      {wire.NUM_EXAMPLES: 5, wire.LOCAL_STEPS: 0.0})
    arrays, _ = guard.aggregate_train(1, [*good, stepless])
    assert len(guard.rejected) == 1 and "steps" in guard.rejected[0].reason
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, 1.5), rtol=1e-6)


@pytest.mark.parametrize("overrides", [["secagg.enabled=true"], ["privacy=sitedp"]])
def test_fednova_is_refused_where_the_server_cannot_rescale_individual_updates(overrides):
    with pytest.raises(ConfigError, match="fednova"):
        validate(load_experiment(["strategy=fednova", *overrides]))
