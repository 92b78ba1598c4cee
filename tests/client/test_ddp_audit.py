"""One-run canary audit of distributed site-level DP: below the booked epsilon when every site
adds its share, above it when the noise is skipped."""

from __future__ import annotations

import json

import pytest

from client.privacy.ddp_audit import DistributedAuditConfig, run_distributed_audit
from medfed.cli import main as cli


def test_honest_shares_stay_below_the_epsilon_the_sites_book():
    """The real site CSPRNG, three shares each assuming three contributors, two rounds."""
    result = run_distributed_audit(DistributedAuditConfig(
        noise_multiplier=1.5, contributors=3, rounds=2, num_canaries=1000))
    assert result["epsilon_lb"] <= result["accounted_epsilon"], result
    assert result["epsilon_lb"] > 0.1            # the canaries are seen: the audit has power


@pytest.mark.parametrize("contributors,skip", [(3, 3), (1, 1)])
def test_skipped_noise_is_caught(contributors, skip):
    """Every share skipped, or the one site whose share is the whole noise skips it."""
    result = run_distributed_audit(DistributedAuditConfig(
        noise_multiplier=2.0, contributors=contributors, skip_noise=skip, secure=False))
    assert result["epsilon_lb"] > result["accounted_epsilon"], result


def test_the_audit_cli_runs_the_distributed_path(capsys):
    code = cli(["audit", "--distributed", "--contributors", "3", "--epsilon", "3",
                "--canaries", "300"])
    out = capsys.readouterr().out
    assert code == 0 and "distributed site-level DP" in out and "CONSISTENT" in out
    code = cli(["audit", "--distributed", "--contributors", "2", "--skip-noise", "2",
                "--epsilon", "3", "--canaries", "300", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["epsilon_lb"] > result["accounted_epsilon"]
