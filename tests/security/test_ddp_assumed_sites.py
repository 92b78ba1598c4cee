"""A site's own cap on the honest contributors its distributed-DP noise share relies on.

The server picks ``privacy.min_contributors`` (m): each site's Skellam share carries 1/m of
the noise the accountant needs, so the sum is as private as the ledger row says only if m
honest sites add theirs. A server that raises m (or colludes with sites that subtract their
own shares) thins every share; a site whose operator relies on at most M honest peers
(node config ``dp-max-assumed-sites``) refuses a round with m > M before training, and books
nothing."""

from __future__ import annotations

import pytest
from flwr.app import MessageType

from client.privacy.ledger import PrivacyLedger
from client.privacy.policy import PrivacyRefused, authorize, site_budget
from protocol import wire
from protocol.job import PrivacySpec


def _round(m: int) -> PrivacySpec:
    return PrivacySpec(mechanism=wire.DP_SITE, noise_multiplier=2.0, clipping_norm=0.5,
                       noise=wire.DP_NOISE_DISTRIBUTED, min_contributors=m, planned_rounds=2,
                       run_id="run-m")


def _authorize(request, budget):
    return authorize(request, budget, n_train=100, local_epochs=1, batch_size=10,
                     server_round=1, survivors_signed=True)


def test_a_server_raising_m_past_the_sites_cap_is_refused_and_nothing_is_booked(tmp_path):
    settings = {wire.NODE_DP_EPSILON: 8.0, wire.NODE_DP_DELTA: 1e-5,
                wire.NODE_PRIVACY_DIR: str(tmp_path), wire.NODE_DP_MAX_ASSUMED_SITES: 5}
    budget = site_budget(settings, tmp_path)
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.sqlite")
    with pytest.raises(PrivacyRefused, match=r"would assume 20 honest contributors .* at most "
                                             r"5 \(node config dp-max-assumed-sites\)"):
        _authorize(_round(20), budget)
    assert ledger.entries() == []
    _authorize(_round(5), budget)                       # within the operator's trust
    assert [e.trust for e in ledger.entries()] == ["sites>=5"]


def test_without_a_cap_the_servers_m_is_booked_as_the_rows_trust(tmp_path):
    budget = site_budget({wire.NODE_DP_EPSILON: 8.0, wire.NODE_DP_DELTA: 1e-5,
                          wire.NODE_PRIVACY_DIR: str(tmp_path)}, tmp_path)
    _authorize(_round(20), budget)
    assert [e.trust for e in PrivacyLedger(tmp_path / "privacy-ledger.sqlite").entries()] == [
        "sites>=20"]


@pytest.mark.parametrize("value", [0, -3, "many"])
def test_a_malformed_cap_is_an_error_not_a_silent_no_cap(tmp_path, value):
    with pytest.raises(PrivacyRefused, match="dp-max-assumed-sites"):
        site_budget({wire.NODE_DP_EPSILON: 8.0, wire.NODE_DP_DELTA: 1e-5,
                     wire.NODE_DP_MAX_ASSUMED_SITES: value}, tmp_path)


# ------------------------------------------------ the cap as a site flag, declared, preflighted
def test_the_cap_is_a_site_flag_in_node_config_and_the_declared_policy(tmp_path):
    from flwr.common.config import parse_config_args

    from client.privacy.declared import declared_policy
    from medfed.cli import build_parser
    from medfed.deploy.preflight import DeployError
    from medfed.deploy.site import SiteSettings, node_config, node_config_arg
    from protocol.policy import SitePolicy

    argv = ["site", "--site-id", "a", "--data-dir", str(tmp_path), "--superlink", "x:1",
            "--root-cert", "ca", "--auth-key", "k", "--dp-epsilon", "8", "--dp-delta", "1e-5"]
    parser = build_parser()
    assert parser.parse_args(argv).dp_max_assumed_sites is None          # default: no cap
    args = parser.parse_args(argv + ["--dp-max-assumed-sites", "4"])
    common = dict(site_id="a", data_dir=tmp_path, superlink="x:1", root_cert=tmp_path,
                  auth_key=tmp_path, state_dir=tmp_path, dp_epsilon=8.0, dp_delta=1e-5)
    config = node_config(SiteSettings(**common, dp_max_assumed_sites=args.dp_max_assumed_sites))
    assert config[wire.NODE_DP_MAX_ASSUMED_SITES] == 4
    assert parse_config_args([node_config_arg(config)]) == config     # what the SuperNode reads
    assert wire.NODE_DP_MAX_ASSUMED_SITES not in node_config(SiteSettings(**common))
    with pytest.raises(DeployError, match="--dp-max-assumed-sites must be >= 1"):
        node_config(SiteSettings(**common, dp_max_assumed_sites=0))
    # what the site answers the preflight's policy query with, through the codec
    policy = declared_policy(config | {wire.NODE_PRIVACY_DIR: str(tmp_path)}, tmp_path,
                             site_id="a", role=wire.ROLE_TRAIN)
    assert SitePolicy.from_record(policy.to_record()).max_assumed_sites == 4
    uncapped = declared_policy(node_config(SiteSettings(**common)), tmp_path, site_id="a",
                               role=wire.ROLE_TRAIN)
    assert SitePolicy.from_record(uncapped.to_record()).max_assumed_sites is None


@pytest.mark.parametrize("value", [0, True, 2.5])
def test_a_declared_cap_that_is_not_a_count_is_a_decode_error(value):
    from protocol.policy import PolicyDecodeError, SitePolicy

    record = SitePolicy("a").to_record()
    record[wire.NODE_DP_MAX_ASSUMED_SITES] = value
    with pytest.raises(PolicyDecodeError, match="dp-max-assumed-sites"):
        SitePolicy.from_record(record)


@pytest.mark.usefixtures("task_identity")
def test_the_preflight_flags_a_job_whose_m_exceeds_a_sites_cap_before_the_run(tmp_path):
    """The real ClientApp answers the policy query from its node config; the coordinator's
    preflight names the site, its cap and the fix, and no round starts."""
    from server.preflight import PreflightError, run_preflight
    from tests.server.test_preflight import SiteGrid, _cfg

    budget = {wire.NODE_DP_EPSILON: 8.0, wire.NODE_DP_DELTA: 1e-5}
    grid = SiteGrid(tmp_path, {"site-a": budget | {wire.NODE_DP_MAX_ASSUMED_SITES: 2},
                               "site-b": budget, "site-c": budget | {
                                   wire.NODE_DP_MAX_ASSUMED_SITES: 3}})
    ddp = ("federation=sim3", "privacy=ddp", "secagg.enabled=true",
           "privacy.noise_multiplier=3", "strategy.min_train_sites=3")
    with pytest.raises(PreflightError) as refused:
        run_preflight(grid, _cfg(tmp_path, *ddp, "privacy.min_contributors=3"))
    assert refused.value.problems == [
        "site-a: privacy.min_contributors=3: each noise share would assume 3 honest "
        "contributors and it relies on at most 2 (dp-max-assumed-sites): run with "
        "privacy.min_contributors<=2 (more noise per site) or ask its operator"]
    assert set(grid.sent) == {MessageType.QUERY}                        # nothing trained
    run_preflight(grid, _cfg(tmp_path, *ddp, "privacy.min_contributors=2"))   # within caps
