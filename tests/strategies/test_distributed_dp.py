"""Distributed site-level DP at the server: it adds nothing, and is configured to be checkable."""

from __future__ import annotations

import numpy as np
import pytest

from protocol import accounting, wire
from server.config import ConfigError, load_experiment
from server.federation import build_strategy
from strategies.secagg import SecAggPlus, SumNoise
from strategies.sitedp import DistributedNoise

DDP = ["privacy=ddp", "strategy.min_train_sites=3", "secagg.enabled=true"]


def test_the_server_adds_nothing_and_reports_what_the_sites_booked():
    noise = DistributedNoise(noise_multiplier=2.0, clipping_norm=1.0, num_sites=5,
                             min_contributors=4, delta=1e-5)
    average = np.linspace(-1, 1, 1000).astype(np.float32)
    out = noise.add_noise(average.copy(), contributors=5)
    assert np.array_equal(out, average)                     # not a single bit of server noise
    booked = accounting.epsilon([(2.0, 1.0, 1)], 1e-5)      # each site's own ledger row
    assert noise.epsilon == pytest.approx(booked, rel=0.05)
    with pytest.raises(ValueError, match="fewer than min_contributors=4"):
        noise.add_noise(average, contributors=3)


def test_the_ddp_experiment_builds_secagg_with_the_sites_noise_and_headroom():
    cfg = load_experiment(["experiment=sitedp"])
    assert (cfg.privacy.noise, cfg.secagg.enabled) == (wire.DP_NOISE_DISTRIBUTED, True)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, SecAggPlus) and isinstance(strategy.site_dp, DistributedNoise)
    enc = strategy.config.encoding
    assert enc.max_weight == 1 and enc.max_sites > cfg.federation.num_sites   # noise headroom
    assert cfg.job_spec("r").privacy.min_contributors == cfg.federation.num_sites


def test_server_noise_is_an_explicit_option():
    cfg = load_experiment(["privacy=sitedp", "strategy.min_train_sites=3",
                           "secagg.enabled=true", "secagg.clip_range=1.0"])
    assert cfg.privacy.noise == wire.DP_NOISE_SERVER
    assert isinstance(build_strategy(cfg).site_dp, SumNoise)


def test_the_ddp_group_composes_with_the_default_secagg_settings():
    cfg = load_experiment(DDP)
    assert (cfg.privacy.mechanism, cfg.privacy.noise) == (wire.DP_SITE, wire.DP_NOISE_DISTRIBUTED)
    assert cfg.privacy.clipping_norm <= cfg.secagg.clip_range


@pytest.mark.parametrize("overrides,message", [
    (["privacy=ddp", "strategy.min_train_sites=3"], r"secagg\.enabled=true"),
    ([*DDP, "privacy.noise=central"], r"privacy\.noise='central'"),
    ([*DDP, "privacy.min_contributors=4"], r"min_contributors=4 > num_sites=3"),
    (["privacy=ddp", "secagg.enabled=true", "federation.num_sites=10",
      "strategy.min_train_sites=10", "strategy.min_available_sites=10"],
     r"can vouch for at most 9 contributors"),
])
def test_distributed_dp_settings_that_could_not_hold_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(overrides)
