"""Server checkpoints carry every wrapper's state: a restored run reports the site-level
epsilon an uninterrupted run reports (it used to restart at zero)."""

from __future__ import annotations

import numpy as np
import pytest

from server.checkpoint import Checkpointer, latest_checkpoint
from strategies.observed import ObservedStrategy, RoundRecord
from tests.strategies.rounds import (SITES, Grid, arrays, fedavg, guard, secagg_chain,
                                     site_dp_chain, train_round)

HASH = "cfg-hash"


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """Real Flower messages need the identity Flower sets in a running app."""


class Recorder:
    def __init__(self):
        self.records = []

    def on_train(self, record):
        self.records.append(record)

    def on_round_end(self, record):
        pass


def _rounds(guarded, rounds, *, offset=0, start=None, run_dir=None):
    """Run ``rounds`` observed rounds; with ``run_dir``, checkpoint after each (as a server
    does at the end of a round). Returns the records and the last global arrays."""
    recorder = Recorder()
    observers = [recorder]
    if run_dir is not None:
        observers.append(Checkpointer(run_dir, guarded, config_hash=HASH, mlflow_run_id="r"))
    strategy = ObservedStrategy(guarded, observers, round_offset=offset)
    current, grid = start or arrays(), Grid(SITES)
    for rnd in range(1, rounds + 1):
        current = train_round(strategy, rnd, current, grid)
        for observer in observers[1:]:
            observer.on_round_end(recorder.records[-1])
    return recorder.records, current


def test_site_level_dp_epsilon_after_a_restore_equals_an_uninterrupted_run(tmp_path):
    straight, _ = _rounds(site_dp_chain(), 3)
    interrupted, _ = _rounds(site_dp_chain(), 2, run_dir=tmp_path)

    checkpoint = latest_checkpoint(tmp_path, HASH)
    assert checkpoint.round == 2
    resumed_chain = site_dp_chain()            # the restarted server builds it afresh
    checkpoint.restore(resumed_chain)
    resumed, _ = _rounds(resumed_chain, 1, offset=checkpoint.round, start=checkpoint.arrays)

    assert [r.round for r in resumed] == [3]
    assert 0 < interrupted[-1].site_level_epsilon < straight[-1].site_level_epsilon
    assert resumed[-1].site_level_epsilon == pytest.approx(straight[-1].site_level_epsilon,
                                                           rel=1e-12)


def test_noise_on_the_secure_sum_keeps_its_epsilon_through_a_checkpoint(tmp_path):
    def release(chain):         # what SecAggPlus.aggregate_train does once per round
        chain.site_dp.add_noise(np.zeros(4, np.float32), contributors=SITES)

    straight = secagg_chain()
    for _ in range(3):
        release(straight)

    first = secagg_chain()
    checkpointer = Checkpointer(tmp_path, first, config_hash=HASH, mlflow_run_id="r")
    for rnd in (1, 2):
        release(first)
        record = RoundRecord(rnd, arrays=arrays())
        checkpointer.on_train(record)
        checkpointer.on_round_end(record)

    resumed = secagg_chain()
    latest_checkpoint(tmp_path, HASH).restore(resumed)
    assert resumed.site_dp.epsilon == first.site_dp.epsilon > 0
    release(resumed)
    assert resumed.site_dp.epsilon == pytest.approx(straight.site_dp.epsilon, rel=1e-12)


def test_a_checkpoint_from_before_per_wrapper_state_restores_the_aggregator(tmp_path):
    from flwr.serverapp.strategy import FedAvgM

    from server.checkpoint import Checkpoint, _rng_state

    momentum = [np.full(4, 0.5, np.float32), np.ones(2, np.float32)]
    legacy = {f"momentum_vector|list|{i:06d}": v for i, v in enumerate(momentum)}
    avgm = fedavg(cls=FedAvgM, server_momentum=0.9)
    Checkpoint(2, arrays(), legacy, _rng_state(), {}).restore(guard(avgm))
    for got, want in zip(avgm.momentum_vector, momentum):
        np.testing.assert_array_equal(got, want)


def test_a_checkpoint_decodes_the_global_model_once_for_its_file_and_digest(tmp_path,
                                                                             monkeypatch):
    """With no tracker asking first (tracking.log_models=false) the checkpoint's digest is
    taken from the arrays it decoded for its file, not decoded a second time; the digest
    is the model's."""
    from flwr.app import Array

    from server.checkpoint import arrays_digest

    record = RoundRecord(1, arrays=arrays())
    want = arrays_digest(record.arrays)
    decoded, real = [], Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(1) or real(self))
    checkpointer = Checkpointer(tmp_path, guard(fedavg()), config_hash=HASH, mlflow_run_id="r")
    checkpointer.on_train(record)
    checkpointer.on_round_end(record)
    assert len(decoded) == len(record.arrays)
    assert latest_checkpoint(tmp_path, HASH).manifest["arrays_sha256"] == record.arrays_sha256 \
        == want


def test_the_tracker_and_the_checkpoint_decode_the_rounds_global_model_once(tmp_path,
                                                                           monkeypatch):
    """The tracker's model and version digest and the checkpoint's file and digest come
    from one decode of the round's global arrays (each decode ~4 ms of the round loop's CPU
    for the demo model; it was three), and what each wrote is those arrays."""
    import mlflow
    import torch
    from flwr.app import Array, ArrayRecord

    from models.tasks import build
    from server import tracking
    from server.checkpoint import arrays_digest, latest_weights
    from server.config import load_experiment

    cfg = load_experiment(["experiment=smoke", f"runs_dir={tmp_path}"])
    torch.manual_seed(0)
    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options())
    record = RoundRecord(1, arrays=ArrayRecord(model.state_dict()))
    want = {k: a.numpy() for k, a in record.arrays.items()}
    registered = []             # the version's model and tags, as the writer is handed them

    def register(cfg, mlflow, client, run_id, writes, *args):
        registered.append(({k: v.numpy().copy() for k, v in writes.model.state_dict().items()},
                           dict(writes.version_tags)))
        return "1"

    monkeypatch.setattr(tracking, "register_version", register)
    tracker = tracking.MlflowTracker(cfg, tmp_path)          # no template traced ahead
    checkpointer = Checkpointer(tmp_path, guard(fedavg()), config_hash=HASH, mlflow_run_id="r")
    decoded, real = [], Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(1) or real(self))
    try:
        for observer in (tracker, checkpointer):
            observer.on_train(record)
        for observer in (tracker, checkpointer):
            observer.on_round_end(record)
        assert len(decoded) == len(record.arrays)
        monkeypatch.setattr(Array, "numpy", real)
        tracker.finish("")
    finally:
        mlflow.end_run()
    (state, tags), = registered
    assert state.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(state[key], value)
    assert tags["arrays_sha256"] == record.arrays_sha256 == arrays_digest(record.arrays) \
        == latest_checkpoint(tmp_path, HASH).manifest["arrays_sha256"]
    for key, value in latest_weights(tmp_path).items():
        np.testing.assert_array_equal(value, want[key])
