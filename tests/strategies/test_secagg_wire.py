"""SecAgg+ over real Flower messages, in process: ``SecAggPlus`` (server) drives the site's
``secagg_mod`` behind the site's error mod, through a stand-in grid that can tamper with what
it relays. Fast; the multi-process simulation is in test_secagg_federation.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.mods.errors import generic_errors_mod
from client.mods.secagg import secagg_mod
from protocol import wire
from protocol.arrays import view
from protocol.secagg_encoding import Encoding
from protocol.secagg_protocol import SecAggConfig, SecAggError
from strategies.secagg import SecAggPlus
from tests.strategies.rounds import arrays

pytestmark = pytest.mark.usefixtures("task_identity")

ENC = Encoding(clip_range=0.5, max_sites=10, max_weight=1000)
RUN = 1                 # the task_identity fixture's run
START = {"w": np.zeros(6, np.float32)}


def step(node: int) -> np.ndarray:
    return np.linspace(-0.1, 0.1, 6).astype(np.float32) * (node % 7 + 1) / 10


class SiteGrid:
    """Nodes 1..n are simulated partitions 0..n-1 running the site's mods; ``tamper(stage,
    message)`` may rewrite what the coordinator relays; ``offline`` maps node -> stage."""

    def __init__(self, n: int, *, node_config=None, tamper=None, offline=None):
        self.nodes = list(range(1, n + 1))
        self.run = SimpleNamespace(run_id=RUN)
        self.contexts = {i: Context(run_id=RUN, node_id=i, node_config={
            "partition-id": i - 1, "num-partitions": n} | (node_config or {}),
            state=RecordDict(), run_config={}) for i in self.nodes}
        self.tamper, self.offline = tamper, offline or {}
        self.errors: list[str] = []

    def get_node_ids(self):
        return list(self.nodes)

    def deliver(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        request = msg.content.config_records.get(wire.SECAGG)
        stage = (request or msg.content.config_records.get(wire.CONFIG, {})).get(
            wire.SECAGG_STAGE)
        if self.offline.get(node) == stage:
            return None
        if self.tamper:
            msg = self.tamper(stage, msg)
        try:
            return generic_errors_mod(msg, self.contexts[node], lambda m, c: secagg_mod(
                m, c, lambda m2, c2: self.train(node, m2, c2)))
        except Exception as err:        # what Flower turns a ClientApp exception into
            self.errors.append(str(err))
            return Message(Error(code=0, reason=str(err)), reply_to=msg)

    def train(self, node: int, m: Message, context: Context) -> Message:
        """The site's train handler behind its mods: a fixed step per node."""
        update = {k: view(a) + step(node) for k, a in m.content[wire.ARRAYS].items()}
        return Message(RecordDict({wire.ARRAYS: arrays(update), wire.METRICS: MetricRecord(
            {wire.NUM_EXAMPLES: 10})}), reply_to=m)

    def send_and_receive(self, messages, timeout):
        return [r for r in map(self.deliver, messages) if r is not None]


def secure_round(grid: SiteGrid, **config):
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=3,
                   min_available_nodes=3, arrayrecord_key=wire.ARRAYS,
                   configrecord_key=wire.CONFIG)
    strategy = SecAggPlus(inner, SecAggConfig(encoding=ENC, **config))
    sent = list(strategy.configure_train(1, arrays(START), ConfigRecord(), grid))
    replies = [r for r in map(grid.deliver, sent) if r is not None]
    new, _ = strategy.aggregate_train(1, replies)
    return view(new["w"])


def test_honest_round_with_a_dropout_equals_the_survivors_average():
    grid = SiteGrid(6, offline={4: wire.SECAGG_MASKED})
    average = secure_round(grid)
    expected = np.mean([step(i) for i in grid.nodes if i != 4], axis=0)
    assert np.abs(average - expected).max() <= ENC.resolution
    assert not grid.errors


def test_attack_a_small_clip_range_reveals_no_sites_count_of_large_values():
    """The coordinator picks clip_range 0.012 to learn how many of each site's update values
    exceed it. No reply carries a count (before: each site's own count, in plaintext, exact);
    the server reads the total over the sites from the secure sum's header."""
    seen = {}
    grid = SiteGrid(4)
    deliver = grid.deliver

    def watched(msg):
        reply = deliver(msg)
        if reply is not None and reply.has_content():
            seen.setdefault(msg.metadata.dst_node_id, []).append(
                dict(reply.content.metric_records.get(wire.METRICS, {})))
        return reply

    grid.deliver = watched
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=3,
                   min_available_nodes=3, arrayrecord_key=wire.ARRAYS,
                   configrecord_key=wire.CONFIG)
    strategy = SecAggPlus(inner, SecAggConfig(encoding=Encoding(clip_range=0.012, max_sites=10,
                                                                max_weight=1000)))
    sent = list(strategy.configure_train(1, arrays(START), ConfigRecord(), grid))
    strategy.aggregate_train(1, [r for r in map(grid.deliver, sent) if r is not None])
    large = {i: int((np.abs(step(i)) > 0.012).sum()) for i in grid.nodes}
    assert len(set(large.values())) > 1 and not grid.errors    # the sites differ
    replies = [m for node in seen.values() for m in node]
    assert replies and all(wire.SECAGG_CLIPPED not in m for m in replies)
    assert strategy.clipped == sum(large.values())


