"""Site privacy controls against a malicious coordinator: each test plays the coordinator,
sends a crafted message to a real ClientApp (or the site's ledger), and checks that the
site's promise holds."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import client.privacy.policy as policy
from client.app import make_client_app
from client.privacy.ledger import PrivacyLedger
from client.privacy.policy import PrivacyRefused, SiteBudget, authorize, site_budget
from protocol import accounting, wire
from protocol.job import PrivacySpec
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

def _crafted_masked_claim() -> Message:
    """The coordinator says "masked" in the job config (so the train handler's policy check
    passes) but sends a SecAgg record without a stage (so the SecAgg mod did not mask)."""
    return _train_message(_job(), {wire.SECAGG_STAGE: wire.SECAGG_MASKED,
                                   wire.SECAGG_NODES: [], wire.SECAGG_CIPHERTEXTS: []},
                          {wire.SECAGG: ConfigRecord({wire.SECAGG_ROUND: 1})})


REQUIRES_SECAGG = {wire.NODE_SITE_ID: "s0", wire.NODE_REQUIRE_SECAGG: True}


def test_a_config_claiming_a_masked_round_cannot_extract_plaintext_weights(tiny_sites,
                                                                         task_identity):
    node = REQUIRES_SECAGG | {wire.NODE_DATA_DIR: str(tiny_sites / "site-0")}
    reply = None
    with pytest.raises(Exception, match="^site-policy: .*secure.aggregation"):
        reply = make_client_app()(_crafted_masked_claim(), _context(node))
    assert reply is None, "a train reply left the site"


def test_egress_refuses_plaintext_even_if_the_masking_path_is_bypassed(tiny_sites,
                                                                       task_identity,
                                                                       monkeypatch):
    """Defence in depth: whatever route lets a plaintext reply past the SecAgg mod (here the
    mod is replaced by a pass-through), the site's outermost control looks at the reply's
    arrays, not at what the server's config claims, and withholds it."""
    import client.app as site_app
    monkeypatch.setattr(site_app, "secagg_mod", lambda msg, ctx, call_next: call_next(msg, ctx))
    node = REQUIRES_SECAGG | {wire.NODE_DATA_DIR: str(tiny_sites / "site-0")}
    reply = None
    with pytest.raises(Exception, match="^site-policy: this site requires secure aggregation"):
        reply = make_client_app()(_crafted_masked_claim(), _context(node))
    assert reply is None, "a train reply left the site"


def test_without_require_secagg_the_same_site_trains_in_plaintext(tiny_sites, task_identity,
                                                                   tmp_path):
    """Control for the test above: the refusal comes from the site's policy, not a crash.
    (A copy of the site: the tests above left a round admitted as masked in its state, and a
    plaintext repeat of that round is refused - tests/security/test_site_queries.py.)"""
    import shutil

    from client.data.pseudonyms import KEY_FILE
    site = shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0",
                           ignore=lambda d, names: [n for n in names if d.endswith(".medfed")
                                                    and n != KEY_FILE])
    node = {wire.NODE_DATA_DIR: str(site), wire.NODE_SITE_ID: "s0"}
    reply = make_client_app()(_train_message(_job(), {}), _context(node))
    assert not reply.has_error() and len(reply.content[wire.ARRAYS]) > 1


# ------------------------------------------------- 2. the budget check is inside the charge

DELTA = 1e-5
SIGMA = 1.0                         # site-level DP: one step at q = 1 per round


def _site_dp(run_id: str) -> PrivacySpec:
    return PrivacySpec(mechanism=wire.DP_SITE, noise_multiplier=SIGMA, clipping_norm=1.0,
                       planned_rounds=1, run_id=run_id, accountant="rdp")


