"""A malicious coordinator masks one round twice: after an honest secure-aggregation session
over four sites it runs a second session for the same round without the target. Each site
answers a repeated training round from its reply cache (never a second training), so without
protection the second session sums the same three updates and ``W_all avg_all - W_rest
avg_rest`` is the target's update in the clear (the control below recovers it). The sites bind
a round's cached update to the session that masked it; a second session is refused.

The sites are the real ClientApp (its mods, its train handler, its reply cache, malicious-
secure SecAgg+ with identity keys); the server is the real configured strategy chain, driven
by hand as a coordinator free to repeat a round would drive it.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict

import client.mods.secagg as secagg_mod_module
from client.app import make_client_app
from client.job import decode_job
from medfed.certs import site_keygen
from protocol import wire
from protocol.arrays import flat_delta
from protocol.secagg_protocol import SecAggError
from server.config import load_experiment
from server.federation import build_strategy, job_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("task_identity")]

TARGET = 1


class Sites:
    """Nodes 1..4: the real ClientApp, one persistent node state each; ``left_out`` nodes are
    not offered to the strategy (the coordinator simply does not invite them)."""

    def __init__(self, configs: list[dict]):
        self.app = make_client_app()
        self.contexts = {i: Context(run_id=5, node_id=i, node_config=c, state=RecordDict(),
                                    run_config={}) for i, c in enumerate(configs, 1)}
        self.run = SimpleNamespace(run_id=5)
        self.left_out: set[int] = set()
        self.errors: dict[int, str] = {}
        self.current = 0

    def get_node_ids(self):
        return [i for i in self.contexts if i not in self.left_out]

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            self.current = node = m.metadata.dst_node_id
            try:
                replies.append(self.app(m, self.contexts[node]))
            except Exception as err:            # what Flower sends back for a raising app
                self.errors[node] = str(err)
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=m))
        return replies


def _configs(tiny_sites, three_sites, tmp_path) -> list[dict]:
    root = tmp_path / "sites"
    sources = [tiny_sites / "site-0", *(three_sites / f"site-{i}" for i in range(3))]
    names = [f"site-{i}" for i in range(4)]
    for name, source in zip(names, sources):
        shutil.copytree(source, root / name)
    keys = {name: site_keygen(tmp_path / "keys" / name, site=name) for name in names}
    peers = tmp_path / "secagg-peers.pub"
    peers.write_text("".join(k.public.read_text() for k in keys.values()))
    # synthetic sites of 7-15 training studies: their operators report counts from 1
    return [{wire.NODE_DATA_DIR: str(root / name), wire.NODE_SITE_ID: name,
             wire.NODE_SECAGG_IDENTITY: str(keys[name].private),
             wire.NODE_SECAGG_PEERS: str(peers), wire.NODE_MIN_EVAL_SPLIT: 1}
            for name in names]


def _session(cfg, sites: Sites, start: ArrayRecord, config) -> tuple[np.ndarray, int]:
    """One secure-aggregation session of round 1: the flat average update and its weight."""
    strategy = build_strategy(cfg)
    summed = []                         # the secure sum's reply to the strategy inside
    inner = strategy.strategy.aggregate_train
    strategy.strategy.aggregate_train = lambda r, replies: inner(r, summed.extend(replies)
                                                                 or replies)
    sent = list(strategy.configure_train(1, start, config, sites))
    new, _ = strategy.aggregate_train(1, sites.send_and_receive(sent))
    if new is None:
        raise SecAggError("no aggregate")
    return flat_delta(start, new), int(summed[0].content[wire.METRICS][wire.NUM_EXAMPLES])


def _setup(tiny_sites, three_sites, tmp_path):
    cfg = load_experiment(["model=mmvit_tiny", "task.image_size=32", "train.local_epochs=1",
                           "train.batch_size=8", "secagg.enabled=true",
                           "federation.num_sites=4", "strategy.min_train_sites=3",
                           "strategy.min_available_sites=3", "federation.quorum_timeout=1",
                           "tracking.log_models=false", f"runs_dir={tmp_path / 'runs'}"])
    model, _ = decode_job(job_config(cfg), site_seed=0).build()
    start = ArrayRecord(model.state_dict())
    return cfg, Sites(_configs(tiny_sites, three_sites, tmp_path)), start, \
        job_config(cfg, run_id="run-twice")


def test_a_second_session_over_a_summed_round_is_refused(tiny_sites, three_sites, tmp_path):
    cfg, sites, start, config = _setup(tiny_sites, three_sites, tmp_path)
    _session(cfg, sites, start, config)                 # honest: all four, summed
    sites.left_out = {TARGET}
    with pytest.raises(SecAggError):
        _session(cfg, sites, start, config)
    assert set(sites.errors) == {2, 3, 4}
    assert all("answered once, as admitted" in e for e in sites.errors.values()), sites.errors


def test_control_without_the_session_binding_the_two_sums_give_the_update_away(
        tiny_sites, three_sites, tmp_path, monkeypatch):
    """The attack itself, with the sites' cached reply not bound to a session: the second
    session succeeds and the difference of the sums is the target's own update."""
    monkeypatch.setattr("client.app.update_protection", lambda msg, context: (
        secagg_mod_module.update_protection(msg, context)._replace(session="")))
    cfg, sites, start, config = _setup(tiny_sites, three_sites, tmp_path)
    updates: dict[int, np.ndarray] = {}
    plain = secagg_mod_module.flat_delta

    def seen(before, after):            # what each site masks (the test's eyes only)
        updates.setdefault(sites.current, plain(before, after))
        return updates[sites.current]

    monkeypatch.setattr(secagg_mod_module, "flat_delta", seen)
    average, weight = _session(cfg, sites, start, config)
    sites.left_out = {TARGET}
    rest, rest_weight = _session(cfg, sites, start, config)
    assert not sites.errors
    recovered = (weight * average - rest_weight * rest) / (weight - rest_weight)
    target = updates[TARGET]
    assert np.abs(recovered - target).max() < 1e-3 * np.abs(target).max()
