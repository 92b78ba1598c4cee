"""End to end with real Flower simulations: DP-SGD and site-level DP, each site enforcing the
budget its operator set, its ledger surviving across runs, the guarantee recorded in MLflow."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest

from client.privacy.ledger import PrivacyLedger
from medfed.cli import main as cli
from medfed.simulation import simulate
from server.config import load_experiment

pytestmark = pytest.mark.slow

BUDGET = "+federation.site_node_config={dp-epsilon:10.0,dp-delta:1e-5}"


@pytest.fixture(scope="module")
def sites(tiny_sites, tmp_path_factory):
    """A private copy: these runs write ledgers into the site directories."""
    root = tmp_path_factory.mktemp("dp") / "sites"
    shutil.copytree(tiny_sites, root)
    return root


@pytest.fixture(scope="module")
def dpsgd_run(sites):
    cfg = load_experiment(["experiment=smoke", "privacy=dpsgd", "privacy.epsilon=8",
                           "federation.num_rounds=2", BUDGET, f"data.root={sites}",
                           f"runs_dir={sites.parent / 'runs'}"])
    return cfg, simulate(cfg)


def ledger(sites, site):
    return PrivacyLedger(sites / site / ".medfed" / "privacy-ledger.sqlite")


def test_each_site_charges_its_ledger_and_reaches_the_target(dpsgd_run, sites):
    for site in ("site-0", "site-1"):
        entries = ledger(sites, site).entries()
        assert [e.server_round for e in entries] == [1, 2]
        assert all(e.mechanism == "dp-sgd" and e.accountant == "rdp" for e in entries)
        assert entries[0].noise_multiplier == entries[1].noise_multiplier   # calibrated once
        assert entries[0].epsilon < entries[1].epsilon <= 8.0 + 0.05
        assert entries[1].epsilon > 7.5


def test_mlflow_holds_epsilon_per_site_per_round_and_version_tags(dpsgd_run):
    cfg, run_dir = dpsgd_run
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    versions = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")
    run_id = versions[0].tags["mlflow_run_id"]
    for site in ("site-0", "site-1"):
        history = client.get_metric_history(run_id, f"site/{site}/train/dp-epsilon")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    metrics = client.get_run(run_id).data.metrics
    assert "site/site-0/train/train_loss" not in metrics     # not covered by the accountant
    for version in versions:
        tags = version.tags
        assert tags["privacy.mechanism"] == "dp-sgd" and tags["privacy.accountant"] == "rdp"
        assert float(tags["privacy.epsilon.site-0"]) > 0
        assert tags["privacy.delta.site-1"] == "1e-05" and tags["privacy.max_grad_norm"] == "1"
    artifacts = [a.path for a in client.list_artifacts(run_id, "privacy")]
    assert "privacy/report.json" in artifacts


def test_privacy_cli_prints_the_verified_ledger(dpsgd_run, sites, capsys):
    import stat

    assert cli(["privacy", "--site-dir", str(sites / "site-0"), "--json"]) == 0
    rounds = json.loads(capsys.readouterr().out)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert {"q", "noise_multiplier", "steps", "delta", "epsilon"} <= set(rounds[0])
    # a deployed site's ledger is in its --privacy-dir: the same ledger, read from there
    privacy_dir = sites / "site-0" / ".medfed"
    assert cli(["privacy", "--privacy-dir", str(privacy_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds"] == rounds
    ledger = privacy_dir / "privacy-ledger.sqlite"      # the site user's alone
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600


def test_a_second_run_is_refused_by_the_sites_budget(dpsgd_run, sites):
    cfg = load_experiment(["experiment=smoke", "privacy=dpsgd", "privacy.epsilon=8",
                           "federation.num_rounds=2", BUDGET, f"data.root={sites}",
                           f"runs_dir={sites.parent / 'runs'}"])
    with pytest.raises(Exception, match="budget 10"):
        simulate(cfg)
    assert len(ledger(sites, "site-0").entries()) == 2        # refused before any charge


def test_site_level_dp_trains_and_is_accounted(sites):
    cfg = load_experiment(["experiment=smoke", "privacy=sitedp", "privacy.noise_multiplier=1.0",
                           "privacy.clipping_norm=1.0", "privacy.delta=1e-3",
                           "federation.num_rounds=2", "strategy.min_train_sites=2",
                           "+federation.site_node_config={dp-epsilon:100.0,dp-delta:1e-5,"
                           "privacy-dir:.medfed/sitedp,dp-trust-server:true}",
                           f"data.root={sites}",
                           f"runs_dir={sites.parent / 'runs'}"])
    run_dir = simulate(cfg)
    entries = PrivacyLedger(sites / "site-1" / ".medfed" / "sitedp" /
                            "privacy-ledger.sqlite").entries()
    assert [(e.mechanism, e.sample_rate, e.steps) for e in entries] == [("site-dp", 1.0, 1)] * 2
    assert {e.trust for e in entries} == {"server"}           # the server added the noise
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    version = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")[0]
    history = client.get_metric_history(version.tags["mlflow_run_id"],
                                        "privacy/site_level_epsilon")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(values) == 2 and 0 < values[0] < values[1]
    assert version.tags["privacy.mechanism"] == "site-dp"



def test_distributed_site_level_dp_in_a_ray_simulation(three_sites, tmp_path):
    """experiment=sitedp as shipped: malicious-secure SecAgg+ (simulated identity keys) with
    every site adding its Skellam share before masking; each site books the release as
    trusting at least 3 contributors, never the server, and the server adds nothing."""
    root = tmp_path / "sites"
    shutil.copytree(three_sites, root)
    cfg = load_experiment(["experiment=sitedp", "federation.num_rounds=2", f"data.root={root}",
                           f"runs_dir={tmp_path / 'runs'}", "tracking.log_models=false"])
    assert cfg.privacy.noise != "server" and cfg.secagg.enabled and cfg.secagg.authenticated
    run_dir = simulate(cfg)
    for site in ("site-0", "site-1", "site-2"):
        entries = PrivacyLedger(root / site / ".medfed" / "privacy-ledger.sqlite").entries()
        assert [(e.mechanism, e.trust) for e in entries] == [("site-dp", "sites>=3")] * 2
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "privacy/site_level_epsilon")
    assert len(history) == 2
