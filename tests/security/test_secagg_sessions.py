"""Run sessions of the malicious-secure SecAgg+ (``protocol.secagg_identity.RunSession``): a
site's per-round statements are signed by a run key its identity key endorsed, and a peer
verifies each endorsement once per run. A server that holds no registered key must gain
nothing from that: not by replaying an endorsement from another run, not by swapping a
session key into a later round once the cache holds the real one, not by passing one
site's signature off as another's."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import protocol.secagg_identity as identity_module
from client.privacy.secagg import SecAggRefused
from protocol.secagg_identity import RunSession, simulation_key
from protocol.secagg_protocol import Advert
from tests.strategies.secagg_sites import ENC, RUN, make_sites, run_session, signed_advert
from tests.strategies.secagg_sites import graph as public_graph

IDS = [1, 2, 3, 4, 5]


def test_an_endorsement_from_another_run_is_refused():
    """The server recorded site 2's endorsed session of run 4 (its key, say, leaked after that
    run) and presents it in run 5: the endorsement names run 4, so every peer refuses."""
    sites = make_sites(IDS, 1, ENC)
    adverts = {i: s.advertise() for i, s in sites.items()}
    adverts[2] = signed_advert(2, "site-2", 1, run_session("site-2", run=RUN - 1))
    graph = public_graph(adverts, 1, 4)
    for i in (1, 3, 4, 5):
        with pytest.raises(SecAggRefused, match="^secagg-forged-key: participant 2 presents"):
            sites[i].share_keys(adverts, graph[i], 4, 3)


def test_a_session_key_swapped_in_a_later_round_is_verified_again_and_refused(monkeypatch):
    """Round 1 is honest, so every site caches site 2's verified session key. In round 2 the
    server presents a session key of its own for site 2 with an endorsement by a key of its
    own: the cache holds another key for site 2, so the endorsement is checked, and fails.
    Round 2's honest keys, on the other hand, cost no endorsement check at all."""
    sites = make_sites(IDS, 1, ENC)
    adverts = {i: s.advertise() for i, s in sites.items()}
    graph = public_graph(adverts, 1, 4)
    for i, s in sites.items():
        s.share_keys(adverts, graph[i], 4, 3)
    # round 2: the same identities (same run sessions), new SiteSecAgg objects
    round_1 = {i: s.identity.session.public for i, s in sites.items()}    # bytes, copied
    later = {i: type(s)(i, 2, ENC, RUN, s.identity, s.policy) for i, s in sites.items()}
    checks = []
    real_check = identity_module.Registry.check
    monkeypatch.setattr(identity_module.Registry, "check",
                        lambda self, *a: checks.append(a[0]) or real_check(self, *a))
    honest = {i: s.advertise() for i, s in later.items()}
    graph = public_graph(honest, 2, 4)
    for i, s in later.items():
        s.share_keys(honest, graph[i], 4, 3)
    assert checks == []                 # every endorsement was verified in round 1
    # the sessions carried over (the same key, not a fresh one endorsed again)
    assert {i: a.session for i, a in honest.items()} == round_1
    # round 3: the server's own session key for site 2
    third = {i: type(s)(i, 3, ENC, RUN, s.identity, s.policy) for i, s in sites.items()}
    forged = {i: s.advertise() for i, s in third.items()}
    rogue = ec.generate_private_key(ec.SECP384R1())
    forged[2] = signed_advert(2, "site-2", 3, run_session("site-2", key=rogue))
    graph = public_graph(forged, 3, 4)
    for i in (1, 3, 4, 5):
        with pytest.raises(SecAggRefused, match="^secagg-forged-key: participant 2 presents"):
            third[i].share_keys(forged, graph[i], 4, 3)
    assert checks.count("site-2") == 4  # checked afresh at each peer, and refused


def _masked_round(sites):
    adverts = {i: s.advertise() for i, s in sites.items()}
    graph = public_graph(adverts, 1, 4)
    sent = {i: s.share_keys(adverts, graph[i], 4, 3) for i, s in sites.items()}
    for i, s in sites.items():
        s.masked_input({j: sent[j][i] for j in graph[i]}, np.zeros(10, np.float32), 1)
    return graph


