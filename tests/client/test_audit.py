"""One-run canary audit through the real DP-SGD path: it must catch training without noise and
stay below the accounted epsilon when the noise is there."""

from __future__ import annotations

import json

import pytest
import torch

from client.data.dataset import StudyDataset
from client.data.site import load_site
from client.privacy.audit import AuditConfig, run_audit
from medfed.cli import main as cli
from models import MODELS, TASKS
from protocol.accounting import calibrate_noise
from tests.conftest import CLASSES


@pytest.fixture(scope="module")
def setup(tiny_sites):
    data = load_site(tiny_sites / "site-0", CLASSES)
    train = StudyDataset(data.split("train", labelled_only=True), image_size=64)
    torch.manual_seed(0)
    model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2})
    return model, TASKS.build("classification", {}), train


def audit(setup, sigma):
    model, task, train = setup
    return run_audit(model, task, train, AuditConfig(noise_multiplier=sigma, steps=20,
                                                     sample_rate=0.25, num_canaries=1000,
                                                     secure_mode=False, seed=1))


def test_training_without_noise_is_caught(setup):
    result = audit(setup, 0.0)
    assert result["epsilon_lb"] >= 2.0, result


def test_dp_training_stays_below_its_accounted_epsilon(setup):
    sigma = calibrate_noise(target_epsilon=4.0, delta=1e-5, sample_rate=0.25, steps=20)
    result = audit(setup, sigma)
    assert abs(result["accounted_epsilon"] - 4.0) < 0.05
    assert result["epsilon_lb"] <= result["accounted_epsilon"], result


def test_broken_noise_scaling_is_caught(setup):
    # a DP path that claims sigma for its accounting but adds 100x less noise
    sigma = calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=0.25, steps=20)
    broken = audit(setup, sigma / 100)
    claimed = audit(setup, sigma)["accounted_epsilon"]
    assert broken["epsilon_lb"] > claimed, (broken, claimed)


def test_audit_cli_reports_both_numbers(tiny_sites, capsys):
    code = cli(["audit", "--site-dir", str(tiny_sites / "site-0"), "--epsilon", "4",
                "--steps", "10", "--canaries", "200"])
    out = capsys.readouterr().out
    assert code == 0 and "accounted epsilon" in out and "CONSISTENT" in out


def test_audit_cli_runs_and_accounts_exactly_the_steps_asked(tiny_sites, capsys):
    # 5 steps at q = 0.25 are not whole Poisson epochs (int(1/q) = 4 steps each); the audit
    # once ran 8 and accounted 8 against a noise calibrated for 5
    code = cli(["audit", "--site-dir", str(tiny_sites / "site-0"), "--epsilon", "4",
                "--sample-rate", "0.25", "--steps", "5", "--canaries", "200", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["steps"] == 5
    assert abs(result["accounted_epsilon"] - 4.0) < 0.05


@pytest.mark.parametrize("canaries, needle", [("8", "at least 10"),
                                              ("100000000", "one coordinate each")])
def test_audit_cli_refuses_a_bad_canary_count_naming_the_flag(tiny_sites, capsys, canaries,
                                                               needle):
    code = cli(["audit", "--site-dir", str(tiny_sites / "site-0"), "--canaries", canaries])
    err = capsys.readouterr().err
    assert code == 2 and "--canaries" in err and needle in err
    assert "num_canaries" not in err and len(err.strip().splitlines()) == 1


def test_audit_cli_refuses_a_bad_step_count_naming_the_flag(tiny_sites, capsys):
    code = cli(["audit", "--site-dir", str(tiny_sites / "site-0"), "--steps", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--steps must be at least 1" in err
