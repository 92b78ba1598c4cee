"""A scripted malicious server against honest SecAgg+ sites (issue 26, item 1).

Each attack is played to the end: if the sites answered, the server would compute the
target's individual update (the positive controls show the attack code does exactly that
when the protection is absent); the honest sites instead abort with a one-line reason and
the server is left unable to recover the target. The sites are the real ``SiteSecAgg``; the
server is written here, from the protocol's public functions, free to lie.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from client.privacy.secagg import SecAggRefused
from protocol.secagg_crypto import (InvalidShare, agree, decrypt, encrypt, expand_mask,
                                      generate_private_key, load_private, public_bytes,
                                      recover_secret, share_secret)
from protocol.secagg_encoding import decode
from protocol.secagg_identity import Registry, sign, simulation_key
from protocol.secagg_protocol import Advert, graph_seed, pairwise_sign
from tests.strategies.secagg_sites import ENC, RUN, make_sites, run_session, signed_advert
from tests.strategies.secagg_sites import graph as public_graph

ROUND = 3
TARGET = 1
LENGTH = 300


def _delta(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.02, LENGTH).astype(np.float32)


def _unmask(vector: np.ndarray, seed: bytes, pair_masks: list[tuple[bytes, int]]) -> np.ndarray:
    """What the server computes once it holds a site's self-mask seed and pairwise seeds."""
    plain = vector - expand_mask(seed, vector.size)
    for pair_seed, sign_ in pair_masks:
        plain = plain - expand_mask(pair_seed, vector.size) if sign_ > 0 else \
            plain + expand_mask(pair_seed, vector.size)
    return decode(plain, ENC)[0]


def _secret(shares: list[bytes], threshold: int) -> bytes | None:
    """The secret, or None when the server holds too few (or inconsistent) shares."""
    if len(shares) < threshold:
        return None
    try:
        return recover_secret(shares, threshold=threshold)
    except InvalidShare:
        return None


def _recovered(actual: np.ndarray, delta: np.ndarray) -> bool:
    return bool(np.abs(actual - delta).max() <= ENC.resolution)


def _adverts(sites) -> dict[int, Advert]:
    return {i: s.advertise() for i, s in sites.items()}


def _graph(adverts: dict[int, Advert], degree: int) -> dict[int, list[int]]:
    return public_graph(adverts, ROUND, degree)


# ------------------------------------------------------------------ (a) invented neighbours
class Impostor:
    """A participant the server made up: its X25519 keys and an identity key of its own,
    under a registered site's name; it follows the protocol with that key (a run session the
    key endorses, round keys signed by the session)."""

    def __init__(self, node: int, site: str, key: ec.EllipticCurvePrivateKey | None = None):
        self.node, self.enc, self.mask = node, generate_private_key(), generate_private_key()
        self.key = key or ec.generate_private_key(ec.SECP384R1())
        self.advert = signed_advert(node, site, ROUND, run_session(site, key=self.key),
                                    enc=self.enc, mask=self.mask)

    def open(self, ct: bytes, sender: int, sender_pk_enc: bytes) -> tuple[bytes, bytes]:
        key = agree(self.enc, sender_pk_enc, purpose="encryption", round_=ROUND, a=self.node,
                    b=sender)
        payload = decrypt(key, ct, sender=sender, receiver=self.node, round_=ROUND)
        size = int.from_bytes(payload[:4], "little")
        return payload[4:4 + size], payload[4 + size:]

    def share_to(self, receiver: int, receiver_pk_enc: bytes) -> bytes:
        """A ciphertext that decrypts at the target, so that it holds 'enough' shares."""
        shares = share_secret(bytes(32), threshold=1, num=1)
        key = agree(self.enc, receiver_pk_enc, purpose="encryption", round_=ROUND, a=self.node,
                    b=receiver)
        return encrypt(key, len(shares[0]).to_bytes(4, "little") + shares[0] + shares[0],
                       sender=self.node, receiver=receiver, round_=ROUND)


def invented_neighbours_attack(target, impostors: list[Impostor]) -> np.ndarray:
    """The server surrounds the target with two participants whose keys it holds, decrypts
    both of the target's shares, and removes every mask from its input."""
    adverts = {TARGET: target.advertise()} | {m.node: m.advert for m in impostors}
    graph = _graph(adverts, degree=2)
    cts = target.share_keys(adverts, graph[TARGET], 2, 2)
    held = [m.open(cts[m.node], TARGET, adverts[TARGET].pk_enc) for m in impostors]
    seed = recover_secret([h[0] for h in held], threshold=2)
    delta = _delta()
    vector = target.masked_input({m.node: m.share_to(TARGET, adverts[TARGET].pk_enc)
                                     for m in impostors}, delta, 1)
    pair = [(agree(m.mask, adverts[TARGET].pk_mask, purpose="mask", round_=ROUND, a=m.node,
                   b=TARGET), pairwise_sign(TARGET, m.node)) for m in impostors]
    return _unmask(vector, seed, pair), delta