def test_survivor_signatures_count_only_under_each_signers_own_session():
    """The server cannot pass one site's signature off as its neighbours', nor present a
    signature by an identity key where the session key's is due, nor use a session of a
    registered site that was not the participant's."""
    sites = make_sites(IDS, 1, ENC)
    graph = _masked_round(sites)
    signatures = {i: s.sign_survivors(IDS) for i, s in sites.items()}
    target = 1
    one_for_all = {j: signatures[graph[target][0]] for j in IDS}
    with pytest.raises(SecAggRefused, match=r"^secagg-inconsistent-survivors: 1 of this site's "
                                            r"neighbours \(3 needed\)"):
        sites[target].unmask(IDS, one_for_all)
    from protocol.secagg_identity import sign
    from protocol.secagg_protocol import survivors_statement

    by_identity = {j: sign(simulation_key(f"site-{j}"), survivors_statement(RUN, 1, IDS))
                   for j in IDS}
    with pytest.raises(SecAggRefused, match=r"^secagg-inconsistent-survivors: 0 of this site's "):
        sites[target].unmask(IDS, by_identity)
    assert sites[target].unmask(IDS, signatures)["seed"].keys() == set(graph[target])


def test_a_site_state_round_trip_keeps_the_verified_sessions():
    """Deployed, the session and the round move through the node's state between stages:
    what was verified stays verified, and only for the keys that were verified."""
    from client.privacy.secagg import SiteIdentity, SiteSecAgg

    sites = make_sites(IDS, 1, ENC)
    graph = _masked_round(sites)
    signatures = {i: s.sign_survivors(IDS) for i, s in sites.items()}
    me = sites[1]
    restored_session = RunSession.from_state(me.identity.session.to_state())
    identity = SiteIdentity(me.identity.site, me.identity.key, me.identity.registry,
                            restored_session)
    restored = SiteSecAgg.from_state(me.to_state(), identity, me.policy)
    assert restored_session.public == me.identity.session.public
    assert restored.unmask(IDS, signatures)["seed"].keys() == set(graph[1])
    assert restored_session.verified("site-2", b"\x02" + bytes(32)) is None


def test_a_site_refuses_its_own_advert_under_another_name_or_session():
    """A site does not verify its own advert (it knows it), so it compares every field the
    others verify: a server that renames it or swaps its session would split the graph."""
    sites = make_sites(IDS, 1, ENC)
    adverts = {i: s.advertise() for i, s in sites.items()}
    own = adverts[1]
    other = run_session("site-1")
    for changed in (Advert(own.pk_enc, own.pk_mask, "site-2", own.signature, own.session,
                           own.endorsement),
                    Advert(own.pk_enc, own.pk_mask, own.site, own.signature, other.public,
                           other.endorsement)):
        bad = adverts | {1: changed}
        with pytest.raises(SecAggRefused, match="^secagg-own-key-replaced: "):
            sites[1].share_keys(bad, public_graph(bad, 1, 4)[1], 4, 3)


def test_a_genuine_endorsement_with_the_servers_own_session_key_is_refused():
    """The server holds site 2's genuine endorsement of THIS run (peers saw it) and attaches a
    session key of its own, signing site 2's advert with it: the endorsement names the
    session key it endorsed, so every peer refuses."""
    sites = make_sites(IDS, 1, ENC)
    adverts = {i: s.advertise() for i, s in sites.items()}
    genuine = adverts[2].endorsement
    server = run_session("site-2", key=ec.generate_private_key(ec.SECP384R1()))
    forged = signed_advert(2, "site-2", 1, server)
    adverts[2] = Advert(forged.pk_enc, forged.pk_mask, forged.site, forged.signature,
                        forged.session, genuine)
    graph = public_graph(adverts, 1, 4)
    for i in (1, 3, 4, 5):
        with pytest.raises(SecAggRefused, match="^secagg-forged-key: participant 2 presents"):
            sites[i].share_keys(adverts, graph[i], 4, 3)