def test_attack_a_masked_reply_carries_no_plaintext_statistic_of_the_sites_data():
    """The coordinator reads what rides beside each masked update. The site's training
    reported its example count, loss, accuracy, steps and DP sample rate (each a statistic of
    its data that the secure sum exists to hide, or its size): none is sent; the count is
    inside the masked vector, so the average is still weighted by it. The site's epsilon and
    its compute time are sent."""
    seen, grid = [], SiteGrid(4)
    counts = {i: 10 * i for i in grid.nodes}
    deliver = grid.deliver

    def train(node, m, context):
        update = {k: view(a) + step(node) for k, a in m.content[wire.ARRAYS].items()}
        return Message(RecordDict({wire.ARRAYS: arrays(update), wire.METRICS: MetricRecord({
            wire.NUM_EXAMPLES: counts[node], "train_loss": 0.1 * node, "train_acc": 0.5,
            "steps": 3.0 * node, wire.DP_STEPS: 3.0 * node, wire.DP_SAMPLE_RATE: 8 / counts[node],
            wire.TRAIN_SECONDS: 1.5, wire.DP_EPSILON: 2.0})}), reply_to=m)

    def watched(msg):
        reply = deliver(msg)
        if reply is not None and reply.has_content() and wire.ARRAYS in reply.content:
            seen.append(dict(reply.content.metric_records.get(wire.METRICS, {})))
        return reply

    grid.train, grid.deliver = train, watched
    average = secure_round(grid)
    assert len(seen) == 4 and not grid.errors
    assert all(m == {wire.TRAIN_SECONDS: 1.5, wire.DP_EPSILON: 2.0} for m in seen), seen
    expected = sum(counts[i] * step(i) for i in grid.nodes) / sum(counts.values())
    assert np.abs(average - expected).max() <= ENC.resolution


def test_a_relay_swapping_one_key_is_refused_by_every_peer_in_one_line():
    def swap(stage, msg):
        if stage == wire.SECAGG_SHARE:
            request = msg.content.config_records[wire.SECAGG]
            keys = list(request[wire.SECAGG_PK_ENC])
            keys[list(request[wire.SECAGG_NODES]).index("2")] = bytes(31) + b"\x09"
            request[wire.SECAGG_PK_ENC] = keys
        return msg

    grid = SiteGrid(5, tamper=swap)
    with pytest.raises(SecAggError, match="shared their keys"):
        secure_round(grid)
    assert len(grid.errors) == 5 and all("\n" not in e for e in grid.errors)
    assert sorted(e.split(": ")[1] for e in grid.errors) == ["secagg-forged-key"] * 4 + [
        "secagg-own-key-replaced"]                      # node 2 sees its own key replaced
    assert sum("participant 2 presents" in e for e in grid.errors) == 4


def test_a_relay_dropping_the_session_fields_is_refused_as_missing_not_as_forged():
    def strip(stage, msg):
        if stage == wire.SECAGG_SHARE:
            request = msg.content.config_records[wire.SECAGG]
            del request[wire.SECAGG_SESSION_KEYS]
            del request[wire.SECAGG_SIGNATURES]
        return msg

    grid = SiteGrid(4, tamper=strip)
    with pytest.raises(SecAggError, match="shared their keys"):
        secure_round(grid)
    assert len(grid.errors) == 4 and all(e.startswith(
        "site-policy: secagg-missing-field: participant ") and "without its signature, "
        "session key;" in e for e in grid.errors), grid.errors


def test_semi_honest_mode_only_where_the_site_allows_it():
    grid = SiteGrid(4)
    with pytest.raises(SecAggError):
        secure_round(grid, authenticated=False)
    assert grid.errors and all(e.startswith("site-policy: secagg-semi-honest: ")
                               for e in grid.errors)
    grid = SiteGrid(4, node_config={wire.NODE_SECAGG_SEMI_HONEST: True})
    average = secure_round(grid, authenticated=False)
    expected = np.mean([step(i) for i in grid.nodes], axis=0)
    assert np.abs(average - expected).max() <= ENC.resolution


def test_a_site_floor_on_contributors_is_the_sites_not_the_servers():
    grid = SiteGrid(4, node_config={wire.NODE_SECAGG_MIN_CONTRIBUTORS: 5})
    with pytest.raises(SecAggError):
        secure_round(grid)
    assert grid.errors and all(e.startswith("site-policy: secagg-parameters: 4 participants")
                               for e in grid.errors)


