"""Site privacy controls against a malicious coordinator: each test plays the coordinator,
sends a crafted message to a real ClientApp (or the site's ledger), and checks that the
site's promise holds."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import make_client_app
from protocol import wire
from protocol.job import JobSpec, TrainConfig
from tests.conftest import CLASSES


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def _job(**changes) -> JobSpec:
    fields = dict(model_name="mmvit", model_options={"dim": 32, "depth": 1, "num_classes": 3},
                  task_name="classification", task_options={"num_classes": 3},
                  class_names=CLASSES, image_size=32,
                  train=TrainConfig(local_epochs=1, batch_size=8, lr=0.01, seed=3), seed=3)
    return JobSpec(**(fields | changes))


def _train_message(job: JobSpec, config: dict, records: dict | None = None) -> Message:
    model, _ = job.build()
    content = RecordDict({wire.CONFIG: ConfigRecord(dict(job.to_record()) | config),
                          wire.ARRAYS: ArrayRecord(model.state_dict())} | (records or {}))
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


# ------------------------------------------------- 1. require-secagg, decided at egress

def test_a_config_claiming_a_masked_round_cannot_extract_plaintext_weights(tiny_sites,
                                                                         task_identity):
    """The coordinator says "masked" in the job config (so the train handler's policy check
    passes) but sends a SecAgg record without a stage (so the SecAgg mod does not mask)."""
    node = {wire.NODE_DATA_DIR: str(tiny_sites / "site-0"), wire.NODE_SITE_ID: "s0",
            wire.NODE_REQUIRE_SECAGG: True}
    crafted = _train_message(_job(), {wire.SECAGG_STAGE: wire.SECAGG_MASKED,
                                      wire.SECAGG_NODES: [], wire.SECAGG_CIPHERTEXTS: []},
                             {wire.SECAGG: ConfigRecord({wire.SECAGG_ROUND: 1})})
    app = make_client_app()
    reply = None
    with pytest.raises(Exception, match="requires secure aggregation") as refused:
        reply = app(crafted, _context(node))
    assert reply is None, "a train reply left the site"
    assert "site-policy" in str(refused.value)


def test_without_require_secagg_the_same_site_trains_in_plaintext(tiny_sites, task_identity):
    """Control for the test above: the refusal comes from the site's policy, not a crash."""
    node = {wire.NODE_DATA_DIR: str(tiny_sites / "site-0"), wire.NODE_SITE_ID: "s0"}
    reply = make_client_app()(_train_message(_job(), {}), _context(node))
    assert not reply.has_error() and len(reply.content[wire.ARRAYS]) > 1


# ------------------------------------------------- 4. error replies are generic

def test_a_handler_error_with_site_details_leaves_as_a_generic_code(tiny_sites, task_identity,
                                                                   monkeypatch, caplog):
    secret_path, secret_count = "/hospital/pacs/patient-4711/series.dcm", "98765"
    import client.app as site_app

    def leaky(*args, **kwargs):
        raise OSError(f"cannot read {secret_path}: {secret_count} studies indexed")

    monkeypatch.setattr(site_app, "node_settings", leaky)     # fails inside the train handler
    node = {wire.NODE_DATA_DIR: str(tiny_sites / "site-0"), wire.NODE_SITE_ID: "s0"}
    with pytest.raises(Exception) as failed:
        make_client_app()(_train_message(_job(), {}), _context(node))
    reason = f"{type(failed.value)}:<'{failed.value}'>"      # what Flower sends back
    assert secret_path not in reason and secret_count not in reason
    assert "hospital" not in reason and "site-failure" in reason
    assert secret_path in caplog.text        # the detail stays in the site's own log


def test_policy_refusals_keep_their_reason(tiny_sites, task_identity):
    node = {wire.NODE_DATA_DIR: str(tiny_sites / "site-0"), wire.NODE_SITE_ID: "s0",
            wire.NODE_DP_EPSILON: 3.0, wire.NODE_DP_DELTA: 1e-5,
            wire.NODE_PRIVACY_DIR: str(tiny_sites.parent / "ledger-policy")}
    with pytest.raises(Exception, match="site-policy: .*requires differential privacy"):
        make_client_app()(_train_message(_job(), {}), _context(node))
