"""The site's privacy policy: Opacus-exact accounting, budget enforcement against the ledger
across restarts and runs, refusals with reasons, node settings, and DP-SGD task eligibility."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord

from client.job import JobError, decode_job
from client.privacy.dpsgd import DPSGDConfig, steps_per_epoch
from client.privacy.ledger import PrivacyLedger
from client.privacy.policy import (PrivacyRefused, admit_round, authorize, node_settings,
                                   site_budget)
from models import TASKS
from models.tasks import ClassificationConfig, ClassificationTask
from server.config import load_experiment
from server.federation import job_config
from protocol import accounting, wire
from protocol.job import PrivacySpec

# Opacus notes when the optimal RDP order sits at the edge of its grid (very large/small sigma)
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")

DELTA = 1e-5
N_TRAIN, BATCH, EPOCHS = 100, 10, 1            # q = 0.1, 10 steps per round

COUPLED, UNDECLARED = "test-policy-batch-coupled", "test-policy-undeclared-coupling"


class _BatchCoupledTask(ClassificationTask):
    """Stands in for a contrastive objective: each sample's loss depends on the whole batch."""

    batch_coupling = "an in-batch contrastive loss uses every other sample as a negative"


class _UndeclaredTask:
    """Does not say whether its loss couples the batch: must be treated as coupled."""

    def __init__(self, config):
        self.config = config


if COUPLED not in TASKS.names():
    TASKS.register(COUPLED, ClassificationConfig)(_BatchCoupledTask)
if UNDECLARED not in TASKS.names():
    TASKS.register(UNDECLARED, ClassificationConfig)(_UndeclaredTask)


def _budget(tmp_path, epsilon=3.0, delta=DELTA, **extra):
    settings = {wire.NODE_DP_EPSILON: epsilon, wire.NODE_DP_DELTA: delta,
                wire.NODE_PRIVACY_DIR: str(tmp_path / "privacy")} | extra
    return site_budget(settings, tmp_path)


def _dpsgd(run_id="run-a", **changes) -> PrivacySpec:
    fields = dict(mechanism=wire.DP_SGD, epsilon=3.0, planned_rounds=2, run_id=run_id,
                  max_grad_norm=1.0)
    return PrivacySpec(**(fields | changes))


def _authorize(request, budget, server_round=1, n_train=N_TRAIN):
    return authorize(request, budget, n_train=n_train, local_epochs=EPOCHS, batch_size=BATCH,
                     server_round=server_round, secure_mode=False,
                     survivors_signed=True)


# ---------------------------------------------------------------- accounting == Opacus, live

def _live(accountant, history):
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant


HISTORIES = [[(1.1, 0.05, 40)],
             [(1.1, 0.05, 40), (1.1, 0.05, 40), (0.9, 0.1, 10)],
             [(2.0, 1.0, 1)] * 3 + [(1.0, 0.1, 10)]]        # site-dp rounds, then dp-sgd


@pytest.mark.parametrize("history", HISTORIES)
def test_epsilon_equals_opacus_rdp_accountant_stepped_live(history):
    from opacus.accountants import RDPAccountant

    live = _live(RDPAccountant(), history).get_epsilon(delta=DELTA)
    assert accounting.epsilon(history, DELTA, "rdp") == pytest.approx(live, rel=1e-9)
    assert accounting.epsilon(history, DELTA) == pytest.approx(live, rel=1e-9)   # default rdp


@pytest.mark.parametrize("history", HISTORIES[:2])
def test_epsilon_equals_opacus_prv_accountant_stepped_live(history):
    from opacus.accountants import PRVAccountant

    live = _live(PRVAccountant(), history).get_epsilon(delta=DELTA)
    assert accounting.epsilon(history, DELTA, "prv") == pytest.approx(live, rel=1e-6)


def test_accounting_edges():
    assert accounting.epsilon([], DELTA) == 0.0
    assert accounting.ACCOUNTANTS == ("rdp", "prv")
    with pytest.raises(accounting.PrivacyConfigError, match=r"unknown accountant 'gdp'.*rdp"):
        accounting.epsilon([(1.0, 0.1, 1)], DELTA, "gdp")
    sigma = accounting.calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=0.1,
                                       steps=50)
    assert 2.0 - 0.006 < accounting.epsilon([(sigma, 0.1, 50)], DELTA) <= 2.0


# ---------------------------------------------------------------- dp-sgd: plan, charge, refuse

