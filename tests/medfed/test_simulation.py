"""End to end: a real Flower simulation (Ray) of two sites for one round, then scan every
reply a site sent, the whole MLflow store and the run log for the PHI the generator wrote."""

from __future__ import annotations

import json
import logging

import mlflow
import pytest

from client.mods import egress_log
from medfed.simulation import simulate
from server.config import load_experiment
from tests.conftest import phi_strings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tiny_sites, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_experiment(["experiment=smoke", f"data.root={tiny_sites}",
                           f"runs_dir={out / 'runs'}"])
    log_file = out / "run.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        run_dir = simulate(cfg, client_mods=[egress_log(out / "egress")])
    finally:
        logging.getLogger().removeHandler(handler)
    return cfg, run_dir, out


def test_one_round_records_model_version_and_per_site_metrics(smoke_run):
    cfg, run_dir, _ = smoke_run
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    versions = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")
    assert len(versions) == cfg.federation.num_rounds == 1
    tags = versions[0].tags
    assert tags["round"] == "1" and tags["sites"] == "site-0,site-1"
    assert tags["config_hash"] == cfg.fingerprint()
    assert {"manifest.site-0", "manifest.site-1"} <= set(tags)
    run = client.get_run(versions[0].run_id or tags["mlflow_run_id"])
    metrics = run.data.metrics
    for site in ("site-0", "site-1"):
        assert f"site/{site}/train/train_loss" in metrics
        assert f"site/{site}/test/n" in metrics and f"site/{site}/val/n" in metrics
    assert "site/site-0/test/mcc" in metrics            # site-0 has labelled test studies
    assert "test/mcc" in metrics and "train/train_loss" in metrics
    assert run.info.status == "FINISHED"


def test_sites_sent_weights_metrics_and_ids_only(smoke_run):
    _, _, out = smoke_run
    summaries = [json.loads(p.read_text()) for p in (out / "egress").glob("*.json")]
    # the preflight's policy query: who answers and its declared policy (flags, budget), only
    policies = [s for s in summaries if s["message_type"] == "query"]
    assert len(policies) == 2
    for s in policies:
        assert set(s["records"]) == {"site", "policy"}
        assert set(s["records"]["site"]) == {"site-id", "role"}
        assert set(s["records"]["policy"]) <= {
            "site-id", "role", "require-dp", "require-secagg", "has-budget", "dp-epsilon-spent",
            "dp-epsilon", "dp-delta", "dp-max-run-epsilon", "dp-min-noise-multiplier",
            "dp-trust-server", "serves-layout", "weights-found", "weights-digest-match"}
    summaries = [s for s in summaries if s not in policies]
    assert len(summaries) == 4                       # 2 sites x (train + evaluate)
    for s in summaries:
        assert set(s["records"]) <= {"arrays", "metrics", "site"}
        assert {"site-id", "manifest-fingerprint"} <= set(s["records"]["site"]) <= \
            {"site-id", "manifest-fingerprint", "ingest-report"}
    # the ingest counts travel once per run and site (the first reply), not with every message
    assert sum("ingest-report" in s["records"]["site"] for s in summaries) == 2


def test_no_phi_in_payloads_mlflow_or_logs(smoke_run, tiny_sites):
    _, run_dir, out = smoke_run
    phi = phi_strings(tiny_sites)
    assert len(phi) > 20
    dicom_names = {p.name for p in tiny_sites.rglob("*.dcm")}
    scanned = [p for p in (out / "egress").iterdir()] + \
              [p for p in run_dir.rglob("*") if p.is_file()] + [out / "run.log"]
    assert any(p.suffix == ".pb" for p in scanned) and any(p.name == "mlflow.db" for p in scanned)
    assert any("artifacts" in p.parts for p in scanned)
    for path in scanned:
        blob = path.read_bytes()
        for secret in phi | dicom_names:
            assert secret.encode() not in blob, f"{secret!r} leaked into {path.name}"


def test_multi_label_findings_train_and_pool_in_a_simulation(tiny_sites, tmp_path):
    """task=findings3: sites read findings.csv, train one sigmoid per finding and send one
    binary confusion matrix per finding, which the server pools into macro metrics."""
    cfg = load_experiment(["experiment=smoke", "task=findings3", f"data.root={tiny_sites}",
                           f"runs_dir={tmp_path / 'runs'}"])
    assert cfg.task_options()["num_classes"] == 3
    run_dir = simulate(cfg)
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])[0]
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    for key in ("test/mcc", "test/f1", "test/f1_class_2", "site/site-0/test/f1_class_2"):
        assert key in metrics, key
    # per-site figures only: the confusion counts are pooled, never logged cell by cell
    assert not [k for k in metrics if "mlcm" in k or "confusion" in k or "cm_" in k]
    n = sum(metrics.get(f"site/{s}/test/n", 0.0) for s in ("site-0", "site-1"))
    assert n == metrics["test/n"] > 0           # every labelled test study, pooled once
    # the registered model scores each finding on its own (sigmoid), not a softmax over them
    import numpy as np
    import torch

    from models import MODELS
    from tests.conftest import final_weights

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    try:
        served = mlflow.pytorch.load_model(f"models:/{cfg.tracking.registered_model}/1")
    finally:
        mlflow.set_tracking_uri(before)
    model = MODELS.build(cfg.model.name, cfg.model_options()).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in final_weights(run_dir).items()})
    x = torch.randn(2, 4, 64, 64)
    want = model(x, torch.ones(2, 4, dtype=torch.bool)).sigmoid()
    got = served(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not np.allclose(got.sum(-1).detach().numpy(), 1.0)


def test_a_research_export_site_counts_as_a_site_with_data(tmp_path):
    """``check_sites`` (before anything is written): a site's data is its DICOM files or,
    for a NIfTI/NRRD research export, its ``manifest.csv``; a site with neither is refused
    in one line naming both."""
    from medfed.simulation import check_sites
    from server.config import ConfigError

    (tmp_path / "site-0" / "dicom").mkdir(parents=True)
    (tmp_path / "site-0" / "dicom" / "a.dcm").write_bytes(b"")
    (tmp_path / "site-1").mkdir()
    cfg = load_experiment(["experiment=smoke", f"data.root={tmp_path}",
                           "federation.num_sites=2"])
    with pytest.raises(ConfigError, match=r"site-1 .* has neither DICOM files \(dicom/\) nor "
                                          r"a research export's manifest.csv"):
        check_sites(cfg)
    (tmp_path / "site-1" / "manifest.csv").write_text("study_id,channel,file\n")
    assert check_sites(cfg) == tmp_path.resolve()
