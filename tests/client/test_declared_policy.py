"""A site declares its policy (the preflight's query) from its own node config and ledger:
flags and budget numbers only, nothing the query says can change them, unknown queries
still refused."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import make_client_app
from client.privacy.ledger import PrivacyLedger
from protocol import wire
from protocol.accounting import epsilon
from protocol.policy import PolicyDecodeError, SitePolicy

pytestmark = pytest.mark.usefixtures("task_identity")

BUDGET = {wire.NODE_DP_EPSILON: 8.0, wire.NODE_DP_DELTA: 1e-5}


def _ask(app, node_config: dict, **extra) -> RecordDict:
    msg = Message(RecordDict({wire.CONFIG: ConfigRecord({wire.QUERY: wire.QUERY_POLICY,
                                                         **extra})}),
                  dst_node_id=7, message_type=MessageType.QUERY)
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={})
    return app(msg, context).content


def _node(tmp_path, **settings) -> dict:
    return {wire.NODE_DATA_DIR: str(tmp_path / "site"), wire.NODE_SITE_ID: "hospital-a",
            **settings}


def test_policy_comes_from_node_config_and_the_ledger(tmp_path):
    app = make_client_app()
    node = _node(tmp_path, **BUDGET, **{wire.NODE_REQUIRE_SECAGG: True,
                                        wire.NODE_DP_MAX_RUN_EPSILON: 4.0})
    reply = _ask(app, node)
    policy = SitePolicy.from_record(reply[wire.POLICY])
    assert policy == SitePolicy("hospital-a", wire.ROLE_TRAIN, require_dp=True,
                                require_secagg=True, epsilon=8.0, delta=1e-5,
                                epsilon_spent=0.0, max_run_epsilon=4.0)
    # flags and the budget's numbers: no count of anything at the site
    assert set(reply[wire.POLICY]) == {
        wire.SITE_ID, wire.NODE_ROLE, wire.NODE_REQUIRE_DP, wire.NODE_REQUIRE_SECAGG,
        wire.NODE_DP_TRUST_SERVER, wire.POLICY_HAS_BUDGET, wire.POLICY_EPSILON_SPENT, wire.NODE_DP_EPSILON,
        wire.NODE_DP_DELTA, wire.NODE_DP_MAX_RUN_EPSILON}
    assert not (tmp_path / "site" / ".medfed" / "privacy-ledger.sqlite").exists()  # not created

    # what the ledger spent, composed at the site's delta (rounded up to 0.01)
    ledger = PrivacyLedger(tmp_path / "site" / ".medfed" / "privacy-ledger.sqlite")
    ledger.append(run_id="r1", server_round=1, mechanism=wire.DP_SGD, sample_rate=0.1,
                  noise_multiplier=1.0, steps=50, delta=1e-5, accountant="rdp", epsilon=1.0,
                  max_grad_norm=1.0)
    spent = SitePolicy.from_record(_ask(app, node)[wire.POLICY]).epsilon_spent
    assert spent == pytest.approx(epsilon([(1.0, 0.1, 50)], 1e-5), abs=0.01) and spent > 0


def test_no_budget_means_no_dp_requirement(tmp_path):
    policy = SitePolicy.from_record(_ask(make_client_app(), _node(tmp_path))[wire.POLICY])
    assert (policy.require_dp, policy.has_budget, policy.epsilon_left) == (False, False, None)
    relaxed = _node(tmp_path, **BUDGET, **{wire.NODE_REQUIRE_DP: False})
    assert not SitePolicy.from_record(_ask(make_client_app(), relaxed)[wire.POLICY]).require_dp


def test_a_query_cannot_change_what_the_site_declares(tmp_path):
    """Attack: the coordinator puts the answer it wants into the query."""
    app, node = make_client_app(), _node(tmp_path, **BUDGET, **{wire.NODE_REQUIRE_SECAGG: True})
    honest = _ask(app, node)[wire.POLICY]
    forged = _ask(app, node, **{wire.NODE_REQUIRE_DP: False, wire.NODE_REQUIRE_SECAGG: False,
                               wire.NODE_DP_EPSILON: 1000.0, wire.NODE_ROLE: "external",
                               wire.NODE_SITE_ID: "someone-else",
                               wire.POLICY_EPSILON_SPENT: 0.0})[wire.POLICY]
    assert dict(forged) == dict(honest)


def test_unknown_queries_are_still_refused(tmp_path, caplog):
    with pytest.raises(Exception, match="^site-failure: "):
        make_client_app()(Message(RecordDict({wire.CONFIG: ConfigRecord({wire.QUERY: "counts"})}),
                                  dst_node_id=7, message_type=MessageType.QUERY),
                          Context(run_id=1, node_id=7, node_config=_node(tmp_path),
                                  state=RecordDict(), run_config={}))
    assert "unknown query 'counts'" in caplog.text


def test_an_invalid_budget_is_answered_as_the_sites_policy_reason(tmp_path):
    node = _node(tmp_path, **{wire.NODE_DP_EPSILON: 8.0})        # no delta
    with pytest.raises(Exception, match="^site-policy: .*budget in node config is invalid"):
        _ask(make_client_app(), node)


def test_the_server_refuses_malformed_policies():
    good = SitePolicy("s", epsilon=8.0, delta=1e-5).to_record()
    assert SitePolicy.from_record(good).epsilon == 8.0
    for key, value in ((wire.NODE_REQUIRE_DP, "no"), (wire.NODE_DP_EPSILON, float("nan")),
                       (wire.POLICY_EPSILON_SPENT, -1.0), (wire.NODE_ROLE, "observer"),
                       (wire.POLICY_HAS_BUDGET, False)):
        bad = ConfigRecord(dict(good) | {key: value})
        with pytest.raises(PolicyDecodeError):
            SitePolicy.from_record(bad)
