"""A distributed-DP ledger row never claims more than the secure aggregation it rode on.

Distributed site-level DP books ``sites>=m``: the sum carries the noise shares of at least
``m`` honest sites and no server is trusted. That holds only under the malicious-secure
SecAgg+, where the sites sign the survivor set. A site that allows the semi-honest protocol
(node config ``secagg-allow-semi-honest``) lets the server alone say which sites survived -
and so which sums are unmasked: a server that calls every other site "dropped" learns this
site's update with 1/m of the noise. The attacker here is that server: it picks the
semi-honest protocol. A site that does not trust the server with its DP (``dp-trust-server``)
refuses; one that does books a row that says whose word it rests on (``,server-counted``), read
from the site's own SecAgg state, not from anything in the message."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Message

from client.mods.secagg import update_protection
from client.privacy.ledger import PrivacyLedger
from client.privacy.policy import admit_round
from protocol import wire
from protocol.job import PrivacySpec
from protocol.secagg_protocol import SecAggError
from tests.strategies.test_secagg_wire import SiteGrid, secure_round, step

pytestmark = pytest.mark.usefixtures("task_identity")

PRIVACY = PrivacySpec(mechanism=wire.DP_SITE, noise_multiplier=2.0, clipping_norm=0.5,
                      noise=wire.DP_NOISE_DISTRIBUTED, min_contributors=3, planned_rounds=2,
                      run_id="run-sh")


class BookingGrid(SiteGrid):
    """The sites' train step admits the round exactly as ``client.app`` does (the flag from
    the site's context, set by its own SecAgg mod) and books it in a per-site ledger."""

    def __init__(self, n: int, tmp_path, trust_server: bool = False, **kwargs):
        super().__init__(n, **kwargs)
        self.tmp_path, self.trust_server = tmp_path, trust_server

    def train(self, node: int, m: Message, context) -> Message:
        job = SimpleNamespace(privacy=PRIVACY, server_round=1,
                              train=SimpleNamespace(local_epochs=1, batch_size=10))
        settings = {wire.NODE_DP_EPSILON: 8.0, wire.NODE_DP_DELTA: 1e-5,
                    wire.NODE_PRIVACY_DIR: str(self.tmp_path / f"site-{node}"),
                    wire.NODE_DP_TRUST_SERVER: self.trust_server}
        masked, signed, _ = update_protection(m, context)     # as client.app does
        admit_round(job, settings, self.tmp_path, n_train=100, count_floor=10,
                    secure_aggregation=masked, survivors_signed=signed)
        return super().train(node, m, context)

    def trust(self) -> list[str]:
        return [e.trust for node in self.nodes
                if (self.tmp_path / f"site-{node}" / "privacy-ledger.sqlite").exists()
                for e in PrivacyLedger(
                    self.tmp_path / f"site-{node}" / "privacy-ledger.sqlite").entries()]


def test_a_server_choosing_semi_honest_secagg_is_refused_by_a_site_that_does_not_trust_it(
        tmp_path):
    grid = BookingGrid(4, tmp_path / "no", node_config={wire.NODE_SECAGG_SEMI_HONEST: True})
    with pytest.raises(SecAggError):
        secure_round(grid, authenticated=False)
    assert grid.errors and all("survivor set is the server's word" in e for e in grid.errors)
    assert grid.trust() == []                   # nothing booked, nothing trained


def test_a_server_choosing_semi_honest_secagg_gets_a_row_that_names_its_word(tmp_path):
    grid = BookingGrid(4, tmp_path / "sh", trust_server=True,
                       node_config={wire.NODE_SECAGG_SEMI_HONEST: True})
    average = secure_round(grid, authenticated=False)
    assert np.abs(average - np.mean([step(i) for i in grid.nodes], axis=0)).max() <= 1e-3
    assert grid.trust() == ["sites>=3,server-counted"] * 4


def test_the_malicious_secure_protocol_books_the_sites_alone(tmp_path):
    grid = BookingGrid(4, tmp_path / "ms")
    secure_round(grid)
    assert grid.trust() == ["sites>=3"] * 4