def test_dpsgd_calibrates_once_charges_the_ledger_and_stops_at_the_budget(tmp_path):
    budget = _budget(tmp_path, epsilon=3.0)
    q, steps = BATCH / N_TRAIN, EPOCHS * steps_per_epoch(BATCH / N_TRAIN)

    first = _authorize(_dpsgd(), budget, server_round=1)
    sigma = first.dpsgd.noise_multiplier
    assert first.dpsgd.sample_rate == pytest.approx(q) and first.dpsgd.max_grad_norm == 1.0
    assert first.dpsgd.secure_mode is False
    # calibrated so the whole planned run (2 rounds) just fits the target
    assert 3.0 - 0.006 < accounting.epsilon([(sigma, q, steps)] * 2, DELTA) <= 3.0
    ledger = PrivacyLedger(budget.ledger_path)
    assert ledger.history() == [(sigma, q, steps)]
    assert first.entry == ledger.last() and first.entry.server_round == 1
    assert first.entry.epsilon == pytest.approx(accounting.epsilon(ledger.history(), DELTA))
    assert ledger.get_plan("run-a", wire.DP_SGD).noise_multiplier == sigma

    # a restarted site process: new ledger handle, same file; the plan is reused
    second = _authorize(_dpsgd(), _budget(tmp_path, epsilon=3.0), server_round=2)
    reopened = PrivacyLedger(budget.ledger_path)
    assert second.dpsgd.noise_multiplier == sigma
    assert [e.server_round for e in reopened.entries()] == [1, 2]
    assert second.entry.epsilon > first.entry.epsilon
    assert second.entry.epsilon == pytest.approx(accounting.epsilon(reopened.history(), DELTA))
    assert second.entry.epsilon <= 3.0

    # one round past the plan would exceed the budget: refused, nothing charged
    with pytest.raises(PrivacyRefused, match=r"round 3 would bring .* budget 3"):
        _authorize(_dpsgd(), budget, server_round=3)
    assert len(PrivacyLedger(budget.ledger_path).entries()) == 2

    # a fresh run whose plan the remaining budget cannot hold is refused up front
    with pytest.raises(PrivacyRefused, match=r"run's plan .* budget 3"):
        _authorize(_dpsgd(run_id="run-b"), budget, server_round=1)
    after = PrivacyLedger(budget.ledger_path)
    assert len(after.entries()) == 2 and after.get_plan("run-b", wire.DP_SGD) is None


def test_a_fresh_run_that_fits_the_remaining_budget_is_accepted(tmp_path):
    budget = _budget(tmp_path, epsilon=10.0)
    _authorize(_dpsgd(epsilon=2.0, planned_rounds=1), budget)
    other = _authorize(_dpsgd(run_id="run-b", epsilon=2.0, planned_rounds=1), budget)
    ledger = PrivacyLedger(budget.ledger_path)
    assert [e.run_id for e in ledger.entries()] == ["run-a", "run-b"]
    # composed over both runs, not per run
    assert other.entry.epsilon == pytest.approx(accounting.epsilon(ledger.history(), DELTA))
    assert other.entry.epsilon > 2.0


@pytest.mark.parametrize("setting, value", [("head_clip_share", 0.9),
                                             ("augmentation_multiplicity", 4)])
def test_clipping_settings_reach_the_clipper_and_charge_exactly_as_plain_dpsgd(
        tmp_path, setting, value):
    """Per-group clipping splits C and augmentation multiplicity averages a sample's views
    before its clipping; neither raises C: a coordinator asking for either gets the same
    sigma, the same C and the same ledger row as without it."""
    plain = _authorize(_dpsgd(), _budget(tmp_path / "plain"))
    asked = _authorize(_dpsgd(**{setting: value}), _budget(tmp_path / "asked"))
    assert getattr(asked.dpsgd, setting) == value
    assert getattr(plain.dpsgd, setting) == getattr(DPSGDConfig, setting)
    assert (asked.dpsgd.noise_multiplier, asked.dpsgd.max_grad_norm, asked.dpsgd.sample_rate) \
        == (plain.dpsgd.noise_multiplier, plain.dpsgd.max_grad_norm, plain.dpsgd.sample_rate)
    assert asked.entry.epsilon == plain.entry.epsilon
    assert asked.entry.max_grad_norm == plain.entry.max_grad_norm == 1.0


def test_a_run_may_not_change_its_sample_rate(tmp_path):
    budget = _budget(tmp_path, epsilon=10.0)
    _authorize(_dpsgd(sample_rate=0.1), budget)
    with pytest.raises(PrivacyRefused, match="sample rate"):
        _authorize(_dpsgd(sample_rate=0.2), budget, server_round=2)


