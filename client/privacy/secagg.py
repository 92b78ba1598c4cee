"""SecAgg+ at a site: keys, shares, the masked update and the site's own checks at every stage.

One ``SiteSecAgg`` per round (its secrets never outlive the round). The site trusts nothing the
server decides; in the malicious-secure mode (Bell et al. CCS 2020, Bonawitz et al. CCS 2017
active variant) it

* signs its round keys with its run's session key, which its identity key endorsed for this
  run (``protocol.secagg_identity.RunSession``), and accepts a participant only when the
  federation's registration list vouches for that chain (``secagg-forged-key``; a key that
  comes without its signature, session key or endorsement: ``secagg-missing-field``);
* computes the neighbour graph itself from the public seed and refuses a list that differs
  (``secagg-neighbours``);
* enforces its own floor on the neighbours and contributors and a threshold that is a strict
  majority of the neighbours (``secagg-parameters``), and aborts when it holds fewer than
  ``t`` neighbours' shares (``secagg-too-few-shares``);
* signs one survivor set, and reveals shares only for a set that at least ``t`` of its
  neighbours signed too (``secagg-inconsistent-survivors``); what it reveals it derives from
  that set, so never both kinds of share for one site, and answers one unmask request.

Every refusal is a ``SecAggRefused`` whose message starts with its code. The semi-honest mode
(the site's operator must allow it) skips the signatures and the consistency stage.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.secagg_crypto import (InvalidShare, agree, decrypt, encrypt,
                                      generate_private_key, load_private, private_bytes,
                                      public_bytes, share_secret)
from protocol.secagg_encoding import Encoding, encode
from protocol.secagg_identity import Registry, RunSession, verify
from protocol.secagg_protocol import (Advert, advert_statement, graph_seed, majority,
                                        neighbours, pairwise_sign, survivors_statement)

log = logging.getLogger(__name__)


class SecAggRefused(ValueError):
    """The site will not answer this request: it would break the protocol's guarantee."""

    def __init__(self, code: str, reason: str):
        self.code = code
        super().__init__(f"{code}: {reason}")


@dataclass(frozen=True)
class SecAggPolicy:
    """The site's own SecAgg+ settings (operator node config; the server cannot change them)."""
    min_neighbours: int = 2           # refuse a graph that gives this site fewer neighbours
    min_contributors: int = 3         # refuse rounds (and survivor sets) with fewer sites
    allow_semi_honest: bool = False   # answer the unauthenticated protocol (trusts the server)

    def __post_init__(self):
        if self.min_neighbours < 2 or self.min_contributors < 3:
            raise ValueError("secagg-min-neighbours >= 2 and secagg-min-contributors >= 3")


@dataclass(frozen=True)
class SiteIdentity:
    """Who this site is to its peers: its registered id, its identity key, the registry, and
    its run session (its signing key for the run and the peers' keys it verified; mutable,
    kept in the node's state between rounds)."""
    site: str
    key: ec.EllipticCurvePrivateKey
    registry: Registry
    session: RunSession = field(default_factory=RunSession)


