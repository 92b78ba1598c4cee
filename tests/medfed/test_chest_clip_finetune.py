"""End to end on chest radiographs with reports: three synthetic radiology departments
(``data/layout=chest_xray``), a real Flower simulation of two phases - federated image-report
CLIP on the films and their (site-de-identified) reports, then supervised fine-tuning of the
finding classifier from CLIP's image tower. Both phases register versions with lineage and
log per-site evaluation; no reply, MLflow file or log holds PHI or report text."""

from __future__ import annotations

import json
import logging
import re

import mlflow
import numpy as np
import pytest

from client.data.report_deid import deidentify_report
from client.mods import egress_log
from medfed.simulation import simulate
from medfed.synth.chest import synthesize_chest
from models.tasks import backbone_weights
from protocol import wire
from server.config import load_experiment
from tests.conftest import _fixed_pseudonym_keys, final_weights, phi_strings

pytestmark = pytest.mark.slow

SITES = ("site-0", "site-1", "site-2")
# Wording only the reports hold (not class names, not the tokenizer's vocabulary).
REPORT_PHRASES = ("costophrenic angle with a meniscus", "Patchy airspace opacity",
                  "cardiopulmonary abnormality", "Results discussed with", "COMPARISON:")


def first_weights_log(directory):
    """Client mod: the arrays of each fine-tuning train message (no CLIP temperature)."""
    def mod(msg, context, call_next):
        content = msg.content
        if msg.metadata.message_type.startswith("train") and wire.ARRAYS in content \
                and "logit_scale" not in content[wire.ARRAYS]:
            directory.mkdir(parents=True, exist_ok=True)
            arrays = {k: v.numpy() for k, v in content[wire.ARRAYS].items()}
            np.savez(directory / f"{msg.metadata.message_id}.npz", **arrays)
        return call_next(msg, context)
    return mod


@pytest.fixture(scope="module")
def chest_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("chest-clip")
    root = _fixed_pseudonym_keys(_synth(out / "data"))
    cfg = load_experiment(["experiment=smoke", "federation=sim3", "federation.num_rounds=1",
                           "data/layout=chest_xray", "task=chest3", "task.image_size=32",
                           "pretrain=clip_chest", "pretrain.num_rounds=1",
                           f"data.root={root}", f"runs_dir={out / 'runs'}"])
    handler = logging.FileHandler(out / "run.log")
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        run_dir = simulate(cfg, client_mods=[egress_log(out / "egress"),
                                             first_weights_log(out / "sent")])
    finally:
        logging.getLogger().removeHandler(handler)
    return cfg, run_dir, out, root


def _synth(root):
    synthesize_chest(root, n_sites=3, seed=2, patients=10)
    return root


def test_clip_then_finetune_register_versions_with_per_site_evaluation(chest_run):
    cfg, run_dir, _, _ = chest_run
    assert cfg.job_spec().layout.name == "chest_xray"
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    clip = client.search_model_versions(f"name='{cfg.pretrain.registered_model}'")
    fine = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")
    assert len(clip) == 1 and len(fine) == 1
    assert clip[0].tags["task"] == "clip" and fine[0].tags["task"] == "classification"
    assert fine[0].tags["parent.model"] == cfg.pretrain.registered_model
    assert fine[0].tags["parent.version"] == str(clip[0].version)

    pre = client.get_run(clip[0].tags["mlflow_run_id"])
    tuned = client.get_run(fine[0].tags["mlflow_run_id"])
    assert pre.info.status == tuned.info.status == "FINISHED"
    for site in SITES:
        # every training study reached the objective with its report
        assert pre.data.metrics[f"site/{site}/train/train_report_fraction"] == 1.0, site
        assert pre.data.metrics[f"site/{site}/val/n_reports"] > 0, site
        assert f"site/{site}/val/recall_i2r_1" in pre.data.metrics, site
        assert f"site/{site}/train/train_loss" in tuned.data.metrics, site
        assert f"site/{site}/val/n" in tuned.data.metrics, site
        assert f"site/{site}/test/n" in tuned.data.metrics, site
    assert np.isfinite(pre.data.metrics["train/train_loss"])
    assert "test/mcc" in tuned.data.metrics and tuned.data.metrics["test/n"] > 0


def test_finetuning_starts_from_the_clip_image_tower(chest_run):
    _, run_dir, out, _ = chest_run
    tower = backbone_weights(final_weights(run_dir / "pretrain"))
    sent = sorted((out / "sent").glob("*.npz"))
    assert len(sent) == len(SITES)                     # one fine-tuning round, three sites
    assert len(tower) > 10
    for path in sent:
        with np.load(path) as arrays:
            assert "logit_scale" not in arrays and not any(k.startswith("text.") for k in arrays)
            assert set(tower) <= set(arrays)
            for key, value in tower.items():
                np.testing.assert_array_equal(arrays[key], value, err_msg=key)


def test_no_phi_and_no_report_text_leaves_a_site(chest_run):
    _, run_dir, out, root = chest_run
    phi = phi_strings(root)
    assert len(phi) > 20
    texts = [json.loads(line)["text"] for site in SITES
             for line in (root / site / "reports.jsonl").read_text().splitlines()]
    texts += [deidentify_report(t)[0] for t in texts]       # what the sites trained on
    # Every sentence of every report (as written and as the site used it), and phrases.
    report_values = {s.strip() for t in texts for s in re.split(r"(?<=\.) ", t)
                     if len(s.strip()) >= 25} | set(REPORT_PHRASES)
    assert all(any(p in t for t in texts) for p in REPORT_PHRASES)    # the scan can find them
    dicom_names = {p.name for p in root.rglob("*.dcm")}
    scanned = [p for p in (out / "egress").iterdir()] + \
              [p for p in run_dir.rglob("*") if p.is_file()] + [out / "run.log"]
    assert sum(p.suffix == ".pb" for p in scanned) >= 4 * len(SITES)   # train + evaluate x 2
    assert any(p.name == "mlflow.db" for p in scanned)
    for path in scanned:
        blob = path.read_bytes()
        for secret in phi | dicom_names | report_values:
            assert secret.encode() not in blob, f"{secret[:40]!r} leaked into {path.name}"
