"""Resume with DP-SGD: rounds finished before the crash are never charged twice, the noise
calibrated in round 1 is reused, and each site's cumulative epsilon never resets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from client.privacy.ledger import PrivacyLedger
from tests.conftest import kill_after_checkpoint

pytestmark = pytest.mark.slow

ROUNDS = 4


def _cmd(sites, runs, *extra):
    return [sys.executable, "-m", "medfed.cli", "simulate", "experiment=smoke",
            f"data.root={sites}", f"runs_dir={runs}", f"federation.num_rounds={ROUNDS}",
            "privacy=dpsgd", "privacy.epsilon=8",
            "+federation.site_node_config={dp-epsilon:100.0,dp-delta:1e-5}", *extra]


def test_resume_does_not_double_charge_or_reset_the_ledger(tiny_sites, tmp_path):
    sites = tmp_path / "sites"
    shutil.copytree(tiny_sites, sites)
    runs = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_dir = kill_after_checkpoint(_cmd(sites, runs), runs, 2, env)
    subprocess.run(_cmd(sites, runs, "resume=true"), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)
    run_id = run_dir.name
    for site in ("site-0", "site-1"):
        entries = PrivacyLedger(sites / site / ".medfed" / "privacy-ledger.sqlite").entries()
        assert {e.run_id for e in entries} == {run_id}
        rounds = [e.server_round for e in entries]
        # rounds 1-2 were checkpointed before the kill: charged once; a round that was
        # training when the process died is charged again when it is re-run (it trained twice)
        assert rounds.count(1) == 1 and rounds.count(2) == 1, rounds
        assert set(rounds) == set(range(1, ROUNDS + 1)) and len(rounds) <= ROUNDS + 1
        assert len({e.noise_multiplier for e in entries}) == 1           # calibrated once
        eps = [e.epsilon for e in entries]
        assert eps == sorted(eps) and len(set(eps)) == len(eps)         # grows, never resets
