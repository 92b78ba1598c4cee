"""Kill a two-phase run (pretrain -> finetune) during phase 1, resume it by naming its run
directory: phase 1 continues in its MLflow run, then phase 2 runs from the start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

pytestmark = pytest.mark.slow


def _cmd(sites, runs, *extra):
    return [sys.executable, "-m", "medfed.cli", "simulate", "experiment=smoke",
            f"data.root={sites}", f"runs_dir={runs}", "pretrain=mm_dino",
            "pretrain.num_rounds=2", "pretrain.options.out_dim=64", *extra]


def _kill_after_phase_1_round_1(cmd, runs, env):
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600       # a hang guard, not a timing assertion
    try:
        while time.monotonic() < deadline:
            found = list(runs.glob("*/pretrain/checkpoints/round-0001"))
            if found or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert found, "phase 1's first checkpoint never appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)            # the server and its Ray workers
        proc.wait(timeout=60)
    return found[0].parents[2]


def test_phase_1_killed_then_resumed_by_run_dir_runs_both_phases(tiny_sites, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = tmp_path / "runs"
    run_dir = _kill_after_phase_1_round_1(_cmd(tiny_sites, runs), runs, env)
    assert not (run_dir / "pretrain" / "checkpoints" / "final.json").exists()
    assert not any((run_dir / "finetune").glob("checkpoints/round-*"))

    subprocess.run(_cmd(tiny_sites, runs, f"resume={run_dir}"), check=True, env=env,
                   timeout=900, stdout=subprocess.DEVNULL)
    for phase, rounds in (("pretrain", 2), ("finetune", 1)):
        final = json.loads((run_dir / phase / "checkpoints" / "final.json").read_text())
        assert final["rounds"] == rounds
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])
    names = sorted(r.info.run_name for r in found)
    assert names == ["smoke", "smoke-pretrain"]             # phase 1 continued, not duplicated
    pretrain = next(r for r in found if r.info.run_name == "smoke-pretrain")
    assert pretrain.data.tags.get("medfed.resumed") == "true"
    finetune = next(r for r in found if r.info.run_name == "smoke")
    assert finetune.data.tags["medfed.parent.version"]      # lineage from phase 1's model
