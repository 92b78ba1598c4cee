"""Every registered strategy, as ``server/federation.py`` builds it for an experiment (fault
guard and all), driven in-process through two rounds of real Flower messages; and the guard
excluding a garbage reply inside that chain. The Ray simulations in ``test_federation.py`` run
a representative few of these chains end to end."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.mods.faults import corrupt
from protocol import wire
from server.config import load_experiment
from server.federation import build_strategy
from strategies.registry import STRATEGIES
from tests.strategies.rounds import START, Grid, arrays

pytestmark = pytest.mark.usefixtures("task_identity")


def _chain(tmp_path, name: str):
    cfg = load_experiment(["experiment=smoke", f"data.root={tmp_path}", f"runs_dir={tmp_path}",
                           "federation.num_sites=3", f"strategy={name}",
                           "tracking.log_models=false"])
    return build_strategy(cfg)


def _round(strategy, rnd: int, current, garbage: str | None = None):
    """One train round: site n steps every array by 0.01 * n (site 3 sends ``garbage``)."""
    replies = []
    for m in strategy.configure_train(rnd, current, ConfigRecord(), Grid(3)):
        node = m.metadata.dst_node_id
        sent = {k: a.numpy() for k, a in m.content[wire.ARRAYS].items()}
        update = arrays({k: v + 0.01 * node for k, v in sent.items()})
        if garbage and node == 3:
            update = corrupt(update, garbage)
        replies.append(Message(content=RecordDict({
            wire.ARRAYS: update,
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10, wire.LOCAL_STEPS: 5,
                                        wire.DP_UNIT_WEIGHT: 1.0}),
            wire.SITE: ConfigRecord({wire.SITE_ID: f"site-{node}"})}), reply_to=m))
    new, _ = strategy.aggregate_train(rnd, replies)
    return new


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_chain_aggregates_two_rounds(name, tmp_path):
    strategy, current = _chain(tmp_path, name), arrays()
    for rnd in (1, 2):
        current = _round(strategy, rnd, current)
    assert current is not None, f"{name} produced no global model"
    out = {k: a.numpy() for k, a in current.items()}
    assert set(out) == set(START)
    for key, value in out.items():
        assert np.isfinite(value).all()
        # every site stepped every weight up: the aggregate moves up, never beyond two of the
        # largest steps plus a server optimiser's overshoot
        moved = value - START[key]
        assert (moved > 0).all() and (moved < 1.0).all(), (name, key, moved)


@pytest.mark.parametrize("mode", ["scale", "nan", "wrong-shape", "drop-key"])
def test_a_garbage_reply_is_left_out_of_the_aggregate(mode, tmp_path):
    strategy = _chain(tmp_path, "fedavg")
    new = _round(strategy, 1, arrays(), garbage=mode)
    out = {k: a.numpy() for k, a in new.items()}
    for key in START:        # the mean of sites 1 and 2 only: +0.015
        np.testing.assert_allclose(out[key], START[key] + 0.015, rtol=0, atol=1e-6)
