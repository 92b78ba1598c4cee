"""Privacy settings are validated at compose time, and travel to sites under the wire keys."""

from __future__ import annotations

import pytest

from client.job import decode_job
from models.tasks import ClassificationTask
from server.config import ConfigError, load_experiment
from server.federation import job_config
from protocol import wire
from protocol.accounting import ACCOUNTANTS

# site-dp needs every one of the (three, in sim3) sites in every round
SITEDP = ["privacy=sitedp", "strategy.min_train_sites=3"]
DPSGD_ONLY_KEYS = {wire.DP_TARGET_EPSILON, wire.DP_MAX_GRAD_NORM, wire.DP_SAMPLE_RATE,
                   wire.DP_HEAD_CLIP_SHARE}
PRIVATE_KEYS = {wire.DP_ACCOUNTANT, wire.DP_PLANNED_ROUNDS, wire.RUN_ID,
                wire.DP_NOISE_MULTIPLIER} | DPSGD_ONLY_KEYS


def test_privacy_groups_compose():
    none = load_experiment()
    assert none.privacy.mechanism == "none"
    dpsgd = load_experiment(["privacy=dpsgd"])
    assert (dpsgd.privacy.mechanism, dpsgd.privacy.epsilon, dpsgd.privacy.accountant) == \
        ("dp-sgd", 8.0, "rdp")
    assert dpsgd.privacy.sample_rate is None and dpsgd.privacy.noise_multiplier is None
    sitedp = load_experiment(SITEDP)
    assert (sitedp.privacy.mechanism, sitedp.privacy.noise_multiplier) == ("site-dp", 1.0)
    assert load_experiment(["privacy=dpsgd", "privacy.accountant=prv"]).privacy.accountant == "prv"
    assert load_experiment(["privacy=dpsgd", "privacy.epsilon=null",
                            "privacy.noise_multiplier=1.2"]).privacy.noise_multiplier == 1.2
    assert load_experiment(SITEDP + ["strategy=fedprox"]).strategy.name == "fedprox"


@pytest.mark.parametrize("overrides, message", [
    (["privacy=dpsgd", "privacy.epsilon=0"], r"privacy\.epsilon must be > 0, got 0"),
    (["privacy=dpsgd", "privacy.epsilon=-1"], r"privacy\.epsilon must be > 0, got -1"),
    (["privacy=dpsgd", "privacy.delta=1.5"], r"privacy\.delta must be in \(0, 1\), got 1\.5"),
    (["privacy=dpsgd", "privacy.delta=0"], r"privacy\.delta must be in \(0, 1\)"),
    (["privacy=dpsgd", "privacy.accountant=foo"],
     r"privacy\.accountant: unknown accountant 'foo'; choose one of \['rdp', 'prv'\]"),
    (["privacy.mechanism=dp-sgd", "privacy.epsilon=null", "privacy.noise_multiplier=null"],
     r"dp-sgd needs privacy\.epsilon .* or privacy\.noise_multiplier; neither is set"),
    (["privacy.mechanism=dp-sgd"], r"dp-sgd needs privacy\.epsilon"),      # none.yaml sets neither
    (["privacy=dpsgd", "privacy.noise_multiplier=0"], r"noise_multiplier must be > 0"),
    (["privacy=dpsgd", "privacy.max_grad_norm=0"], r"max_grad_norm must be > 0"),
    (["privacy=dpsgd", "privacy.sample_rate=1.5"], r"sample_rate must be in \(0, 1\]"),
    (["privacy.mechanism=dp-sdg"], r"privacy\.mechanism='dp-sdg'; choose none, dp-sgd or site-dp"),
    (["privacy=dpsgd", "privacy.epsilon=lots"], r"privacy\.epsilon"),
    (["privacy=sitedp", "strategy.min_train_sites=3", "privacy.noise_multiplier=null"],
     r"site-dp needs privacy\.noise_multiplier > 0"),
    (SITEDP + ["strategy=krum"], r"strategy=krum: .* needs individual updates"),
    (SITEDP + ["strategy=fedmedian"], r"strategy=fedmedian: .* needs individual updates"),
    (SITEDP + ["strategy=fedadam"], r"plain weighted sum \(fedavg, fedprox\)"),
    (SITEDP + ["strategy.fraction_train=0.5"], r"sampling amplification"),
    (SITEDP + ["strategy=fedbn", "strategy.local_params=[*norm*]"], r"whole model"),
    (["privacy=sitedp"], r"needs every site's update .* strategy\.min_train_sites=3"),
    (["privacy=sitedp", "federation=sim2", "privacy.delta=0.5"],
     r"privacy\.delta=0\.5 >= 1/num_sites"),
    (SITEDP + ["privacy.delta=0.4"], r"privacy\.delta=0\.4 >= 1/num_sites"),
])
def test_bad_privacy_settings_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(overrides)


def test_the_accountant_error_lists_every_valid_accountant():
    with pytest.raises(ConfigError) as err:
        load_experiment(["privacy=dpsgd", "privacy.accountant=foo"])
    assert all(repr(name) in str(err.value) for name in ACCOUNTANTS)


def test_sitedp_delta_just_below_one_over_num_sites_is_accepted():
    cfg = load_experiment(["privacy=sitedp", "federation=sim2", "privacy.delta=0.4"])
    assert cfg.federation.num_sites == 2 and cfg.privacy.delta == 0.4


