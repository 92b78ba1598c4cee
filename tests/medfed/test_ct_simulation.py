"""End to end on CT volumes: three synthetic CT departments (shuffled single-frame series,
enhanced multi-frame, an oblique acquisition, per-slice rescale), ``experiment=ct3``
(``data/layout=ct_volume``, a tiny 3D ViT on a 32^3 grid) for two rounds of a real Flower
simulation. The job carries the 3D layout; each site reads its series as volumes, trains and
reports its evaluation metrics."""

from __future__ import annotations

import pytest

from medfed.simulation import simulate
from medfed.synth.ct import synthesize_ct
from server.config import load_experiment
from tests.medfed.checks import assert_sites_trained

pytestmark = pytest.mark.slow


def test_three_ct_sites_train_a_3d_vit_two_rounds_and_report_per_site_metrics(tmp_path):
    root = tmp_path / "data"
    synthesize_ct(root, n_sites=3, seed=2, patients=10)
    cfg = load_experiment(["experiment=ct3", "federation.num_rounds=2", "train.local_epochs=1",
                           "tracking.log_models=false", f"data.root={root}",
                           f"runs_dir={tmp_path / 'runs'}"])
    job = cfg.job_spec()
    assert job.layout.name == "ct_volume" and job.layout.dims == "3d"
    assert job.model_options["spatial_dims"] == 3 and job.model_options["num_sequences"] == 3
    assert_sites_trained(simulate(cfg), n_sites=3, rounds=2)