def test_attack_a_tiny_sample_rate_cannot_make_a_round_of_endless_steps(tmp_path):
    """A coordinator's q sets a DP round's work: int(1/q) steps an epoch. At q = 1e-7 a
    review got a round of 10^7 steps admitted (~18 h of the site's machine, per epoch).
    Below 1/n (fewer than one study a step on average) the site refuses before charging;
    at 1/n it trains n steps an epoch, what non-private training at batch size 1 takes."""
    budget = _budget(tmp_path, epsilon=10.0)
    with pytest.raises(PrivacyRefused, match=r"below 1/n"):
        _authorize(_dpsgd(sample_rate=1e-7), budget)
    assert PrivacyLedger(budget.ledger_path).entries() == []
    auth = _authorize(_dpsgd(sample_rate=1 / N_TRAIN), budget)
    assert auth.entry.steps == EPOCHS * N_TRAIN


def _admit(tmp_path, n_train: int, request: PrivacySpec, floor: int = 10):
    """One DP-SGD round as ``client.app`` admits it: node config, the site's count floor."""
    job = SimpleNamespace(privacy=request, server_round=1,
                          train=SimpleNamespace(local_epochs=EPOCHS, batch_size=BATCH))
    settings = {wire.NODE_DP_EPSILON: 1e6, wire.NODE_DP_DELTA: DELTA,
                wire.NODE_DP_SECURE_MODE: False, wire.NODE_PRIVACY_DIR: str(tmp_path)}
    return admit_round(job, settings, tmp_path, n_train=n_train, count_floor=floor,
                       secure_aggregation=True, survivors_signed=True)


