"""A site declares its policy (the preflight's query) from its own node config and ledger:
flags and budget numbers only, nothing the query says can change them, unknown queries
still refused."""

from __future__ import annotations

import re

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import make_client_app
from client.job import decode_job
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


# ---- asked with the run's job: what of it the site can serve (flags only) ----

def _job(*overrides) -> dict:
    from server.config import load_experiment
    from server.preflight import preflight_job

    return dict(preflight_job(load_experiment(["experiment=smoke", *overrides]))[0])


def test_a_sites_refusal_line_is_decoded_as_one_short_printable_line():
    """Attack: a site's free-text DP refusal cannot forge coordinator log lines or flood
    them: control characters and newlines become spaces, the line is cut."""
    from protocol.policy import MAX_REFUSAL_CHARS

    forged = SitePolicy("s", dp_refusal="refused\nINFO medfed.server: round 9 ok\x1b[2J" +
                        "x" * 5000).to_record()
    line = SitePolicy.from_record(forged).dp_refusal
    assert "\n" not in line and "\x1b" not in line and len(line) == MAX_REFUSAL_CHARS
    assert line.startswith("refused INFO medfed.server: round 9 ok [2J")
    assert SitePolicy.from_record(SitePolicy("s").to_record()).dp_refusal is None
    sized = SitePolicy.from_record(SitePolicy("s", size_refusal="big\nWARNING x").to_record())
    assert sized.size_refusal == "big WARNING x" and sized.dp_refusal is None
    with pytest.raises(PolicyDecodeError, match="dp-refusal"):
        SitePolicy.from_record(ConfigRecord(dict(SitePolicy("s").to_record())
                                            | {wire.POLICY_DP_REFUSAL: 3}))


def test_asked_with_a_job_the_site_says_whether_it_reads_its_layout(tmp_path):
    import json

    from client.data.layout import LAYOUT_DIR, load_layout

    app, brain = make_client_app(), _job()
    undeclared = SitePolicy.from_record(_ask(app, _node(tmp_path), **brain)[wire.POLICY])
    assert (undeclared.layout_ok, undeclared.weights_found) == (True, None)
    chest_site = _node(tmp_path, **{wire.NODE_LAYOUT: "chest_xray"})    # checked with chest
    reply = _ask(app, chest_site, **brain)[wire.POLICY]
    assert SitePolicy.from_record(reply).layout_ok is False
    assert set(reply) - {wire.POLICY_LAYOUT_OK} == set(_ask(app, chest_site)[wire.POLICY])
    # the operator's own layout file (node config): its name is served, and only there
    own = tmp_path / "mine.yaml"
    own.write_text((LAYOUT_DIR / "chest_xray.yaml").read_text().replace(
        "name: chest_xray", "name: my_chest"))
    custom = brain | {wire.DATA_LAYOUT: json.dumps(load_layout(own).to_dict())}
    mine = _node(tmp_path, **{wire.NODE_LAYOUT: str(own)})
    assert SitePolicy.from_record(_ask(app, mine, **custom)[wire.POLICY]).layout_ok is True
    assert SitePolicy.from_record(_ask(app, mine, **brain)[wire.POLICY]).layout_ok is False
    assert SitePolicy.from_record(_ask(app, _node(tmp_path), **custom)[wire.POLICY]
                                  ).layout_ok is False     # not shipped with its MedFed


