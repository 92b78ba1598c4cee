"""SecAgg+ (Bell et al., CCS 2020), the server's side of one round, transport-free.

Stages (each one request to every site and its replies; the Flower workflow only moves them):

0. setup       - each site sends two X25519 public keys (encryption, masking), its registered
                 site id and, in the malicious-secure mode, its signature over them by its
                 run's session key, with that key's endorsement by its identity key
                 (``protocol.secagg_identity.RunSession``).
1. share-keys  - each site receives every participant's signed keys, checks them against the
                 federation's registration list, computes the neighbour graph itself from the
                 public seed (``graph_seed``) and returns, per neighbour, an AES-GCM ciphertext
                 holding a Shamir share of its self-mask seed and one of its masking key.
2. masked      - each site receives the ciphertexts addressed to it (it aborts with fewer than
                 ``t``), trains, and returns ``encode(delta) + PRG(self seed) +/- PRG(pairwise
                 seeds)`` (mod 2^32).
3. consistency - (malicious-secure mode) each survivor receives the survivor set and signs it.
4. unmask      - each survivor receives the survivor set and the signatures; with at least
                 ``t`` of its neighbours' signatures on that same set it reveals, per neighbour
                 that shared with it, the self-mask share if that neighbour survived and the
                 masking-key share if not - derived from the one signed set, so never both for
                 one site - and the server removes the masks.

The graph is a circulant k-regular graph over an order fixed by the seed (k ~ 2 log2 n), so the
server cannot choose anyone's neighbours; the threshold is a strict majority of the
neighbours (t > k/2). The server refuses to unmask with fewer than ``max(t, 2)`` survivors.
The semi-honest mode (``authenticated=False``) skips the signatures and the consistency
stage: it trusts the server to relay keys and survivor sets honestly.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .secagg_crypto import (CHUNK, InvalidShare, MaskSum, agree, load_private, parse_share,
                            recover_secret)
from .secagg_encoding import HEADER, Encoding, decode_into, read_header
from .secagg_identity import statement

log = logging.getLogger(__name__)


class SecAggError(RuntimeError):
    """The round cannot be completed securely; the message says why."""


@dataclass(frozen=True)
class Advert:
    """A site's stage-0 reply: its round keys and who vouches for them."""
    pk_enc: bytes
    pk_mask: bytes
    site: str = ""                    # registered site id
    signature: bytes = b""            # session signature of ``advert_statement`` (or empty)
    session: bytes = b""              # the site's session key for this run (P-256, compressed)
    endorsement: bytes = b""          # its identity signature of that key for this run


def advert_statement(run: int, round_: int, node: int, advert: Advert) -> bytes:
    """What a site signs in stage 0: its node, its site id, both round keys."""
    return statement("advert", run=run, round_=round_,
                     values=[node, advert.site, advert.pk_enc, advert.pk_mask])


def survivors_statement(run: int, round_: int, survivors) -> bytes:
    """What a site signs in the consistency stage: the survivor set, sorted."""
    return statement("survivors", run=run, round_=round_, values=sorted(int(j) for j in survivors))


def majority(degree: int) -> int:
    """The smallest threshold that is a strict majority of ``degree`` neighbours: two disjoint
    groups of neighbours can never both reach it."""
    return degree // 2 + 1


@dataclass(frozen=True)
class SecAggConfig:
    degree: int | None = None         # neighbours per site; None: ~2 log2 n, <= n - 1
    threshold: float = 0.5            # shares needed: a fraction of the degree (raised to a
                                      # strict majority) or an int (> degree / 2)
    encoding: Encoding = field(default_factory=Encoding)
    authenticated: bool = True        # malicious-secure: signed keys, consistency stage

    def resolve(self, n: int) -> tuple[int, int]:
        """(degree, threshold) for n sites; raises if the settings cannot work."""
        if n < 3:
            raise SecAggError(f"secure aggregation needs at least 3 sites, got {n}")
        degree = self.degree or min(n - 1, max(2, 2 * math.ceil(math.log2(n))))
        if degree > n - 1:
            raise SecAggError(f"degree {degree} needs at least {degree + 1} sites, got {n}")
        t = int(self.threshold) if self.threshold >= 1 else \
            max(majority(degree), math.ceil(self.threshold * degree))
        if not majority(degree) <= t <= degree:
            raise SecAggError(f"threshold {t} must be in [{majority(degree)}, degree={degree}] "
                              "(a strict majority of the neighbours)")
        return degree, t


