"""Kill the server process with SIGKILL after round 2 of 4, resume, and get the same weights."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from tests.conftest import final_weights, kill_after_checkpoint

pytestmark = pytest.mark.slow

ROUNDS = 4


def _cmd(sites, runs, *extra):
    return [sys.executable, "-m", "medfed.cli", "simulate", "experiment=smoke",
            f"data.root={sites}", f"runs_dir={runs}", "federation.num_sites=3",
            f"federation.num_rounds={ROUNDS}", "strategy=fedadam", "train.local_epochs=1",
            *extra]


def _run_dir(runs):
    dirs = sorted(p for p in runs.iterdir() if p.is_dir())
    assert len(dirs) == 1
    return dirs[0]


def test_resume_after_sigkill_matches_uninterrupted_run(three_sites, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    subprocess.run(_cmd(three_sites, full), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)
    expected = final_weights(_run_dir(full))

    killed = tmp_path / "killed"
    kill_after_checkpoint(_cmd(three_sites, killed), killed, 2, env)
    run_dir = _run_dir(killed)
    assert not (run_dir / "checkpoints" / f"round-{ROUNDS:04d}").exists()

    subprocess.run(_cmd(three_sites, killed, "resume=true"), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)
    resumed = final_weights(run_dir)
    assert resumed.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])
    assert len(runs) == 1                                   # continued, not duplicated
    history = client.get_metric_history(runs[0].info.run_id, "test/loss")
    assert sorted({m.step for m in history}) == list(range(1, ROUNDS + 1))
    versions = client.search_model_versions("name='medfed-classifier'")
    assert sorted(int(v.tags["round"]) for v in versions)[-1] == ROUNDS
