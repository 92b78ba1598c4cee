"""Kill the server process with SIGKILL after round 2 of 4, with its MLflow writes still queued,
resume, and get the same weights and an MLflow record that agrees with the checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


# Loaded into the killed run's processes (PYTHONPATH): the registry hangs, so every round's
# MLflow writes stay queued (journalled) until the kill - registering never finishes first.
# Only the server's process: the processes it starts (Ray's) inherit the marker and skip it.
HANGING_REGISTRY = f"""
import os, sys, threading
if not os.environ.get("MEDFED_TEST_REGISTRY_HANGS"):
    os.environ["MEDFED_TEST_REGISTRY_HANGS"] = "1"
    sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
    import server.registration as registration
    registration.write_round = lambda *args, **kwargs: threading.Event().wait()
"""


def _version_digests(run_dir) -> dict[int, str]:
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    return {int(v.tags["round"]): v.tags["arrays_sha256"]
            for v in client.search_model_versions("name='medfed-classifier'")}


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
    expected_versions = _version_digests(_run_dir(full))

    killed = tmp_path / "killed"
    hang = tmp_path / "hang"
    hang.mkdir()
    (hang / "sitecustomize.py").write_text(HANGING_REGISTRY)
    kill_after_checkpoint(_cmd(three_sites, killed), killed, 2,
                          env | {"PYTHONPATH": str(hang)})
    run_dir = _run_dir(killed)
    assert not (run_dir / "checkpoints" / f"round-{ROUNDS:04d}").exists()
    queued = sorted(p.name for p in (run_dir / "registrations").glob("round-*.json"))
    assert queued[:2] == ["round-0001.json", "round-0002.json"]     # killed with both queued
    # the killed server's export template (the traced model and its weights) is left in its
    # run directory, not in the system's temp folder, and the resume removes it
    assert list(run_dir.glob(".export-*"))

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
    # one version per round (the queued ones written on resume), each with its
    # checkpoint's weights; nothing left queued
    assert sorted(int(v.tags["round"]) for v in versions) == list(range(1, ROUNDS + 1))
    by_round = {int(v.tags["round"]): v.tags["arrays_sha256"] for v in versions}
    assert by_round == expected_versions         # the uninterrupted run's weights, round by round
    checkpoints = sorted((run_dir / "checkpoints").glob("round-*"))
    assert len(checkpoints) == 3
    for path in checkpoints:
        manifest = json.loads((path / "manifest.json").read_text())
        assert by_round[manifest["round"]] == manifest["arrays_sha256"]
    assert not list((run_dir / "registrations").glob("round-*"))
    assert not list(run_dir.glob(".export-*"))