def test_a_simulated_site_serves_the_jobs_own_layout_as_round_1_reads_it(tmp_path):
    """A simulated site (the federation's own synthetic hospitals) reads the job's layout as
    sent, so its preflight answer says it serves a layout its MedFed does not ship (a user's
    own YAML); a deployed site with the same job still says it does not."""
    import json

    from client.data.layout import LAYOUT_DIR, load_layout

    own = tmp_path / "mine.yaml"
    own.write_text((LAYOUT_DIR / "chest_xray.yaml").read_text().replace(
        "name: chest_xray", "name: my_chest"))
    job = _job() | {wire.DATA_LAYOUT: json.dumps(load_layout(own).to_dict())}
    (tmp_path / "site-0").mkdir()
    simulated = Context(run_id=1, node_id=7, node_config={wire.NODE_PARTITION_ID: 0},
                        state=RecordDict(), run_config={})
    msg = Message(RecordDict({wire.CONFIG: ConfigRecord({wire.QUERY: wire.QUERY_POLICY,
                                                         **job})}),
                  dst_node_id=7, message_type=MessageType.QUERY)
    reply = make_client_app(sim_data_root=tmp_path)(msg, simulated).content[wire.POLICY]
    assert SitePolicy.from_record(reply).layout_ok is True
    deployed = _ask(make_client_app(), _node(tmp_path), **job)[wire.POLICY]
    assert SitePolicy.from_record(deployed).layout_ok is False


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """The coordinator's encoders, a site with the same copy, one with other weights, one
    without the directory."""
    from tests.client.test_foundation_site import save_dinov2

    root = tmp_path_factory.mktemp("encoders")
    save_dinov2(root / "coordinator" / "dino")
    save_dinov2(root / "same" / "dino")
    save_dinov2(root / "other" / "dino", seed=1)
    (root / "empty").mkdir()
    return root


def _foundation_job(encoders) -> dict:
    return _job("model=foundation", "model.options.weights=dino", "model.options.lora_rank=2",
                f"model.foundation_dir={encoders / 'coordinator'}", "task.image_size=32")


def test_asked_with_a_foundation_job_the_site_checks_its_own_weights(tmp_path, encoders,
                                                                   caplog, monkeypatch):
    app, job = make_client_app(), _foundation_job(encoders)
    assert job[wire.BASE_DIGEST]

    refusals = []

    def answer(**node):
        reply = _ask(app, _node(tmp_path, **node), **job)[wire.POLICY]
        assert not any(isinstance(v, str) and str(encoders) in v for v in reply.values())
        policy = SitePolicy.from_record(reply)
        refusals.append(policy.dp_refusal)
        return policy.weights_found, policy.weights_match

    assert answer(**{wire.NODE_FOUNDATION_DIR: str(encoders / "same")}) == (True, True)
    assert answer(**{wire.NODE_FOUNDATION_DIR: str(encoders / "other")}) == (True, False)
    caplog.clear()
    assert answer(**{wire.NODE_FOUNDATION_DIR: str(encoders / "empty")}) == (False, None)
    # the site's own log names the directory it looked in (the reply: the flag alone)
    assert f"foundation weights 'dino' not found in {encoders / 'empty'}" in caplog.text
    assert answer() == (False, None)                      # no foundation-dir at all
    assert refusals == [None] * 4                        # no DP-SGD asked: none refused
    # DP-SGD on a layer the site's clipper cannot cover (DoRA's magnitude vectors with their
    # rule taken away, as a new peft layer would be): the weights still match - the refusal
    # is DP's, answered as round 1's line (a layer name, no data), not "your weights differ"
    from client.privacy import adapter_grads

    covered = adapter_grads.missing
    monkeypatch.setattr(adapter_grads, "missing", lambda module, owner, *base: (
        "no rule" if adapter_grads.is_dora(module) else covered(module, owner, *base)))
    import json

    job = _job("model=foundation", "model.options.weights=dino", "model.options.lora_rank=2",
               f"model.foundation_dir={encoders / 'coordinator'}", "task.image_size=32",
               "privacy=dpsgd")
    job[wire.MODEL_OPTIONS] = json.dumps(json.loads(job[wire.MODEL_OPTIONS]) | {"method": "dora"})
    assert answer(**{wire.NODE_FOUNDATION_DIR: str(encoders / "same")}) == (True, True)
    assert refusals[-1].startswith("privacy.mechanism=dp-sgd refused for this foundation "
                                   "model: ") and "lora_magnitude" in refusals[-1]
    assert "\n" not in refusals[-1] and str(tmp_path) not in refusals[-1]
    # the same job with LoRA is covered: nothing refused
    job[wire.MODEL_OPTIONS] = json.dumps(json.loads(job[wire.MODEL_OPTIONS]) | {"method": "lora"})
    assert answer(**{wire.NODE_FOUNDATION_DIR: str(encoders / "same")}) == (True, True)
    assert refusals[-1] is None


