"""End to end on chest radiographs: three synthetic radiology departments (CR/DX,
MONOCHROME1/2, frontal + lateral), ``data/layout=chest_xray``, a tiny model for two rounds of
a real Flower simulation. The job carries the layout; each site reads its films through it,
trains and reports its evaluation metrics."""

from __future__ import annotations

import pytest

from medfed.simulation import simulate
from medfed.synth.chest import synthesize_chest
from server.config import load_experiment
from tests.medfed.checks import assert_sites_trained

pytestmark = pytest.mark.slow


def test_three_chest_xray_sites_train_two_rounds_and_report_per_site_metrics(tmp_path):
    root = tmp_path / "data"
    synthesize_chest(root, n_sites=3, seed=2, patients=10)
    cfg = load_experiment(["experiment=smoke", "federation=sim3", "federation.num_rounds=2",
                           "data/layout=chest_xray", "task=chest3", "task.image_size=32",
                           "tracking.log_models=false", f"data.root={root}",
                           f"runs_dir={tmp_path / 'runs'}"])
    assert cfg.job_spec().layout.name == "chest_xray"
    assert_sites_trained(simulate(cfg), n_sites=3, rounds=2)
