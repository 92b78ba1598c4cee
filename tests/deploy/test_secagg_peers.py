"""A deployed site's SecAgg+ identity: its own auth.key signs, the federation's registration
list (the sites' auth.pub lines, received out of band) verifies - checked at start-up and
loaded by the ClientApp from the operator's node config."""

from __future__ import annotations

import pytest

from client.mods.secagg import site_identity
from client.privacy.secagg import SecAggRefused, SiteSecAgg
from medfed.certs import site_keygen
from medfed.deploy.preflight import DeployError
from medfed.deploy.site import SiteSettings, check_secagg_peers, node_config
from protocol import wire
from protocol.secagg_encoding import Encoding
from protocol.secagg_identity import RunSession, verify
from protocol.secagg_protocol import advert_statement


@pytest.fixture
def federation(tmp_path):
    keys = {s: site_keygen(tmp_path / s, site=s) for s in ("north", "south", "east")}
    peers = tmp_path / "secagg-peers.pub"
    peers.write_text("".join(k.public.read_text() for k in keys.values()))
    return keys, peers


def test_a_registered_site_signs_and_its_peers_verify(federation, tmp_path):
    keys, peers = federation
    settings = SiteSettings(site_id="north", data_dir=tmp_path, superlink="x:1",
                            root_cert=tmp_path, auth_key=keys["north"].private,
                            state_dir=tmp_path, secagg_peers=peers, secagg_min_contributors=4)
    check_secagg_peers("north", keys["north"].private, peers)
    config = node_config(settings)
    assert config[wire.NODE_SECAGG_IDENTITY] == str(keys["north"].private.resolve())
    assert config[wire.NODE_SECAGG_MIN_CONTRIBUTORS] == 4
    identity = site_identity(config)
    site = SiteSecAgg(11, 2, Encoding(), 9, identity)
    advert = site.advertise()
    south = site_identity(config | {wire.NODE_SITE_ID: "south",
                                    wire.NODE_SECAGG_IDENTITY: str(keys["south"].private)})
    # south verifies north's run-session endorsement against the list, then the round keys
    south.session.start(run=9, site="south", identity_key=south.key)
    key = south.session.peer(south.registry, "north", advert.session, advert.endorsement)
    assert key is not None and verify(key, advert.signature, advert_statement(9, 2, 11, advert))
    assert not verify(key, advert.signature, advert_statement(9, 3, 11, advert))
    other_run = RunSession()                # the endorsement is for run 9 only
    other_run.start(run=10, site="south", identity_key=south.key)
    assert other_run.peer(south.registry, "north", advert.session, advert.endorsement) is None


def test_a_key_not_on_the_list_fails_at_start_up_and_at_the_first_round(federation, tmp_path):
    keys, peers = federation
    rogue = site_keygen(tmp_path / "rogue", site="north")
    with pytest.raises(DeployError, match="does not list site 'north' with the public half"):
        check_secagg_peers("north", rogue.private, peers)
    with pytest.raises(SecAggRefused, match="^secagg-no-identity: site 'north' with this "):
        site_identity({wire.NODE_SITE_ID: "north", wire.NODE_SECAGG_IDENTITY: str(rogue.private),
                       wire.NODE_SECAGG_PEERS: str(peers)})
    with pytest.raises(SecAggRefused, match="^secagg-no-identity: set both"):
        site_identity({wire.NODE_SITE_ID: "north", wire.NODE_SECAGG_PEERS: str(peers)})