def test_two_runs_authorising_at_once_cannot_both_spend_the_last_of_the_budget(tmp_path,
                                                                              monkeypatch):
    """Two coordinators' runs ask at the same moment for a round; the budget admits one.
    A barrier right after each epsilon computation lines the two threads up, so without an
    atomic check-and-charge both pass the check before either is charged."""
    one = accounting.epsilon([(SIGMA, 1.0, 1)], DELTA, "rdp")
    two = accounting.epsilon([(SIGMA, 1.0, 1)] * 2, DELTA, "rdp")
    assert one < two
    budget = SiteBudget((one + two) / 2, DELTA, tmp_path / "ledger.sqlite")
    barrier = threading.Barrier(2, timeout=2.0)
    real = policy.epsilon

    def lined_up(*args, **kwargs):
        value = real(*args, **kwargs)
        try:
            barrier.wait()      # a thread holding the ledger's lock waits here alone: timeout
        except threading.BrokenBarrierError:
            pass
        return value

    monkeypatch.setattr(policy, "epsilon", lined_up)
    outcomes: dict[str, object] = {}

    def run(run_id: str) -> None:
        try:
            outcomes[run_id] = authorize(_site_dp(run_id), budget, n_train=1000,
                                         local_epochs=1, batch_size=10, server_round=1, survivors_signed=True)
        except PrivacyRefused as err:
            outcomes[run_id] = err

    threads = [threading.Thread(target=run, args=(r,)) for r in ("run-a", "run-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    refused = [r for r, o in outcomes.items() if isinstance(o, PrivacyRefused)]
    assert len(outcomes) == 2 and len(refused) == 1, outcomes
    entries = PrivacyLedger(budget.ledger_path).entries()
    assert len(entries) == 1
    assert real([(e.noise_multiplier, e.sample_rate, e.steps) for e in entries], DELTA,
                "rdp") <= budget.epsilon


def _budget(tmp_path: Path, **caps) -> SiteBudget:
    settings = {wire.NODE_DP_EPSILON: 50.0, wire.NODE_DP_DELTA: DELTA,
                wire.NODE_PRIVACY_DIR: str(tmp_path / "ledger")} | caps
    return site_budget(settings, tmp_path)


def test_per_run_epsilon_cap_refuses_a_run_that_would_spend_more(tmp_path):
    one = accounting.epsilon([(SIGMA, 1.0, 1)], DELTA, "rdp")
    two = accounting.epsilon([(SIGMA, 1.0, 1)] * 2, DELTA, "rdp")
    budget = _budget(tmp_path, **{wire.NODE_DP_MAX_RUN_EPSILON: (one + two) / 2})
    first = authorize(_site_dp("run-a"), budget, n_train=1000, local_epochs=1, batch_size=10,
                      server_round=1, survivors_signed=True)
    assert first is not None
    with pytest.raises(PrivacyRefused, match="per-run cap .*dp-max-run-epsilon"):
        authorize(_site_dp("run-a"), budget, n_train=1000, local_epochs=1, batch_size=10,
                  server_round=2, survivors_signed=True)
    # another run has its own cap (the site's budget of 50 is far from spent)
    assert authorize(_site_dp("run-b"), budget, n_train=1000, local_epochs=1, batch_size=10,
                     server_round=1, survivors_signed=True) is not None
    # a run whose plan alone exceeds the cap is refused before its first round
    many = PrivacySpec(mechanism=wire.DP_SITE, noise_multiplier=SIGMA, clipping_norm=1.0,
                       planned_rounds=5, run_id="run-c", accountant="rdp")
    with pytest.raises(PrivacyRefused, match="plan .*per-run cap"):
        authorize(many, budget, n_train=1000, local_epochs=1, batch_size=10, server_round=1, survivors_signed=True)
    assert {e.run_id for e in PrivacyLedger(budget.ledger_path).entries()} == {"run-a", "run-b"}


def test_minimum_noise_and_maximum_steps_are_the_site_s(tmp_path):
    budget = _budget(tmp_path, **{wire.NODE_DP_MIN_NOISE: 2.0, wire.NODE_DP_MAX_STEPS: 5})
    with pytest.raises(PrivacyRefused, match="below this site's minimum 2 .*dp-min-noise"):
        authorize(_site_dp("run-a"), budget, n_train=1000, local_epochs=1, batch_size=10,
                  server_round=1, survivors_signed=True)
    dpsgd = PrivacySpec(mechanism=wire.DP_SGD, noise_multiplier=3.0, max_grad_norm=1.0,
                        sample_rate=0.1, planned_rounds=1, run_id="run-b", accountant="rdp")
    with pytest.raises(PrivacyRefused, match="10 private steps > .* 5 per round"):
        authorize(dpsgd, budget, n_train=1000, local_epochs=1, batch_size=10, server_round=1, survivors_signed=True)
    assert PrivacyLedger(budget.ledger_path).entries() == []
    with pytest.raises(PrivacyRefused, match="'dp-min-noise-multiplier' must be a positive"):
        _budget(tmp_path, **{wire.NODE_DP_MIN_NOISE: "-1"})
    # a fractional step cap is refused, not truncated (2.5 read as 2 would be a cap the
    # operator did not write)
    for fraction in (2.5, "0.5"):
        with pytest.raises(PrivacyRefused, match="'dp-max-steps-per-round' must be a positive "
                                                 "whole number"):
            _budget(tmp_path, **{wire.NODE_DP_MAX_STEPS: fraction})
    assert _budget(tmp_path, **{wire.NODE_DP_MAX_STEPS: "5"}).max_steps_per_round == 5


# ------------------------------------------------- 3. no filesystem path arrives over the wire

@pytest.mark.parametrize("named", ["/etc/passwd", "../x", "../../etc", "report_vocab/../../x"])
def test_a_job_naming_a_path_as_tokenizer_is_refused_before_anything_is_read(named,
                                                                             monkeypatch):
    import builtins

    import tokenizers

    from client.job import JobError, decode_job

    touched: list[str] = []
    real_open = builtins.open

    def spy(owner, name):
        real = getattr(owner, name)

        def record(target, *args, **kwargs):
            touched.append(f"{name}:{target}")
            return real(target, *args, **kwargs)
        return record

    def recording_open(file, *args, **kwargs):
        touched.append(f"open:{file}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    for method in ("read_bytes", "read_text", "is_dir", "is_file", "exists", "open"):
        monkeypatch.setattr(Path, method, spy(Path, method))
    monkeypatch.setattr(tokenizers.Tokenizer, "from_file",
                        spy(tokenizers.Tokenizer, "from_file"))
    job = _job(task_name="clip", task_options={"num_classes": 3, "tokenizer_dir": named},
               model_options={"dim": 32, "depth": 1, "num_classes": 3})
    with pytest.raises(JobError, match="never reads a path"):
        decode_job(job.to_record(), site_seed=1)
    assert touched == [], "the site touched the filesystem for a job-named tokenizer"


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
            wire.NODE_MIN_EVAL_SPLIT: 1,        # a synthetic site of a few studies
            wire.NODE_DP_EPSILON: 3.0, wire.NODE_DP_DELTA: 1e-5,
            wire.NODE_PRIVACY_DIR: str(tiny_sites.parent / "ledger-policy")}
    with pytest.raises(Exception, match="site-policy: .*requires differential privacy"):
        make_client_app()(_train_message(_job(), {}), _context(node))