def test_invented_neighbours_fail_verification_and_the_update_stays_masked():
    target = make_sites([1, 2, 3, 4, 5], ROUND, ENC)[TARGET]
    # the server claims two registered names, signing with keys it made
    impostors = [Impostor(91, "site-2"), Impostor(92, "site-3")]
    with pytest.raises(SecAggRefused, match=r"^secagg-forged-key: participant 9[12] "):
        invented_neighbours_attack(target, impostors)
    assert target.threshold == 0        # it shared nothing


def test_unregistered_names_and_one_site_twice_are_refused():
    target = make_sites([1, 2, 3, 4, 5], ROUND, ENC)[TARGET]
    with pytest.raises(SecAggRefused, match="secagg-forged-key"):
        invented_neighbours_attack(target, [Impostor(91, "site-77"), Impostor(92, "site-78")])
    # a real site's registered key, presented twice under two node ids
    twice = [Impostor(91, "site-2", simulation_key("site-2")),
             Impostor(92, "site-2", simulation_key("site-2"))]
    with pytest.raises(SecAggRefused, match="one registered site appears as several"):
        invented_neighbours_attack(target, twice)


def test_control_registered_accomplices_do_recover_the_update():
    """Positive control for the attack code, and the limit of the threat model: if two
    registered sites collude with the server (they hold their registered keys), the same
    attack succeeds. The protection is against the server alone."""
    accomplices = [Impostor(91, "site-2", simulation_key("site-2")),
                   Impostor(92, "site-3", simulation_key("site-3"))]
    target = make_sites([1, 2, 3], ROUND, ENC)[TARGET]
    target.identity.registry.keys.update({"site-2": simulation_key("site-2").public_key(),
                                          "site-3": simulation_key("site-3").public_key()})
    recovered, delta = invented_neighbours_attack(target, accomplices)
    assert _recovered(recovered, delta)


def test_a_forged_neighbour_key_is_rejected():
    """The server swaps one honest site's round key for its own but keeps that site's
    signature, session key and endorsement: every peer rejects it."""
    sites = make_sites([1, 2, 3, 4, 5], ROUND, ENC)
    adverts = _adverts(sites)
    swapped = dict(adverts)
    swapped[2] = dataclasses.replace(adverts[2], pk_enc=public_bytes(generate_private_key()))
    graph = _graph(swapped, degree=4)
    for i in (1, 3, 4, 5):
        with pytest.raises(SecAggRefused, match="secagg-forged-key: participant 2 presents"):
            sites[i].share_keys(swapped, graph[i], 4, 3)


def test_the_server_cannot_choose_neighbours_or_weak_parameters():
    sites = make_sites(list(range(1, 9)), ROUND, ENC)
    adverts = _adverts(sites)
    graph = _graph(adverts, degree=4)
    chosen = [j for j in adverts if j != TARGET and j not in graph[TARGET]][:4]
    with pytest.raises(SecAggRefused, match="^secagg-neighbours: "):
        sites[TARGET].share_keys(adverts, chosen, 4, 3)
    with pytest.raises(SecAggRefused, match="^secagg-parameters: threshold 2 is not a strict "
                                            "majority of 4"):
        sites[TARGET].share_keys(adverts, graph[TARGET], 4, 2)
    few = {j: adverts[j] for j in (1, 2)}
    with pytest.raises(SecAggRefused, match="^secagg-parameters: 2 participants"):
        sites[TARGET].share_keys(few, [2], 1, 1)


# ---------------------------------------------------------- (b) forwarding no/few shares
def _honest_shares(sites, degree=4, threshold=3):
    adverts = _adverts(sites)
    graph = _graph(adverts, degree)
    sent = {i: s.share_keys(adverts, graph[i], degree, threshold) for i, s in sites.items()}
    held = {i: {j: sent[j][i] for j in graph[i]} for i in sites}
    return adverts, graph, held