@dataclass
class SiteSecAgg:
    me: int                           # this site's node id in the run
    round_: int
    encoding: Encoding
    run: int = 0
    identity: SiteIdentity | None = None      # None: the semi-honest protocol
    policy: SecAggPolicy = field(default_factory=SecAggPolicy)

    def __post_init__(self):
        self._enc_key = generate_private_key()
        self._mask_key = generate_private_key()
        self._seed = os.urandom(32)
        self._neighbour_keys: dict[int, tuple[bytes, bytes]] = {}
        self._share_keys: dict[int, bytes] = {}               # neighbour -> AES-GCM share key
        self._participants: dict[int, str] = {}               # node -> registered site id
        self._held: dict[int, tuple[bytes, bytes]] = {}        # neighbour -> (seed, key) shares
        self._threshold = 0
        self._masked = False
        self._signed: list[int] | None = None
        self._answered = False
        self._sessions: dict[int, bytes] = {}                  # node -> its verified session key
        if self.identity is not None:
            self.identity.session.start(run=self.run, site=self.identity.site,
                                        identity_key=self.identity.key)

    @property
    def threshold(self) -> int:
        """Shares needed (0 before the keys were shared)."""
        return self._threshold

    # ---- state between stages (the identity is reloaded from the node config each time)
    def to_state(self) -> dict:
        """Plain values (bytes, str, int lists) for the node's state between stages."""
        nodes = sorted(self._neighbour_keys)
        held = sorted(self._held)
        return {"me": str(self.me), "round": self.round_, "run": str(self.run),
                "encoding": [self.encoding.clip_range, float(self.encoding.max_sites),
                             float(self.encoding.max_weight)],
                "enc-key": private_bytes(self._enc_key), "mask-key": private_bytes(self._mask_key),
                "seed": self._seed, "threshold": self._threshold, "answered": self._answered,
                "masked": self._masked, "signed": [str(j) for j in self._signed or []],
                "has-signed": self._signed is not None,
                "nodes": [str(j) for j in nodes],
                "pk-enc": [self._neighbour_keys[j][0] for j in nodes],
                "pk-mask": [self._neighbour_keys[j][1] for j in nodes],
                "share-key": [self._share_keys[j] for j in nodes],
                "participants": [str(j) for j in self._participants],
                "participant-sites": list(self._participants.values()),
                "participant-sessions": [self._sessions.get(j, b"") for j in self._participants],
                "held": [str(j) for j in held], "held-seed": [self._held[j][0] for j in held],
                "held-key": [self._held[j][1] for j in held]}

    @classmethod
    def from_state(cls, state: dict, identity: SiteIdentity | None,
                   policy: SecAggPolicy) -> "SiteSecAgg":
        clip, sites, weight = state["encoding"]
        site = cls(int(state["me"]), int(state["round"]),
                   Encoding(clip_range=clip, max_sites=int(sites), max_weight=int(weight)),
                   int(state["run"]), identity, policy)
        site._enc_key, site._mask_key = load_private(state["enc-key"]), \
            load_private(state["mask-key"])
        site._seed, site._threshold = state["seed"], int(state["threshold"])
        site._answered, site._masked = bool(state["answered"]), bool(state["masked"])
        site._signed = [int(j) for j in state["signed"]] if state["has-signed"] else None
        site._neighbour_keys = {int(j): (e, m) for j, e, m in
                                zip(state["nodes"], state["pk-enc"], state["pk-mask"])}
        site._share_keys = {int(j): bytes(k) for j, k in zip(state["nodes"],
                                                             state["share-key"])}
        site._participants = {int(j): str(s) for j, s in zip(state["participants"],
                                                              state["participant-sites"])}
        site._sessions = {int(j): bytes(k) for j, k in zip(state["participants"],
                                                           state["participant-sessions"]) if k}
        site._held = {int(j): (s, k) for j, s, k in
                      zip(state["held"], state["held-seed"], state["held-key"])}
        return site

    # ---- stage 0
    def advertise(self) -> Advert:
        advert = Advert(public_bytes(self._enc_key), public_bytes(self._mask_key),
                        self.identity.site if self.identity else "")
        if self.identity is None:
            return advert
        session = self.identity.session
        signature = session.sign(advert_statement(self.run, self.round_, self.me, advert))
        return Advert(advert.pk_enc, advert.pk_mask, advert.site, signature, session.public,
                      session.endorsement)

    # ---- stage 1
    def share_keys(self, participants: dict[int, Advert], claimed: list[int], degree: int,
                   threshold: int) -> dict[int, bytes]:
        """Check the participants and the graph, then share both secrets with the neighbours
        (once: shares of one secret under two polynomials would add up to more than ``t``)."""
        if self._threshold:
            raise SecAggRefused("secagg-stage", "this round's keys were already shared")
        participants = {int(j): a for j, a in participants.items()}
        self._check_participants(participants)
        self._check_parameters(len(participants), degree, threshold)
        seed = graph_seed(self.run, self.round_, {j: a.site for j, a in participants.items()})
        mine = neighbours(sorted(participants), degree, seed)[self.me]
        if sorted(int(j) for j in claimed) != mine:
            raise SecAggRefused("secagg-neighbours", "the neighbour list the server sent is "
                                "not the one the public seed gives; the server may not choose "
                                "neighbours")
        self._neighbour_keys = {j: (participants[j].pk_enc, participants[j].pk_mask)
                                for j in mine}
        # one key agreement per neighbour serves both directions of the share exchange
        self._share_keys = {j: agree(self._enc_key, self._neighbour_keys[j][0],
                                     purpose="encryption", round_=self.round_, a=self.me, b=j)
                            for j in mine}
        self._participants = {j: a.site for j, a in participants.items()}
        self._sessions = {j: bytes(a.session) for j, a in participants.items() if a.session}
        self._threshold = threshold
        seed_shares = share_secret(self._seed, threshold=threshold, num=len(mine))
        key_shares = share_secret(private_bytes(self._mask_key), threshold=threshold,
                                  num=len(mine))
        out = {}
        for j, s_share, k_share in zip(mine, seed_shares, key_shares):
            payload = len(s_share).to_bytes(4, "little") + s_share + k_share
            out[j] = encrypt(self._share_keys[j], payload, sender=self.me, receiver=j,
                             round_=self.round_)
        return out

    def _check_participants(self, participants: dict[int, Advert]) -> None:
        own = participants.get(self.me)
        if own is None or (own.pk_enc, own.pk_mask) != (public_bytes(self._enc_key),
                                                        public_bytes(self._mask_key)):
            raise SecAggRefused("secagg-own-key-replaced", "the participant list does not "
                                "carry this site's own round keys")
        if self.identity is None:
            return
        for j, advert in participants.items():
            # absent is not forged: say which (a relay that dropped a field, an older peer)
            missing = [name for name, value in (
                ("site id", advert.site), ("signature", advert.signature),
                ("session key", advert.session), ("endorsement", advert.endorsement))
                if not value]
            if missing:
                raise SecAggRefused("secagg-missing-field", f"participant {j}'s round keys "
                                    f"came without its {', '.join(missing)}; this site verifies "
                                    "every participant and answers only signed keys")
        session = self.identity.session
        if (own.site, own.session) != (self.identity.site, session.public):
            raise SecAggRefused("secagg-own-key-replaced", "the participant list does not "
                                "carry this site's own id and session key")
        sites = [a.site for a in participants.values()]
        if len(set(sites)) != len(sites):
            raise SecAggRefused("secagg-forged-key", "one registered site appears as several "
                                "participants")
        for j, advert in participants.items():
            if j == self.me:                 # its own advert, compared above: nothing to verify
                continue
            key = session.peer(self.identity.registry, advert.site, advert.session,
                               advert.endorsement)
            if key is None or not verify(key, advert.signature,
                                         advert_statement(self.run, self.round_, j, advert)):
                raise SecAggRefused("secagg-forged-key", f"participant {j} presents round keys "
                                    f"that registered site {advert.site!r} did not sign (or "
                                    "that site is not on the registration list)")

    def _check_parameters(self, n: int, degree: int, threshold: int) -> None:
        p = self.policy
        if n < p.min_contributors:
            raise SecAggRefused("secagg-parameters", f"{n} participants; this site requires "
                                f"at least {p.min_contributors} (secagg-min-contributors)")
        if not p.min_neighbours <= degree <= n - 1:
            raise SecAggRefused("secagg-parameters", f"degree {degree} is not in "
                                f"[{p.min_neighbours} (secagg-min-neighbours), {n - 1}]")
        if not majority(degree) <= threshold <= degree:
            raise SecAggRefused("secagg-parameters", f"threshold {threshold} is not a strict "
                                f"majority of {degree} neighbours (needs {majority(degree)}.."
                                f"{degree})")

    # ---- stage 2
    def masked_input(self, ciphertexts: dict[int, bytes], delta: np.ndarray,
                     num_examples: int, *, noise=None, sampler=None) -> np.ndarray:
        """Decrypt and keep the shares sent to us, then encode and mask ``delta`` (with a
        distributed-DP ``noise`` share added before the masks: ``client.privacy.ddp``);
        refused when fewer than ``t`` neighbours' shares arrived (the self mask alone would be
        left to protect the update)."""
        if self._masked or not self._threshold:
            raise SecAggRefused("secagg-stage", "a masked input was already sent, or the keys "
                                "were never shared this round")
        for sender, ct in ciphertexts.items():
            sender = int(sender)
            if sender not in self._neighbour_keys:
                raise SecAggRefused("secagg-neighbours", f"a share from {sender}, which is not "
                                    "a neighbour")
            payload = decrypt(self._share_keys[sender], ct, sender=sender, receiver=self.me,
                              round_=self.round_)
            size = int.from_bytes(payload[:4], "little")
            self._held[sender] = (payload[4:4 + size], payload[4 + size:])
        if len(self._held) < self._threshold:
            raise SecAggRefused("secagg-too-few-shares", f"shares from {len(self._held)} "
                                f"neighbours, at least {self._threshold} needed - the update "
                                "is not sent")
        self._masked = True
        masks = [(self._seed, 1)]
        for j in self._held:                 # partners: neighbours that shared with us
            seed = agree(self._mask_key, self._neighbour_keys[j][1], purpose="mask",
                         round_=self.round_, a=self.me, b=j)
            masks.append((seed, pairwise_sign(self.me, j)))
        vector, clipped = encode(delta, num_examples, self.encoding, masks=masks, noise=noise,
                                 sampler=sampler)
        if clipped:     # this site's own count stays here; the server reads the sum's total
            log.warning("secagg: %d values of this update are outside +/-%g (the "
                        "coordinator's secagg.clip_range) and were clipped", clipped,
                        self.encoding.clip_range)
        return vector

    # ---- stage 3
    def sign_survivors(self, survivors: list[int]) -> bytes:
        """Sign the one survivor set this site will ever unmask by."""
        if self.identity is None:
            raise SecAggRefused("secagg-stage", "no consistency stage in the semi-honest mode")
        if self._signed is not None:
            raise SecAggRefused("secagg-inconsistent-survivors", "this site already signed a "
                                "survivor set this round")
        survivors = self._check_survivors(survivors)
        self._signed = survivors
        return self.identity.session.sign(survivors_statement(self.run, self.round_, survivors))

    def _check_survivors(self, survivors: list[int]) -> list[int]:
        if not self._masked:
            raise SecAggRefused("secagg-stage", "this site sent no masked input this round")
        survivors = sorted({int(j) for j in survivors})
        if set(survivors) - set(self._participants):
            raise SecAggRefused("secagg-inconsistent-survivors", "the survivor set names sites "
                                "that were not participants of this round")
        if self.me not in survivors:
            raise SecAggRefused("secagg-inconsistent-survivors", "a survivor set without this "
                                "site; it reveals nothing for it")
        if len(survivors) < self.policy.min_contributors:
            raise SecAggRefused("secagg-parameters", f"{len(survivors)} survivors; this site "
                                f"requires at least {self.policy.min_contributors}")
        alive = [j for j in self._neighbour_keys if j in survivors]
        if len(alive) < self._threshold:
            raise SecAggRefused("secagg-too-few-shares", f"{len(alive)} of this site's "
                                f"neighbours survived, at least {self._threshold} needed")
        return survivors

    # ---- stage 4
    def unmask(self, survivors: list[int], signatures: dict[int, bytes] | None = None,
               *, min_signed: int = 0) -> dict[str, dict[int, bytes]]:
        """Per neighbour that shared with us: its self-mask share if it survived, its
        masking-key share if not - from the one survivor set at least ``t`` neighbours
        signed, and at least ``max(min_contributors, min_signed)`` participants in all
        (``min_signed``: the contributors a distributed-DP noise share assumed). The
        semi-honest protocol has no signatures: it counts the listed survivors instead, and
        says so in the log."""
        if self._answered:
            raise SecAggRefused("secagg-stage", "this round's unmask request was already "
                                "answered")
        survivors = self._check_survivors(survivors)
        if self.identity is not None:
            if survivors != self._signed:
                raise SecAggRefused("secagg-inconsistent-survivors", "the survivor set differs "
                                    "from the one this site signed (equivocation)")
            self._check_signatures(survivors, signatures or {}, min_signed)
        elif min_signed:
            # nothing to verify the set by: the floor holds only as far as the server relays
            # honestly, which is the trust this mode's operator granted - said, not assumed
            if len(survivors) < min_signed:
                raise SecAggRefused("secagg-too-few-contributors", f"{len(survivors)} "
                                    f"survivors listed; this round's distributed-DP noise "
                                    f"share assumes at least {min_signed}")
            log.warning("secagg round %d: semi-honest protocol - the %d contributors this "
                        "round's distributed-DP noise share assumes are counted from the "
                        "server's survivor list, not proven by signatures", self.round_,
                        min_signed)
        self._answered = True
        alive = set(survivors)
        return {"seed": {j: s for j, (s, _) in self._held.items() if j in alive},
                "key": {j: k for j, (_, k) in self._held.items() if j not in alive}}

    def _check_signatures(self, survivors: list[int], signatures: dict[int, bytes],
                          min_signed: int = 0) -> None:
        """At least ``t`` of this site's neighbours and ``min_contributors`` participants in
        all (each attesting it sent a masked input) signed exactly ``survivors``."""
        message = survivors_statement(self.run, self.round_, survivors)
        need = max(self.policy.min_contributors, min_signed)
        neighbours_, everyone = 0, 0
        # neighbours first: t of them are required, the rest only count toward the total
        for j in sorted(signatures, key=lambda j: int(j) not in self._neighbour_keys):
            if neighbours_ >= self._threshold and everyone >= need:
                break                                   # enough valid ones verified
            node, site = int(j), self._participants.get(int(j))
            # the session key this participant's endorsement proved in share-keys
            key = None if site is None else \
                self.identity.session.verified(site, self._sessions.get(node, b""))
            if node not in survivors or key is None or not verify(key, signatures[j], message):
                continue
            everyone += 1
            neighbours_ += node in self._neighbour_keys
        if neighbours_ < self._threshold or everyone < need:
            raise SecAggRefused("secagg-inconsistent-survivors", f"{neighbours_} of this site's "
                                f"neighbours ({self._threshold} needed) and {everyone} "
                                f"participants ({need} needed) signed this survivor set")


__all__ = ["SiteSecAgg", "SecAggRefused", "SecAggPolicy", "SiteIdentity", "InvalidShare"]
