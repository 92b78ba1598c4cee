"""A site's own cap on the honest contributors its distributed-DP noise share relies on.

The server picks ``privacy.min_contributors`` (m): each site's Skellam share carries 1/m of
the noise the accountant needs, so the sum is as private as the ledger row says only if m
honest sites add theirs. A server that raises m (or colludes with sites that subtract their
own shares) thins every share; a site whose operator relies on at most M honest peers
(node config ``dp-max-assumed-sites``) refuses a round with m > M before training, and books
nothing."""

from __future__ import annotations

import pytest

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
                     server_round=1)


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