def test_dpsgd_is_refused_for_a_batch_coupled_task(monkeypatch):
    monkeypatch.setattr(ClassificationTask, "batch_coupling",
                        "an in-batch contrastive loss uses every other sample as a negative")
    with pytest.raises(ConfigError, match=r"dp-sgd refused for task 'classification': an "
                                          r"in-batch contrastive .* use privacy=sitedp"):
        load_experiment(["privacy=dpsgd"])
    # the objective still trains without DP, or with site-level DP
    assert load_experiment().privacy.mechanism == "none"
    assert load_experiment(SITEDP).privacy.mechanism == "site-dp"


def test_dpsgd_is_refused_with_logit_adjustment_but_site_dp_is_not():
    with pytest.raises(ConfigError, match=r"dp-sgd refused: logit_adjustment .* label counts"):
        load_experiment(["privacy=dpsgd", "task.options.logit_adjustment=1.0"])
    cfg = load_experiment(SITEDP + ["task.options.logit_adjustment=1.0"])
    assert cfg.task_options()["logit_adjustment"] == 1.0


def test_dpsgd_is_refused_with_feature_decorrelation_but_site_dp_is_not():
    with pytest.raises(ConfigError, match=r"dp-sgd refused for task 'classification': "
                                          r"feature_decorrelation .* depends on the others"):
        load_experiment(["privacy=dpsgd", "task.options.feature_decorrelation=0.1"])
    cfg = load_experiment(SITEDP + ["task.options.feature_decorrelation=0.1"])
    assert cfg.task_options()["feature_decorrelation"] == 0.1
    assert load_experiment(["privacy=dpsgd"]).privacy.mechanism == "dp-sgd"


def test_dpsgd_job_config_carries_the_dp_keys():
    cfg = load_experiment(["privacy=dpsgd", "privacy.sample_rate=0.25",
                           "privacy.max_grad_norm=0.5", "privacy.accountant=prv"])
    record = job_config(cfg, "run-x")
    assert PRIVATE_KEYS <= set(record.keys())
    assert record[wire.DP_MECHANISM] == wire.DP_SGD
    assert record[wire.DP_TARGET_EPSILON] == 8.0
    assert record[wire.DP_NOISE_MULTIPLIER] == 0.0                # 0: site calibrates
    assert record[wire.DP_MAX_GRAD_NORM] == 0.5
    assert record[wire.DP_SAMPLE_RATE] == 0.25
    assert record[wire.DP_ACCOUNTANT] == "prv"
    assert record[wire.DP_PLANNED_ROUNDS] == cfg.federation.num_rounds
    assert record[wire.RUN_ID] == "run-x"
    # and the site reads back exactly what the server meant
    request = decode_job(record, site_seed=0).privacy
    assert (request.mechanism, request.epsilon, request.noise_multiplier,
            request.max_grad_norm, request.sample_rate, request.accountant,
            request.planned_rounds, request.run_id) == \
        (wire.DP_SGD, 8.0, None, 0.5, 0.25, "prv", cfg.federation.num_rounds, "run-x")


def test_dpsgd_with_a_fixed_noise_multiplier_sends_it():
    cfg = load_experiment(["privacy=dpsgd", "privacy.epsilon=null",
                           "privacy.noise_multiplier=1.3"])
    record = job_config(cfg, "run-y")
    assert record[wire.DP_NOISE_MULTIPLIER] == 1.3 and record[wire.DP_TARGET_EPSILON] == 0.0
    assert record[wire.DP_SAMPLE_RATE] == 0.0                      # null: batch_size / n at sites
    assert decode_job(record, site_seed=0).privacy.noise_multiplier == 1.3


def test_no_privacy_sends_only_the_mechanism():
    record = job_config(load_experiment(), "run-x")
    assert record[wire.DP_MECHANISM] == wire.DP_NONE
    assert not PRIVATE_KEYS & set(record.keys())
    assert decode_job(record, site_seed=0).privacy.mechanism == wire.DP_NONE


def test_sitedp_job_config_sends_the_server_noise_but_no_dpsgd_keys():
    cfg = load_experiment(SITEDP)
    record = job_config(cfg, "run-s")
    assert record[wire.DP_MECHANISM] == wire.DP_SITE
    assert record[wire.DP_NOISE_MULTIPLIER] == 1.0
    assert record[wire.DP_PLANNED_ROUNDS] == cfg.federation.num_rounds
    assert record[wire.RUN_ID] == "run-s"
    assert not DPSGD_ONLY_KEYS & set(record.keys())


def test_sitedp_job_decodes_at_a_site_without_flowers_injected_clipping_norm():
    """Flower's client-side fixed-clipping wrapper adds the clipping norm to train messages
    only: evaluate messages carry the job exactly as the server encoded it, and a site must
    accept that (it refused every site-dp evaluate round before the norm was encoded)."""
    cfg = load_experiment(SITEDP + ["privacy.clipping_norm=2.0"])
    record = job_config(cfg, "run-s")
    assert record[wire.DP_CLIPPING_NORM] == 2.0
    request = decode_job(record, site_seed=0).privacy
    assert (request.mechanism, request.noise_multiplier, request.clipping_norm) == \
        (wire.DP_SITE, 1.0, 2.0)
