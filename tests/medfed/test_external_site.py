"""End to end: two training sites and one external site (evaluation only) in a real Flower
simulation. The external site never trains; its metrics are recorded apart. ``medfed
predict`` on the external site's DICOM reproduces the federation's evaluation of a version."""

from __future__ import annotations

import csv
import json

import mlflow
import numpy as np
import pytest
import torch

from client.data.pseudonyms import site_key
from client.data.site import load_site
from client.mods import egress_log
from client.runtime import SiteDataCache, SiteIdentity
from medfed.cli import main
from medfed.simulation import simulate
from models.metrics import classification_metrics
from protocol import wire
from server.config import ConfigError, load_experiment
from tests.conftest import CLASSES, final_weights
from tests.medfed.test_predict import secrets_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sites_with_external(tmp_path_factory):
    from medfed.synth.sites import synthesize

    root = tmp_path_factory.mktemp("ext") / "data"
    synthesize(root, n_sites=2, seed=11, patients=12, external=True)
    return root


@pytest.fixture(scope="module")
def external_run(sites_with_external, tmp_path_factory):
    """One 2-round simulation with the external site, versions registered: (cfg, run dir,
    egress folder)."""
    out = tmp_path_factory.mktemp("ext-run")
    cfg = load_experiment(["experiment=smoke", f"data.root={sites_with_external}",
                           f"runs_dir={out / 'runs'}", "federation.num_rounds=2",
                           "federation.external_sites=true", "task.evaluate_missing=true"])
    return cfg, simulate(cfg, client_mods=[egress_log(out / "egress")]), out / "egress"


def test_external_site_evaluates_every_round_and_never_trains(external_run, sites_with_external,
                                                              tmp_path):
    cfg, run_dir, egress = external_run
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])[0]
    assert run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                  "train/sites_ok")}
    assert history == {1: 2.0, 2: 2.0}                      # only the training sites
    metrics = run.data.metrics
    labelled = sum(s.label >= 0 for s in load_site(sites_with_external / "external",
                                                   CLASSES).studies)
    assert metrics["site/external/external/n"] == metrics["external/n"] == labelled > 0
    assert "external/mcc" in metrics and "external-without-T1ce/n" in metrics
    # the training sites' pooled test split holds their studies only
    assert metrics["test/n"] == sum(metrics.get(f"site/site-{i}/test/n", 0) for i in (0, 1))
    assert not any(k.startswith("site/external/test") for k in metrics)
    summary = client.download_artifacts(run.info.run_id, "summary.txt", str(tmp_path))
    header, *lines = open(summary).read().splitlines()
    rows = [line for line in lines if line.split()[0].isdigit()]   # notes follow the rows
    assert header.split()[-2:] == ["external_mcc", "external_auroc"] and len(rows) == 2
    assert float(rows[-1].split()[-2]) == pytest.approx(metrics["external/mcc"], abs=5e-4)
    versions = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")
    assert all("external_mcc" in v.tags for v in versions) and len(versions) == 2
    # what left each site: the external one answered the preflight's policy query and the
    # role query, and evaluated, only
    by_site = {}
    for path in egress.glob("*.json"):       # <time>-<pid>-<random>-<message type>.json
        reply = json.loads(path.read_text())
        site = reply["records"]["site"]["site-id"] if "records" in reply else "error"
        by_site.setdefault(site, []).append(path.name.rsplit("-", 1)[1])
    assert "error" not in by_site                  # no site refused anything (no train sent)
    assert sorted(by_site["external"]) == ["evaluate.json", "evaluate.json", "query.json",
                                           "query.json"]
    assert sorted(by_site["site-0"]).count("train.json") == 2


def test_predict_on_the_external_site_gives_the_federation_evaluation(
        external_run, sites_with_external, tmp_path, capsys):
    """The newest version scored by ``medfed predict`` on the external site's DICOM: per
    study, the probabilities the site's evaluation computes with that round's global weights;
    pooled over the labelled studies, the accuracy/MCC/AUROC the federation tagged the version
    with. The CSV holds no PHI, UID or path."""
    cfg, run_dir, _ = external_run
    tracking = f"sqlite:///{run_dir / 'mlflow.db'}"
    name = cfg.tracking.registered_model
    client = mlflow.MlflowClient(tracking)
    version = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    assert version.tags["round"] == "2"                  # the checkpoint's round
    site_dir, out = sites_with_external / "external", tmp_path / "predictions.csv"
    code = main(["predict", "--model", f"models:/{name}/{version.version}", "--data-dir",
                 str(site_dir), "--tracking-uri", tracking, "--out", str(out),
                 "--privacy-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = {r["study_key"]: r for r in csv.DictReader(out.open())}
    probs = {k: np.array([float(r[f"p_{c}"]) for c in CLASSES]) for k, r in rows.items()}

    # as the external site evaluates, read as a deployed site (its own pseudonym key)
    key = site_key(tmp_path / "state")
    site = SiteIdentity("external", site_dir, torch.device("cpu"), wire.ROLE_EXTERNAL,
                        pseudonym_key=key)
    data, splits = SiteDataCache().get(site, CLASSES, cfg.task.image_size)
    labelled = [s for s in data.studies if s.label >= 0]
    assert len(rows) == len(data.studies) >= len(labelled) >= 5
    model, _ = cfg.job_spec().build()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in final_weights(run_dir).items()})
    model.eval()
    dataset = splits[wire.EXTERNAL_SPLIT]
    with torch.no_grad():
        for study, i in zip(labelled, range(len(dataset))):
            item = dataset[i]
            expected = model(item["image"][None], item["present"][None]).softmax(1)[0]
            np.testing.assert_allclose(probs[study.key], expected.numpy(), rtol=0, atol=1e-5)

    # the federation's figures for this version, from the predicted probabilities
    labels = np.array([s.label for s in labelled])
    scores = classification_metrics(labels, np.stack([probs[s.key] for s in labelled]))
    for metric in ("accuracy", "mcc", "auroc"):
        assert scores[metric] == pytest.approx(float(version.tags[f"external_{metric}"]),
                                               abs=6e-5), metric

    secrets = secrets_of(site_dir)
    blob = out.read_text() + err
    assert len(secrets) > 20 and not [s for s in secrets if s in blob]


def test_external_sites_need_an_external_folder(tiny_sites, tmp_path):
    cfg = load_experiment(["experiment=smoke", f"data.root={tiny_sites}",
                           f"runs_dir={tmp_path}", "federation.external_sites=true"])
    with pytest.raises(ConfigError, match="external/dicom"):
        simulate(cfg)