def test_attack_probing_sample_rates_finds_only_the_reported_range_of_the_training_set(
        tmp_path):
    """Attack: a masked update hides the site's example count, but a q below 1/n is refused,
    and the coordinator sees each refusal and picks q. Binary search over q = 1/k finds the
    largest k the site accepts: n itself, when the rule read n (a patient count, here 21-29
    studies, which the site reports only as the range 20-29 at its floor 10). The rule reads
    the range's low end: every site in the range answers every probe alike, the search ends
    at 20, and the next range's site (30) answers otherwise. With q left to the site (B/n),
    the steps and epsilon the masked reply carries are the range's as well (and so is the
    noise, calibrated from them)."""
    def largest_accepted_k(n_train: int) -> int:
        lo, hi = 1, 128                            # the site accepts k = lo, refuses k = hi
        while hi - lo > 1:
            k = (lo + hi) // 2
            try:                                   # a ledger each: one row to account
                _admit(tmp_path / f"{n_train}-{k}", n_train, _dpsgd(
                    sample_rate=1 / k, noise_multiplier=1.0, planned_rounds=1))
                lo = k
            except PrivacyRefused as err:
                assert "below 1/n" in str(err)
                hi = k
        return lo

    assert {n: largest_accepted_k(n) for n in (20, 21, 23, 29, 30)} == \
        {20: 20, 21: 20, 23: 20, 29: 20, 30: 30}
    replies = [_admit(tmp_path / f"default-{n}", n, _dpsgd(noise_multiplier=1.0)).entry
               for n in (21, 28)]
    assert [(e.sample_rate, e.noise_multiplier, e.steps, e.epsilon) for e in replies] == \
        [(BATCH / 20, replies[0].noise_multiplier, 20 // BATCH, replies[0].epsilon)] * 2


def test_prv_accountant_is_used_for_the_charge(tmp_path):
    budget = _budget(tmp_path, epsilon=3.0)
    auth = _authorize(_dpsgd(accountant="prv", planned_rounds=1), budget)
    history = PrivacyLedger(budget.ledger_path).history()
    assert auth.entry.accountant == "prv"
    assert auth.entry.epsilon == pytest.approx(accounting.epsilon(history, DELTA, "prv"))


# ---------------------------------------------------------------- refusals

def test_server_noise_multiplier_too_small_for_the_budget_is_refused(tmp_path):
    budget = _budget(tmp_path, epsilon=1.0)
    with pytest.raises(PrivacyRefused,
                       match=r"plan \(5 rounds, noise multiplier 0\.3\) .* budget 1"):
        _authorize(_dpsgd(epsilon=None, noise_multiplier=0.3, planned_rounds=5), budget)
    assert PrivacyLedger(budget.ledger_path).entries() == []


def test_server_noise_multiplier_is_used_when_it_fits(tmp_path):
    auth = _authorize(_dpsgd(epsilon=None, noise_multiplier=5.0), _budget(tmp_path))
    assert auth.dpsgd.noise_multiplier == 5.0


def test_server_target_above_the_site_budget_is_refused(tmp_path):
    budget = _budget(tmp_path, epsilon=3.0)
    with pytest.raises(PrivacyRefused, match=r"target epsilon 8 exceeds .* budget 3"):
        _authorize(_dpsgd(epsilon=8.0), budget)
    assert PrivacyLedger(budget.ledger_path).entries() == []


def test_site_dp_with_a_tiny_server_noise_is_refused(tmp_path):
    budget = _budget(tmp_path, epsilon=3.0)
    request = PrivacySpec(mechanism=wire.DP_SITE, noise_multiplier=0.05, clipping_norm=1.0,
                          planned_rounds=3, run_id="run-s")
    with pytest.raises(PrivacyRefused, match="budget 3"):
        _authorize(request, budget)
    assert PrivacyLedger(budget.ledger_path).entries() == []


def test_a_site_dp_plan_of_many_rounds_is_one_accountant_row_and_refused(tmp_path,
                                                                       monkeypatch):
    """Attack: a huge planned_rounds in a site-dp job (10^9 would be gigabytes of rows and an
    accountant loop over them at the site). The plan is composed as one row of that many
    releases - the same epsilon as that many rows - and refused."""
    from client.privacy import policy

    rows = []
    real = policy.epsilon

    def counted(history, *args, **kwargs):
        rows.append(len(history))
        return real(history, *args, **kwargs)

    monkeypatch.setattr(policy, "epsilon", counted)
    budget = _budget(tmp_path, epsilon=8.0)
    request = PrivacySpec(mechanism=wire.DP_SITE, noise_multiplier=3.0, clipping_norm=0.5,
                          planned_rounds=10 ** 5, run_id="run-s")
    with pytest.raises(PrivacyRefused, match=r"plan \(100000 rounds"):
        _authorize(request, budget)
    assert rows and max(rows) <= 1
    assert accounting.epsilon([(3.0, 1.0, 3)], DELTA) == pytest.approx(
        accounting.epsilon([(3.0, 1.0, 1)] * 3, DELTA))      # one row composes like three


def test_site_dp_is_charged_as_one_full_batch_release(tmp_path):
    budget = _budget(tmp_path, epsilon=5.0)
    request = PrivacySpec(mechanism=wire.DP_SITE, noise_multiplier=3.0, clipping_norm=0.5,
                          planned_rounds=2, run_id="run-s")
    auth = _authorize(request, budget)
    assert auth.dpsgd is None
    assert PrivacyLedger(budget.ledger_path).history() == [(3.0, 1.0, 1)]
    assert auth.entry.epsilon == pytest.approx(accounting.epsilon([(3.0, 1.0, 1)], DELTA))
    assert auth.entry.max_grad_norm == 0.5


def test_non_private_rounds_need_the_operators_consent(tmp_path):
    none = PrivacySpec()
    with pytest.raises(PrivacyRefused, match="requires differential privacy"):
        _authorize(none, _budget(tmp_path))                      # require-dp defaults to true
    relaxed = _budget(tmp_path, **{wire.NODE_REQUIRE_DP: False})
    assert relaxed.require_dp is False
    assert _authorize(none, relaxed) is None
    assert _authorize(none, None) is None                         # no budget at all
    assert not relaxed.ledger_path.exists() or PrivacyLedger(relaxed.ledger_path).entries() == []


def test_dp_without_a_site_budget_is_refused_naming_the_node_config_keys(tmp_path):
    assert site_budget({}, tmp_path) is None
    with pytest.raises(PrivacyRefused, match=r"no privacy budget.*'dp-epsilon'.*'dp-delta'"):
        _authorize(_dpsgd(), site_budget({}, tmp_path))


def test_delta_at_or_above_one_over_n_is_refused(tmp_path):
    budget = _budget(tmp_path, delta=0.01)                      # 1/n_train = 0.01
    with pytest.raises(PrivacyRefused, match=r"delta=0\.01 >= 1/n"):
        _authorize(_dpsgd(), budget, n_train=N_TRAIN)
    assert _authorize(_dpsgd(planned_rounds=1), _budget(tmp_path / "b", delta=0.001),
                      n_train=N_TRAIN) is not None


@pytest.mark.parametrize("request_", [
    _dpsgd(), PrivacySpec(mechanism=wire.DP_SITE, noise_multiplier=3.0, clipping_norm=0.5,
                          planned_rounds=2, run_id="run-s")], ids=["dp-sgd", "site-dp"])
def test_a_site_without_training_studies_refuses_a_private_round(tmp_path, request_):
    # a site whose split holds no labelled training study (it happens at small sites, by
    # the pseudonym key's patient split) refused with a reason, not a ZeroDivisionError
    with pytest.raises(PrivacyRefused, match=r"no records to train on \(n=0\)"):
        _authorize(request_, _budget(tmp_path), n_train=0)
    assert not (tmp_path / "privacy").exists() or \
        PrivacyLedger(_budget(tmp_path).ledger_path).entries() == []


# ---------------------------------------------------------------- node settings

def test_node_settings_merge_the_toml_under_the_node_config(tmp_path):
    (tmp_path / wire.NODE_CONFIG_FILE).write_text(
        'dp-epsilon = 2.0\ndp-delta = 1e-6\nrequire-dp = false\n')
    settings = node_settings({wire.NODE_DP_EPSILON: 5.0}, tmp_path, simulated=True)
    assert settings[wire.NODE_DP_EPSILON] == 5.0                 # the node config wins
    assert settings[wire.NODE_DP_DELTA] == 1e-6                  # the file fills the rest
    budget = site_budget(settings, tmp_path)
    assert (budget.epsilon, budget.delta, budget.require_dp) == (5.0, 1e-6, False)
    assert budget.ledger_path == tmp_path / ".medfed" / "privacy-ledger.sqlite"
    assert node_settings({"x": 1}, tmp_path / "no-such-dir", simulated=True) == {"x": 1}
    assert node_settings({"x": 1}, tmp_path, simulated=False) == {"x": 1}   # deployed: no file


@pytest.mark.parametrize("settings", [
    {wire.NODE_DP_EPSILON: 0.0, wire.NODE_DP_DELTA: DELTA},
    {wire.NODE_DP_EPSILON: -1.0, wire.NODE_DP_DELTA: DELTA},
    {wire.NODE_DP_EPSILON: math.inf, wire.NODE_DP_DELTA: DELTA},
    {wire.NODE_DP_EPSILON: 1.0, wire.NODE_DP_DELTA: 1.5},
    {wire.NODE_DP_EPSILON: 1.0},                                 # delta missing
    {wire.NODE_DP_EPSILON: "lots", wire.NODE_DP_DELTA: DELTA},
])
def test_an_invalid_site_budget_is_refused(tmp_path, settings):
    with pytest.raises(PrivacyRefused, match=r"budget in node config is invalid.*'dp-epsilon'"):
        site_budget(settings, tmp_path)


# ---------------------------------------------------------------- decode_job: DP-SGD eligibility

def _job(task_name: str, privacy: str) -> ConfigRecord:
    record = job_config(load_experiment([f"privacy={privacy}"]), "run-x")
    record[wire.TASK_NAME] = task_name
    return record


def test_dpsgd_is_refused_for_a_batch_coupled_task():
    assert decode_job(_job(COUPLED, "none"), site_seed=0).task_name == COUPLED   # non-DP is fine
    with pytest.raises(JobError, match=r"dp-sgd refused .* in-batch contrastive .* site-level"):
        decode_job(_job(COUPLED, "dpsgd"), site_seed=0)


def test_dpsgd_is_refused_for_a_task_that_does_not_declare_its_coupling():
    with pytest.raises(JobError, match="does not declare"):
        decode_job(_job(UNDECLARED, "dpsgd"), site_seed=0)


def test_dpsgd_request_decodes_for_the_classification_task():
    job = decode_job(_job("classification", "dpsgd"), site_seed=0)
    assert job.privacy.mechanism == wire.DP_SGD and job.privacy.run_id == "run-x"
    assert job.privacy.epsilon == 8.0 and job.privacy.planned_rounds >= 1


def test_dpsgd_is_refused_for_logit_adjustment_at_the_site():
    """The site re-checks what the server validated: label counts are outside the accountant."""
    record = _job("classification", "dpsgd")
    record[wire.TASK_OPTIONS] = json.dumps(json.loads(record[wire.TASK_OPTIONS])
                                           | {"logit_adjustment": 1.0})
    with pytest.raises(JobError, match=r"dp-sgd refused: logit_adjustment .* label counts"):
        decode_job(record, site_seed=0)


def test_dpsgd_is_refused_for_feature_decorrelation_at_the_site():
    record = _job("classification", "dpsgd")
    record[wire.TASK_OPTIONS] = json.dumps(json.loads(record[wire.TASK_OPTIONS])
                                           | {"feature_decorrelation": 0.1})
    with pytest.raises(JobError, match=r"dp-sgd refused for task 'classification': "
                                       r"feature_decorrelation"):
        decode_job(record, site_seed=0)