def graph_seed(run: int, round_: int, participants: dict[int, str]) -> bytes:
    """The public seed of the neighbour graph: the run, the round and the sorted participants
    (node id and registered site id). Every site computes it from what it verified."""
    return hashlib.sha256(statement("graph", run=run, round_=round_, values=[
        f"{node}={participants[node]}" for node in sorted(participants)])).digest()


def neighbours(ids: list[int], degree: int, seed: bytes) -> dict[int, list[int]]:
    """Circulant graph over the order ``seed`` fixes (sites sorted by SHA-256(seed, id)):
    each site is connected to the ``degree`` nearest positions around the ring
    (``degree // 2`` each side, one more opposite when odd)."""
    order = sorted(ids, key=lambda i: hashlib.sha256(seed + str(int(i)).encode()).digest())
    n = len(order)
    out: dict[int, set[int]] = {i: set() for i in ids}
    for pos, site in enumerate(order):
        for step in range(1, degree // 2 + 1):
            other = order[(pos + step) % n]
            out[site].add(other)
            out[other].add(site)
        if degree % 2:
            other = order[(pos + n // 2) % n]
            out[site].add(other)
            out[other].add(site)
    return {i: sorted(v) for i, v in out.items()}


def pairwise_sign(me: int, other: int) -> int:
    """Site ``me`` adds the pairwise mask when ``me < other`` and subtracts it otherwise."""
    return 1 if me < other else -1


@dataclass
class ServerRound:
    """State of one SecAgg+ round at the server."""

    round_: int
    sites: list[int]
    config: SecAggConfig
    length: int                       # encoded vector length (parameters + HEADER slots)
    run: int = 0

    def __post_init__(self):
        self.degree, self.threshold = self.config.resolve(len(self.sites))
        self.public: dict[int, Advert] = {}
        self.graph: dict[int, list[int]] = {}
        self.ciphertexts: dict[int, dict[int, bytes]] = {}     # receiver -> {sender: ct}
        self.masked: dict[int, np.ndarray] = {}
        self.survivors: list[int] = []
        self.signatures: dict[int, bytes] = {}
        self.clipped = 0              # values the encoding clipped, all sites (once unmasked)
        self.capped = 0               # sites whose example count was capped (once unmasked)

    # stage 0 -> 1
    def accept_keys(self, replies: dict[int, Advert]) -> dict[int, dict]:
        """Adverts in; per site, every participant's advert, its neighbours and the
        parameters out (share-keys requests). The server cannot check the signatures (it need
        not hold the registration list); every site does."""
        self.public = {int(i): a for i, a in replies.items() if int(i) in self.sites}
        self._require(self.public, "advertised keys")
        self.degree, self.threshold = self.config.resolve(len(self.public))
        seed = graph_seed(self.run, self.round_, {i: a.site for i, a in self.public.items()})
        self.graph = neighbours(sorted(self.public), self.degree, seed)
        return {i: {"participants": self.public, "neighbours": self.graph[i],
                    "degree": self.degree, "threshold": self.threshold}
                for i in self.public}

    # stage 1 -> 2
    def accept_shares(self, replies: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Encrypted shares in (sender -> {receiver: ct}); per receiver, what it holds."""
        shared = {}
        for i, cts in replies.items():
            expected = set(self.graph.get(i, []))
            if i not in self.public or set(cts) != expected:
                # a partial set would leave masks that no neighbour cancels
                log.warning("secagg round %d: site %s sent shares for %d of %d neighbours; "
                            "excluded", self.round_, i, len(set(cts) & expected), len(expected))
                continue
            shared[i] = cts
        self._require(shared, "shared their keys")
        for sender, cts in shared.items():
            for receiver, ct in cts.items():
                if receiver in shared:
                    self.ciphertexts.setdefault(receiver, {})[sender] = ct
        self.shared = set(shared)
        return {i: self.ciphertexts.get(i, {}) for i in shared}

    # stage 2 -> 3
    def accept_masked(self, replies: dict[int, np.ndarray]) -> dict[int, dict]:
        """Masked vectors in; per survivor, the survivor set out (to sign or to unmask by)."""
        for site, vector in replies.items():
            if site not in self.shared:
                log.warning("secagg round %d: masked input from %s, which shared no keys; "
                            "ignored", self.round_, site)
                continue
            if vector.dtype != np.uint32 or vector.shape != (self.length,):
                log.warning("secagg round %d: site %s sent a masked vector of shape %s/%s, "
                            "expected (%d,)/uint32; excluded", self.round_, site,
                            vector.shape, vector.dtype, self.length)
                continue
            self.masked[site] = vector
        self._require(self.masked, "sent masked input")
        self.survivors = sorted(self.masked)
        return {i: {"survivors": self.survivors} for i in self.survivors}

    # stage 3 -> 4 (malicious-secure mode)
    def accept_signatures(self, replies: dict[int, bytes]) -> dict[int, dict]:
        """Survivor-set signatures in; per survivor, the set and every signature out. The
        sites check them; a survivor that did not sign may still be unmasked."""
        self.signatures = {int(i): bytes(sig) for i, sig in replies.items()
                           if int(i) in self.masked}
        self._require(self.signatures, "signed the survivor set")
        return self.unmask_requests()

    def unmask_requests(self) -> dict[int, dict]:
        return {i: {"survivors": self.survivors, "signatures": self.signatures}
                for i in self.survivors}

    # stage 4 -> result
    def unmask(self, replies: dict[int, dict]) -> tuple[np.ndarray, int]:
        """Shares in (site -> {"seed": {j: share}, "key": {j: share}}); the weighted average
        delta (float32) and the total weight out."""
        survivors = set(self.masked)
        seed_shares: dict[int, list[bytes]] = {}
        key_shares: dict[int, list[bytes]] = {}
        for site, reply in replies.items():
            if site not in survivors:
                continue
            for kind, held in (("seed", seed_shares), ("key", key_shares)):
                for j, share in reply.get(kind, {}).items():
                    try:
                        parse_share(share)
                    except InvalidShare as err:
                        log.warning("secagg round %d: site %s sent a malformed %s share of "
                                    "site %s (%s); ignored", self.round_, site, kind, j, err)
                        continue
                    held.setdefault(int(j), []).append(share)
        removals: list[tuple[bytes, int]] = []
        for j in survivors:             # each survivor's self mask
            removals.append((self._recover(seed_shares.get(j, []),
                                           f"site {j}'s self-mask seed"), -1))
        for d in self.shared - survivors:     # pairwise masks that survivors added for d
            key = load_private(self._recover(key_shares.get(d, []),
                                             f"the masking key of site {d}, which dropped"))
            for j in self.graph[d]:
                if j in survivors:
                    seed = agree(key, self.public[j].pk_mask, purpose="mask", round_=self.round_,
                                 a=d, b=j)
                    removals.append((seed, -pairwise_sign(j, d)))
        return self._sum_and_unmask(list(self.masked.values()), MaskSum(removals))

    def _recover(self, shares: list[bytes], what: str) -> bytes:
        """A secret from its shares, every share beyond the threshold checked against the
        others; too few or inconsistent shares fail the round (nothing is unmasked)."""
        if len(shares) < self.threshold:
            raise SecAggError(f"secagg round {self.round_}: only {len(shares)} shares of "
                              f"{what}, {self.threshold} needed - nothing is unmasked")
        try:
            return recover_secret(shares, threshold=self.threshold)
        except InvalidShare as err:
            raise SecAggError(f"secagg round {self.round_}: shares of {what}: {err} - "
                              "nothing is unmasked") from None

    def _sum_and_unmask(self, inputs: list[np.ndarray], removal: MaskSum
                        ) -> tuple[np.ndarray, int]:
        """Piece by piece, while each piece is in cache: sum the masked inputs, remove the
        masks, decode. The first piece carries the header (the weight; the clipped values and
        capped sites, kept in ``clipped`` and ``capped``), so decoding never waits for the
        whole sum and no P-sized integer sum is ever allocated."""
        encoding = self.config.encoding
        average = np.empty(self.length - HEADER, dtype=np.float32)
        piece = np.empty(CHUNK, dtype=np.uint32)
        weight = 0
        for start in range(0, self.length, CHUNK):
            part = piece[:min(CHUNK, self.length - start)]
            np.copyto(part, inputs[0][start:start + part.size])
            for vector in inputs[1:]:
                np.add(part, vector[start:start + part.size], out=part)
            removal.add_to(part)
            if start == 0:
                weight, self.clipped, self.capped = read_header(part[:HEADER])
                part = part[HEADER:]
            first = max(start, HEADER)
            decode_into(part, weight, encoding,
                        average[first - HEADER:first - HEADER + part.size])
        return average, weight

    def _require(self, present: dict | set, what: str) -> None:
        floor = max(self.threshold, 2)
        if len(present) < floor:
            raise SecAggError(f"secagg round {self.round_}: only {len(present)} sites "
                              f"{what}; at least {floor} needed (threshold {self.threshold}) - "
                              "nothing is unmasked for fewer")