def test_the_run_session_lives_in_the_node_state_and_is_verified_once_per_run(monkeypatch):
    """Through the mods: round 1 verifies each peer's endorsement against the registration
    list; round 2 reuses the verified session keys from the node's state (no P-384 check) and
    still aggregates exactly; the session's private key is in the node's state only."""
    import protocol.secagg_identity as identity_module

    checks = []
    real_check = identity_module.Registry.check
    monkeypatch.setattr(identity_module.Registry, "check",
                        lambda self, *a: checks.append(a[0]) or real_check(self, *a))
    grid = SiteGrid(4)
    expected = np.mean([step(i) for i in grid.nodes], axis=0)
    assert np.abs(secure_round(grid) - expected).max() <= ENC.resolution
    assert len(checks) == 4 * 3                     # each site, each of its 3 peers, once
    sessions = {i: bytes(c.state[wire.SECAGG_SESSION_STATE]["key"])
                for i, c in grid.contexts.items()}
    assert np.abs(secure_round(grid) - expected).max() <= ENC.resolution
    assert len(checks) == 12 and not grid.errors    # round 2: no endorsement checked again
    assert all(bytes(c.state[wire.SECAGG_SESSION_STATE]["key"]) == sessions[i]
               for i, c in grid.contexts.items())


def _npy(shape, descr="<u4", fortran=False) -> bytes:
    import io

    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue()


FORGED_MASKED = {
    "truncated": lambda a: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:-8]),
    "not numpy": lambda a: Array(dtype=a.dtype, shape=a.shape, stype="torch", data=a.data),
    # np.load would allocate the header's shape (8 TiB here) before finding the data missing
    "huge fortran header": lambda a: Array(dtype=a.dtype, shape=a.shape, stype=a.stype,
                                           data=_npy((2**41,), fortran=True) + bytes(16)),
    "garbage header": lambda a: Array(dtype=a.dtype, shape=a.shape, stype=a.stype,
                                      data=b"\x93NUMPY\x01\x00\x10\x00{'descr': (((" + bytes(8)),
}


@pytest.mark.parametrize("forgery", sorted(FORGED_MASKED))
def test_attack_a_site_sending_an_undecodable_masked_vector_is_excluded_not_fatal(forgery):
    """One site's masked bytes never fail the coordinator's secure round (nor make it
    allocate what a forged header claims): that site is left out like a dropout and the
    others' average comes out."""
    import tracemalloc

    grid = SiteGrid(6)
    deliver = grid.deliver

    def forge(msg):
        reply = deliver(msg)
        stage = msg.content.config_records.get(wire.CONFIG, {}).get(wire.SECAGG_STAGE)
        if msg.metadata.dst_node_id == 4 and stage == wire.SECAGG_MASKED:
            record = reply.content.array_records[wire.ARRAYS]
            record[wire.SECAGG_MASKED_ARRAY] = FORGED_MASKED[forgery](
                record[wire.SECAGG_MASKED_ARRAY])
        return reply

    grid.deliver = forge
    tracemalloc.start()
    try:
        average = secure_round(grid)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = np.mean([step(i) for i in grid.nodes if i != 4], axis=0)
    assert np.abs(average - expected).max() <= ENC.resolution
    assert peak < 64 * 2**20


@pytest.mark.parametrize("required, ok", [(3, True), (4, False)])
def test_the_guard_counts_a_secure_sum_as_the_sites_inside_it(required, ok):
    """Behind SecAgg+ the guard sees one reply, the server's SummedReply: it counts as the
    sites summed into it (4 sites, one dropped: 3) towards min_train_sites - a count no
    site's own reply can claim (test_guard_replies)."""
    from strategies.guard import GuardedStrategy, QuorumError

    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=4,
                   min_available_nodes=4, arrayrecord_key=wire.ARRAYS,
                   configrecord_key=wire.CONFIG)
    guard = GuardedStrategy(inner, min_available_sites=1, min_train_sites=required,
                            quorum_timeout=1)
    strategy = SecAggPlus(guard, SecAggConfig(encoding=ENC))
    grid = SiteGrid(4, offline={2: wire.SECAGG_MASKED})
    sent = list(strategy.configure_train(1, arrays(START), ConfigRecord(), grid))
    replies = [r for r in map(grid.deliver, sent) if r is not None]
    if not ok:
        with pytest.raises(QuorumError, match="3 usable update"):
            strategy.aggregate_train(1, replies)
        return
    new, _ = strategy.aggregate_train(1, replies)
    expected = np.mean([step(i) for i in grid.nodes if i != 2], axis=0)
    assert np.abs(view(new["w"]) - expected).max() <= ENC.resolution
    assert guard.rejected == []
