"""Drive a server strategy chain through rounds in-process: a stand-in grid, real Flower
messages (tests using these need the ``task_identity`` fixture to build them)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from protocol import wire
from protocol.secagg_encoding import Encoding
from protocol.secagg_protocol import SecAggConfig
from strategies.guard import GuardedStrategy
from strategies.secagg import SecAggPlus, SumNoise
from strategies.sitedp import SiteLevelDP

SITES = 3
START = {"w": np.zeros(4, np.float32), "b": np.ones(2, np.float32)}


class Grid:
    """Connected nodes 1..n; every node answers a role query as a training site."""

    def __init__(self, n: int = 3):
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout):
        out = []
        for m in messages:
            site = ConfigRecord({wire.SITE_ID: f"site-{m.metadata.dst_node_id}",
                                 wire.NODE_ROLE: wire.ROLE_TRAIN})
            out.append(SimpleNamespace(has_error=lambda: False, has_content=lambda: True,
                                       content=RecordDict({wire.SITE: site}),
                                       metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id)))
        return out


def arrays(values: dict[str, np.ndarray] = START) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v, copy=True)) for k, v in values.items()})


def reply(sent: Message, update: dict[str, np.ndarray]) -> Message:
    """A site's train reply to ``sent``: its update, unit weight, and who it is."""
    node = sent.metadata.dst_node_id
    content = RecordDict({
        wire.ARRAYS: arrays(update),
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10, wire.DP_UNIT_WEIGHT: 1.0}),
        wire.SITE: ConfigRecord({wire.SITE_ID: f"site-{node}"})})
    return Message(content=content, reply_to=sent)


def train_round(strategy, server_round: int, global_arrays: ArrayRecord, grid: Grid,
                updates=None) -> ArrayRecord:
    """One configure/aggregate train round; ``updates(node, global) -> arrays`` (default: a
    small step, different per site)."""
    def small_step(node, current):
        return {k: v + 0.01 * node for k, v in current.items()}

    updates = updates or small_step
    sent = list(strategy.configure_train(server_round, global_arrays, ConfigRecord(), grid))
    replies = []
    for m in sent:                      # a site trains what it was sent (partial sharing)
        current = {k: a.numpy() for k, a in m.content[wire.ARRAYS].items()}
        replies.append(reply(m, updates(m.metadata.dst_node_id, current)))
    new, _ = strategy.aggregate_train(server_round, replies)
    return new


def fedavg(weight=wire.NUM_EXAMPLES, cls=FedAvg, **extra):
    return cls(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=SITES,
               min_available_nodes=SITES, weighted_by_key=weight, arrayrecord_key=wire.ARRAYS,
               configrecord_key=wire.CONFIG, **extra)


def guard(inner, **kwargs):
    return GuardedStrategy(inner, min_available_sites=SITES, min_train_sites=1,
                           quorum_timeout=1, **kwargs)


def site_dp_chain():
    """What server/federation.py builds for privacy=sitedp without secure aggregation."""
    return guard(SiteLevelDP(fedavg(wire.DP_UNIT_WEIGHT), noise_multiplier=1.0,
                              clipping_norm=1.0, num_sites=SITES, delta=1e-5))


def secagg_chain():
    """... and with secure aggregation: the noise is added to the secure sum."""
    encoding = Encoding(clip_range=1.0, max_sites=SITES, max_weight=100)
    return SecAggPlus(guard(fedavg(wire.DP_UNIT_WEIGHT)), SecAggConfig(
        degree=2, threshold=2, encoding=encoding), site_dp=SumNoise(
            noise_multiplier=1.0, clipping_norm=1.0, num_sites=SITES, delta=1e-5))
