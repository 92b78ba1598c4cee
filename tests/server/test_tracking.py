"""MlflowTracker's per-site evaluation metrics: the figures, never the confusion counts."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics import SplitMetrics, multilabel_from_confusions
from protocol import wire
from protocol.metrics import to_record
from server.config import load_experiment
from strategies.guard import Rejection
from strategies.observed import RoundRecord, SiteReply


def _reply(site: str, node: int, test: SplitMetrics) -> SiteReply:
    """An evaluate reply as the server's observer sees it (lists kept, see site_replies)."""
    val = SplitMetrics(n=0, loss=0.0, finding_confusions=np.zeros((3, 2, 2)))
    metrics = dict(to_record(val, "val")) | dict(to_record(test, "test"))
    return SiteReply(site_id=site, node_id=node,
                     metrics=metrics | {wire.NUM_EXAMPLES: test.n, wire.EVAL_SECONDS: 1.0})


def test_per_site_metrics_are_scalars_without_confusion_cells(tmp_path):
    """BUG 4: per-site logging filtered only ``cm_`` keys, so every multi-label ``mlcm_*``
    cell reached MLflow as a per-site metric."""
    import mlflow

    from server.tracking import MlflowTracker

    cfg = load_experiment(["experiment=smoke", "task=findings3", f"runs_dir={tmp_path}"])
    a = np.array([[[5, 1], [2, 2]], [[6, 0], [1, 3]], [[3, 3], [1, 3]]])      # 10 studies
    b = np.array([[[2, 1], [1, 2]], [[4, 0], [0, 2]], [[1, 1], [2, 2]]])      # 6 studies
    record = RoundRecord(round=1, evaluate=[
        _reply("site-0", 1, SplitMetrics(n=10, loss=0.5, finding_confusions=a, auroc=0.7)),
        _reply("site-1", 2, SplitMetrics(n=6, loss=0.9, finding_confusions=b, auroc=None))],
        evaluate_rejected=[Rejection("site-9", "auroc out of [0, 1]", 9)])
    tracker = MlflowTracker(cfg, tmp_path)
    try:
        tracker.on_round_end(record)
    finally:
        tracker.finish("")
        mlflow.end_run()
    logged = mlflow.MlflowClient(tracker.uri).get_run(tracker.run_id).data.metrics
    per_site = [k for k in logged if k.startswith("site/")]
    assert [k for k in per_site if any(s in k for s in ("mlcm", "cm_", "confusion"))] == []
    for site, cms in (("site-0", a), ("site-1", b)):
        for key, value in multilabel_from_confusions(cms).items():     # the figures are there
            assert logged[f"site/{site}/test/{key}"] == pytest.approx(value)
        assert logged[f"site/{site}/val/n"] == 0.0
        assert f"site/{site}/val/mcc" not in logged                    # empty split: n only
    assert logged["site/site-0/test/auroc"] == pytest.approx(0.7)
    assert "site/site-1/test/auroc" not in logged                      # undefined: absent
    assert logged["test/mcc"] == pytest.approx(multilabel_from_confusions(a + b)["mcc"])
    assert logged["test/auroc"] == pytest.approx(0.7)                  # defined sites only
    assert logged["test/n"] == 16.0
    # an evaluation the guard left out is counted and named, as a rejected update is
    assert logged["eval/replies_rejected"] == 1.0 and logged["eval/sites_ok"] == 2.0
    assert logged["site/site-9/evaluate/rejected"] == 1.0
    tags = mlflow.MlflowClient(tracker.uri).get_run(tracker.run_id).data.tags
    assert tags["eval-rejected.round-1.site-9"] == "auroc out of [0, 1]"


def test_a_rounds_metrics_from_all_its_sites_are_written_in_one_batch(tmp_path):
    """One ``log_batch`` per round, whatever the number of sites (not one per site)."""
    import mlflow

    from server.tracking import MlflowTracker

    cfg = load_experiment(["experiment=smoke", f"runs_dir={tmp_path}",
                           "tracking.log_models=false"])
    tracker = MlflowTracker(cfg, tmp_path)
    batches, log_batch = [], tracker.client.log_batch
    tracker.client.log_batch = lambda run_id, **kw: batches.append(kw) or log_batch(run_id, **kw)
    sites = [f"site-{i}" for i in range(10)]
    try:
        for rnd in (1, 2):
            tracker.on_train(RoundRecord(round=rnd, train=[
                SiteReply(s, i, {"loss": 0.5, "train-seconds": 1.0}) for i, s in enumerate(sites)]))
            tracker.on_round_end(RoundRecord(round=rnd))
        tracker.latest_version()
    finally:
        tracker.finish("")
        mlflow.end_run()
    assert len(batches) == 2
    assert {f"site/{s}/train/loss" for s in sites} <= {m.key for m in batches[0]["metrics"]}


def test_each_sites_records_name_its_node_and_a_refused_site_id_is_tagged(tmp_path):
    """The console named each reply with its Flower node id, MLflow by the site id only: a
    node answering as another site left no trace there. The run tags which node each site's
    records come from (once a phase, and again when it changes) and every site id it refused
    a node (``strategies.site_names``)."""
    import mlflow

    from server.tracking import MlflowTracker
    from strategies.site_names import ClaimRefused

    cfg = load_experiment(["experiment=smoke", f"runs_dir={tmp_path}",
                           "tracking.log_models=false"])
    refused = ClaimRefused(2, "site-1", "which node 1 holds in this run: shown as node-2")
    tracker = MlflowTracker(cfg, tmp_path)
    try:
        tracker.on_train(RoundRecord(round=1, train=[
            SiteReply("site-1", 1, {"loss": 0.5}), SiteReply("node-2", 2, {"loss": 0.4})],
            names_refused=[refused]))
        tracker.on_round_end(RoundRecord(round=1))
        tracker.on_train(RoundRecord(round=2, train=[SiteReply("site-1", 1, {"loss": 0.3})]))
        tracker.on_round_end(RoundRecord(round=2))
        tracker.latest_version()
    finally:
        tracker.finish("")
        mlflow.end_run()
    tags = mlflow.MlflowClient(tracker.uri).get_run(tracker.run_id).data.tags
    assert tags["site/site-1/node_id"] == "1" and tags["site/node-2/node_id"] == "2"
    assert tags["site-id-refused.round-1.node-2"] == str(refused)
    assert str(refused).startswith("node 2 claims site id 'site-1', which node 1 holds")
