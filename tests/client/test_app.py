"""The ClientApp's train handler end to end on one site: what a round's job asks for is what
the reply carries."""

from __future__ import annotations

import shutil

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from client.app import make_client_app
from client.job import decode_job
from protocol import wire
from server.config import load_experiment
from server.federation import job_config
from tests.client.test_runtime import _context

SMALL = ["model=mmvit_tiny", "task.image_size=32", "train.local_epochs=1", "train.batch_size=8",
         "federation.num_rounds=3", "train.head_only_rounds=1"]


def _train_message(overrides: list[str], server_round: int) -> Message:
    """Round ``server_round``'s train request of run ``run-1``, with the initial weights."""
    record = job_config(load_experiment(overrides), "run-1")
    record[wire.SERVER_ROUND] = server_round
    model, _ = decode_job(record, site_seed=0).build()
    content = RecordDict({wire.CONFIG: record, wire.ARRAYS: ArrayRecord(model.state_dict())})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


@pytest.fixture
def site_dir(tiny_sites, tmp_path):
    shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0")
    return tmp_path / "site-0"


@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dp-sgd"])
def test_the_site_trains_the_head_alone_in_the_head_only_rounds_it_derives_from_the_job(
        site_dir, private, task_identity, caplog):
    """``train.head_only_rounds=1``: the reply to round 1 differs from the sent weights in the
    class head only; round 2 trains the whole model. The site derives which from the job's
    round itself (nothing but the setting travels)."""
    app = make_client_app()
    context = _context(site_dir)
    overrides = SMALL + (["privacy=dpsgd", "privacy.epsilon=50"] if private else [])
    if private:
        context.node_config.update({wire.NODE_DP_EPSILON: 100.0, wire.NODE_DP_DELTA: 1e-5})
    changed = {}
    for server_round in (1, 2):
        msg = _train_message(overrides, server_round)
        assert wire.HEAD_ONLY_ROUNDS in msg.content[wire.CONFIG]
        sent = msg.content[wire.ARRAYS].to_torch_state_dict()
        with caplog.at_level("INFO"):
            reply = app(msg, context)
        assert not reply.has_error(), reply.error
        back = reply.content[wire.ARRAYS].to_torch_state_dict()
        changed[server_round] = {k for k in sent if not torch.equal(sent[k], back[k])}
    assert changed[1] == {"head.weight", "head.bias"}
    assert changed[2] - changed[1]
    assert "round 1: trained on" in caplog.text and "(the class head alone)" in caplog.text


def test_the_site_reads_each_drawn_study_as_many_times_as_the_job_asks(site_dir, monkeypatch,
                                                                       task_identity):
    """``privacy.augmentation_multiplicity=3`` travels to the site and reaches its DP-SGD
    batches: with the same (test-mode) Poisson draws, every step's batch holds three rows per
    drawn study where k = 1 holds one (their order, and the clipper grouping them:
    test_dpsgd.py)."""
    import client.engine as engine

    sizes: list[int] = []

    def collate(items):
        sizes.append(len(items))
        return default_collate(items)
    default_collate = engine.default_collate
    monkeypatch.setattr(engine, "default_collate", collate)
    app, rows = make_client_app(), {}
    for k in (1, 3):
        copy = shutil.copytree(site_dir, site_dir.parent / f"k{k}" / site_dir.name)  # own ledger
        context = _context(copy)
        context.node_config.update({wire.NODE_DP_EPSILON: 100.0, wire.NODE_DP_DELTA: 1e-5,
                                    wire.NODE_DP_SECURE_MODE: False})
        sizes.clear()
        msg = _train_message([*SMALL[:-1], "privacy=dpsgd", "privacy.epsilon=50",
                              f"privacy.augmentation_multiplicity={k}"], 1)
        assert msg.content[wire.CONFIG][wire.DP_AUGMENTATION_MULTIPLICITY] == k
        reply = app(msg, context)
        assert not reply.has_error(), reply.error
        rows[k] = list(sizes)
    assert rows[1] and sum(rows[1]) > 0
    assert rows[3] == [3 * n for n in rows[1]]
