"""End to end: two training sites and one external site (evaluation only) in a real Flower
simulation. The external site never trains; its metrics are recorded apart."""

from __future__ import annotations

import json

import mlflow
import pytest

from client.data.site import load_site
from client.mods import egress_log
from medfed.simulation import simulate
from server.config import ConfigError, load_experiment
from tests.conftest import CLASSES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sites_with_external(tmp_path_factory):
    from medfed.synth.sites import synthesize

    root = tmp_path_factory.mktemp("ext") / "data"
    synthesize(root, n_sites=2, seed=11, patients=12, external=True)
    return root


def test_external_site_evaluates_every_round_and_never_trains(sites_with_external, tmp_path):
    cfg = load_experiment(["experiment=smoke", f"data.root={sites_with_external}",
                           f"runs_dir={tmp_path / 'runs'}", "federation.num_rounds=2",
                           "federation.external_sites=true", "task.evaluate_missing=true"])
    run_dir = simulate(cfg, client_mods=[egress_log(tmp_path / "egress")])
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
    for path in (tmp_path / "egress").glob("*.json"):       # <time>-<message type>.json
        reply = json.loads(path.read_text())
        site = reply["records"]["site"]["site-id"] if "records" in reply else "error"
        by_site.setdefault(site, []).append(path.name.split("-", 1)[1])
    assert "error" not in by_site                  # no site refused anything (no train sent)
    assert sorted(by_site["external"]) == ["evaluate.json", "evaluate.json", "query.json",
                                           "query.json"]
    assert sorted(by_site["site-0"]).count("train.json") == 2


def test_external_sites_need_an_external_folder(tiny_sites, tmp_path):
    cfg = load_experiment(["experiment=smoke", f"data.root={tiny_sites}",
                           f"runs_dir={tmp_path}", "federation.external_sites=true"])
    with pytest.raises(ConfigError, match="external/dicom"):
        simulate(cfg)