def withheld_shares_attack(sites, forward: int) -> tuple[np.ndarray, np.ndarray]:
    """The server forwards only ``forward`` of the target's incoming ciphertexts: the
    target's input carries its self mask and few pairwise masks. The server then reports the
    honest survivor set; the neighbours, following the protocol, reveal the target's self-mask
    shares, and the server removes the pairwise masks of the partners it declares dropped."""
    adverts, graph, held = _honest_shares(sites)
    partners = sorted(held[TARGET])[:forward]
    delta = _delta(1)
    vector = sites[TARGET].masked_input({j: held[TARGET][j] for j in partners}, delta, 1)
    for i in sites:
        if i != TARGET:
            sites[i].masked_input(held[i], _delta(i), 1)
    survivors = [i for i in sites if i not in partners]       # partners "dropped"
    signatures = {i: sites[i].sign_survivors(survivors) for i in survivors}
    replies = {i: sites[i].unmask(survivors, signatures) for i in survivors if i != TARGET}
    seed = _secret([r["seed"][TARGET] for r in replies.values() if TARGET in r["seed"]], 3)
    pair = []
    for p in partners:
        key = load_private(_secret([r["key"][p] for r in replies.values() if p in r["key"]], 3))
        pair.append((agree(key, adverts[TARGET].pk_mask, purpose="mask", round_=ROUND,
                           a=p, b=TARGET), pairwise_sign(TARGET, p)))
    return _unmask(vector, seed, pair), delta


@pytest.mark.parametrize("forward", [0, 2])
def test_forwarding_fewer_than_t_shares_makes_the_target_abort(forward):
    sites = make_sites([1, 2, 3, 4, 5, 6, 7], ROUND, ENC)
    with pytest.raises(SecAggRefused, match=rf"^secagg-too-few-shares: shares from {forward} "
                                            "neighbours, at least 3 needed"):
        withheld_shares_attack(sites, forward)


# ------------------------------------------------------- (c) survivor-set equivocation
def _ring(adverts: dict[int, Advert]) -> list[int]:
    """The ring order the public seed gives (what ``neighbours`` sorts by), target first."""
    seed = graph_seed(RUN, ROUND, {i: a.site for i, a in adverts.items()})
    order = sorted(adverts, key=lambda i: hashlib.sha256(seed + str(i).encode()).digest())
    k = order.index(TARGET)
    return order[k:] + order[:k]


def equivocation_attack(sites, threshold: int):
    """Eight sites, degree 4. The server shows half the ring (the target's side) a survivor
    set with the target and the other half one without it, so that the first half reveals the
    target's self-mask shares and the second its masking-key shares. Returns the target's
    recovered update, or raises where the sites refuse or the shares fall short."""
    adverts = _adverts(sites)
    graph = _graph(adverts, 4)
    sent = {i: s.share_keys(adverts, graph[i], 4, threshold) for i, s in sites.items()}
    delta = _delta(2)
    masked = {i: sites[i].masked_input({j: sent[j][i] for j in graph[i]},
                                       delta if i == TARGET else _delta(i), 1)
              for i in sites}
    ring = _ring(adverts)
    first = ring[:4]                    # the target's half of the ring; the rest: ring[4:]
    with_target = sorted(sites)
    without = [i for i in sites if i != TARGET]
    shown = {i: with_target if i in first else without for i in sites}
    signatures = {i: sites[i].sign_survivors(shown[i]) for i in sites if i in shown[i]}
    seed_shares, key_shares, refusals = [], [], []
    for i in sites:
        if i not in shown[i]:
            continue
        on_same = {j: s for j, s in signatures.items() if shown[j] == shown[i]}
        try:
            reply = sites[i].unmask(shown[i], on_same)
        except SecAggRefused as err:
            refusals.append(err)
            continue
        seed_shares += [reply["seed"][TARGET]] if TARGET in reply["seed"] else []
        key_shares += [reply["key"][TARGET]] if TARGET in reply["key"] else []
    seed, key = _secret(seed_shares, threshold), _secret(key_shares, threshold)
    if seed is None or key is None:
        return None, delta, refusals
    pair = [(agree(load_private(key), adverts[j].pk_mask, purpose="mask", round_=ROUND,
                   a=TARGET, b=j), pairwise_sign(TARGET, j)) for j in graph[TARGET]]
    return _unmask(masked[TARGET], seed, pair), delta, refusals


def test_equivocation_with_todays_k4_t2_is_refused_before_any_share_leaves():
    """Today's parameters with >= 5 sites (k = 4, t = 2) let the server collect both kinds of
    share of one site; the sites now refuse a threshold that is not a strict majority."""
    sites = make_sites(list(range(1, 9)), ROUND, ENC)
    with pytest.raises(SecAggRefused, match="^secagg-parameters: threshold 2 is not a strict "
                                            "majority of 4 neighbours"):
        equivocation_attack(sites, threshold=2)


def test_equivocation_is_caught_by_the_consistency_round():
    """With a strict-majority threshold, the same equivocation: the sites on the border of
    the two halves hold fewer than t of their neighbours' signatures on the set they were
    shown and refuse; neither of the target's secrets can be recovered."""
    sites = make_sites(list(range(1, 9)), ROUND, ENC)
    recovered, _, refusals = equivocation_attack(sites, threshold=3)
    assert recovered is None
    assert refusals and all(str(r).startswith("secagg-inconsistent-survivors: ") and
                            "\n" not in str(r) for r in refusals)