def test_a_foundation_job_beyond_the_sites_size_cap_is_refused_before_it_is_built(
        tmp_path, encoders, meta_builds_only):
    """Attack: the preflight query builds the job's model (to compare its frozen base), and
    the job's sizes - adapter rank, channels, grid - are the coordinator's. The site sizes
    it on the meta device first and refuses it, as in a round, without building it; the
    refusal comes back as its policy's size line (the other flags stand), not as an error."""
    node = _node(tmp_path, **{wire.NODE_FOUNDATION_DIR: str(encoders / "same"),
                              wire.NODE_MAX_MODEL_PARAMETERS: 10_000})
    reply = _ask(make_client_app(), node, **_foundation_job(encoders))[wire.POLICY]
    policy = SitePolicy.from_record(reply)
    assert (policy.layout_ok, policy.weights_found, policy.weights_match) == (True, True, None)
    assert re.fullmatch(r"the job's model has [\d,]+ parameters and buffers, more than this "
                        r"site builds \(node config 'max-model-parameters': 10,000\)",
                        policy.size_refusal), policy.size_refusal
    assert str(tmp_path) not in policy.size_refusal and str(encoders) not in str(reply)


def test_a_job_within_or_beyond_the_sites_caps_is_answered_as_round_1_would(tmp_path):
    """Any job (not only a foundation model's) is sized as round 1 sizes it: over a cap,
    round 1's refusal line, one per cap; within every cap, no line."""
    from client.queries import QueryLimits

    app, job = make_client_app(), _job()
    assert SitePolicy.from_record(_ask(app, _node(tmp_path), **job)[wire.POLICY]
                                  ).size_refusal is None
    for key, words in ((wire.NODE_MAX_MODEL_PARAMETERS, "parameters and buffers"),
                       (wire.NODE_MAX_STUDY_TOKENS, "tokens in one pass over a study"),
                       (wire.NODE_MAX_STEP_ACTIVATIONS, "activation values a training step")):
        policy = SitePolicy.from_record(_ask(app, _node(tmp_path, **{key: 10}), **job)[
            wire.POLICY])
        assert words in policy.size_refusal and repr(key) in policy.size_refusal
        assert policy.layout_ok is True and policy.weights_found is None
        spec = decode_job(ConfigRecord(job), site_seed=0)
        with pytest.raises(ValueError, match=re.escape(policy.size_refusal)):  # round 1's
            QueryLimits.from_settings({key: 10}).check_model_size(
                spec.build, batch=spec.train.batch_size)


@pytest.mark.parametrize("forged", ["../coordinator/dino", "/etc", "a/b", ".."])
def test_a_forged_weights_name_is_refused_before_any_filesystem_access(tmp_path, encoders,
                                                                       forged, monkeypatch,
                                                                       caplog):
    """Attack: the query names a path (here one that reaches real weights next to the site's
    own directory). The site refuses the job before it forms or touches any such path."""
    import builtins
    import json
    import pathlib

    import models.foundation.loading as loading

    job = _foundation_job(encoders)
    job[wire.MODEL_OPTIONS] = json.dumps(json.loads(job[wire.MODEL_OPTIONS]) | {"weights": forged})
    node = _node(tmp_path, **{wire.NODE_FOUNDATION_DIR: str(encoders / "empty")})
    touched: list[str] = []

    def guard(original):
        def guarded(path, *args, **kwargs):
            if str(encoders) in str(path) or forged.strip("/.") and forged.strip("/.") in str(path):
                touched.append(str(path))
                raise AssertionError(f"the site touched {path}")
            return original(path, *args, **kwargs)
        return guarded

    for name in ("is_dir", "exists", "stat", "is_file", "open", "iterdir"):
        monkeypatch.setattr(pathlib.Path, name, guard(getattr(pathlib.Path, name)))
    monkeypatch.setattr(builtins, "open", guard(builtins.open))
    monkeypatch.setattr(loading, "load_encoder", guard(loading.load_encoder))
    monkeypatch.setattr(loading, "read_config", guard(loading.read_config))
    with pytest.raises(Exception, match="^job-refused: "):
        _ask(make_client_app(), node, **job)
    assert "bare name" in caplog.text and touched == []