def test_control_without_the_majority_rule_equivocation_recovers_the_update(monkeypatch):
    """Positive control for the attack code: a site that accepted t = 2 of k = 4 (today's
    rule) gives the server the target's update even with signed survivor sets."""
    import client.privacy.secagg as site_module

    monkeypatch.setattr(site_module, "majority", lambda degree: 2)
    sites = make_sites(list(range(1, 9)), ROUND, ENC)
    recovered, delta, refusals = equivocation_attack(sites, threshold=2)
    assert recovered is not None and _recovered(recovered, delta) and not refusals


def test_a_site_never_unmasks_by_a_set_other_than_the_one_it_signed():
    sites = make_sites([1, 2, 3, 4, 5], ROUND, ENC)
    _, graph, held = _honest_shares(sites)
    for i in sites:
        sites[i].masked_input(held[i], _delta(i), 1)
    everyone, without_5 = [1, 2, 3, 4, 5], [1, 2, 3, 4]
    signatures = {i: sites[i].sign_survivors(everyone) for i in sites}
    with pytest.raises(SecAggRefused, match="^secagg-inconsistent-survivors: the survivor set "
                                            "differs from the one this site signed"):
        sites[1].unmask(without_5, signatures)
    with pytest.raises(SecAggRefused, match="^secagg-inconsistent-survivors: this site already "
                                            "signed"):
        sites[2].sign_survivors(without_5)
    forged = {j: sign(ec.generate_private_key(ec.SECP384R1()), b"x") for j in sites}
    with pytest.raises(SecAggRefused, match=r"^secagg-inconsistent-survivors: 0 of this site's "
                                            r"neighbours \(3 needed\) and 0 participants"):
        sites[3].unmask(everyone, forged)
    assert sites[4].unmask(everyone, signatures)["seed"].keys() == set(graph[4])


def test_a_survivor_set_padded_with_sites_that_never_attested_is_refused():
    """The server cannot inflate the survivor set past a site's contributor floor with node ids
    that were not participants, or with participants that never signed (that never sent a
    masked input): the site wants that many signatures on the set, not just names."""
    from client.privacy.secagg import SecAggPolicy

    ids = list(range(1, 8))
    sites = make_sites(ids, ROUND, ENC, policy=SecAggPolicy(min_contributors=7))
    _, graph, held = _honest_shares(sites, degree=4, threshold=3)
    for i in sites:
        sites[i].masked_input(held[i], _delta(i), 1)
    with pytest.raises(SecAggRefused, match="names sites that were not participants"):
        sites[TARGET].sign_survivors(ids + [99])
    signatures = {i: sites[i].sign_survivors(ids) for i in ids}
    close = {j: signatures[j] for j in graph[TARGET] + [TARGET]}
    with pytest.raises(SecAggRefused, match=r"and 5 participants \(7 needed\) signed"):
        sites[TARGET].unmask(ids, close)
    assert sites[TARGET].unmask(ids, signatures)["seed"].keys() == set(graph[TARGET])


def test_registration_list_parsing_refuses_duplicates_and_foreign_lines():
    from cryptography.hazmat.primitives import serialization

    def line(site: str, key=None) -> str:
        key = key or simulation_key(site)
        return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode() + \
            f" medfed-site:{site}"

    registry = Registry.parse("\n".join(["# the consortium's list", line("a"), "", line("b")]))
    assert set(registry.keys) == {"a", "b"}
    from protocol.secagg_identity import IdentityError

    with pytest.raises(IdentityError, match="listed twice"):
        Registry.parse("\n".join([line("a"), line("c", simulation_key("a"))]))
    with pytest.raises(IdentityError, match="auth.pub line"):
        Registry.parse(line("a").rsplit(" ", 1)[0])


def test_a_key_that_comes_without_its_signature_is_reported_missing_not_forged():
    """A relay that drops what vouches for a key (or a peer answering the semi-honest
    protocol) is refused just the same, with a reason that says what is missing."""
    sites = make_sites([1, 2, 3, 4, 5], ROUND, ENC)
    adverts = _adverts(sites)
    for stripped, named in ((dict(signature=b""), "signature"),
                            (dict(session=b"", endorsement=b""), "session key, endorsement")):
        bad = adverts | {2: dataclasses.replace(adverts[2], **stripped)}
        with pytest.raises(SecAggRefused, match=rf"^secagg-missing-field: participant 2's "
                                                rf"round keys came without its {named};"):
            sites[1].share_keys(bad, _graph(bad, 4)[1], 4, 3)
    assert sites[1].threshold == 0                                    # nothing was shared
