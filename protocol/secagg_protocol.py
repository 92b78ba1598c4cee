"""SecAgg+ (Bell et al., CCS 2020), the server's side of one round, transport-free.

Stages (each one request to every site and its replies; the Flower workflow only moves them):

0. setup      - each site sends two X25519 public keys (encryption, masking).
1. share-keys - each site receives its neighbours' public keys and returns, per neighbour, an
                AES-GCM ciphertext holding a Shamir share of its self-mask seed and one of its
                masking private key (threshold ``t`` among its ``k`` neighbours).
2. masked     - each site receives the ciphertexts addressed to it, trains, and returns
                ``encode(delta) + PRG(self seed) +/- PRG(pairwise seeds)`` (mod 2^32).
3. unmask     - each surviving site receives, per neighbour, *either* "survived" (send your
                share of its self-mask seed) *or* "dropped" (send your share of its masking
                key) - never both for one site - and the server removes the masks.

The neighbour graph is a random circulant k-regular graph (k even, k ~ 2 log2 n). The server
refuses to unmask with fewer than ``max(t, 2)`` survivors: nothing is unmasked for one site.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .secagg_crypto import (CHUNK, InvalidShare, MaskSum, agree, load_private, parse_share,
                            recover_secret)
from .secagg_encoding import Encoding, decode_into, total_weight

log = logging.getLogger(__name__)


class SecAggError(RuntimeError):
    """The round cannot be completed securely; the message says why."""


@dataclass(frozen=True)
class SecAggConfig:
    degree: int | None = None         # neighbours per site (even); None: ~2 log2 n, <= n - 1
    threshold: float = 0.5            # shares needed, as a fraction of the degree (or an int)
    encoding: Encoding = field(default_factory=Encoding)

    def resolve(self, n: int) -> tuple[int, int]:
        """(degree, threshold) for n sites; raises if the settings cannot work."""
        if n < 3:
            raise SecAggError(f"secure aggregation needs at least 3 sites, got {n}")
        degree = self.degree or min(n - 1, max(2, 2 * math.ceil(math.log2(n))))
        if degree > n - 1:
            raise SecAggError(f"degree {degree} needs at least {degree + 1} sites, got {n}")
        t = int(self.threshold) if self.threshold >= 1 else \
            max(2, math.ceil(self.threshold * degree))
        if not 2 <= t <= degree:
            raise SecAggError(f"threshold {t} must be in [2, degree={degree}]")
        return degree, t


def neighbours(ids: list[int], degree: int, rng: np.random.Generator) -> dict[int, list[int]]:
    """Random circulant graph: shuffle the sites, connect each to the ``degree`` nearest
    positions around the ring (``degree // 2`` each side, one more ahead when odd)."""
    order = [ids[k] for k in rng.permutation(len(ids))]    # ids may not fit in int64
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
    length: int                       # encoded vector length (parameters + 1 weight slot)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def __post_init__(self):
        self.degree, self.threshold = self.config.resolve(len(self.sites))
        self.graph = neighbours(sorted(self.sites), self.degree, self.rng)
        self.public: dict[int, tuple[bytes, bytes]] = {}       # site -> (pk_enc, pk_mask)
        self.ciphertexts: dict[int, dict[int, bytes]] = {}     # receiver -> {sender: ct}
        self.masked: dict[int, np.ndarray] = {}
        self.clipped = 0

    # stage 0 -> 1
    def accept_keys(self, replies: dict[int, tuple[bytes, bytes]]) -> dict[int, dict]:
        """Public keys in; per site, its neighbours' keys out (share-keys requests)."""
        self.public = {i: keys for i, keys in replies.items() if i in self.graph}
        self._require(self.public, "advertised keys")
        return {i: {"neighbours": {j: self.public[j] for j in self.graph[i] if j in self.public},
                    "threshold": self.threshold}
                for i in self.public}

    # stage 1 -> 2
    def accept_shares(self, replies: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Encrypted shares in (sender -> {receiver: ct}); per receiver, what it holds."""
        shared = {}
        for i, cts in replies.items():
            expected = {j for j in self.graph.get(i, []) if j in self.public}
            if i not in self.public or set(cts) != expected:
                # a partial set would leave masks that no neighbour cancels
                log.warning("secagg round %d: site %s sent shares for %d of %d neighbours; "
                            "excluded", self.round_, i, len(set(cts) & expected), len(expected))
                continue
            shared[i] = cts
        self._require(shared, "shared their keys")
        for sender, cts in shared.items():
            for receiver, ct in cts.items():
                if receiver in self.graph[sender]:
                    self.ciphertexts.setdefault(receiver, {})[sender] = ct
        self.shared = set(shared)
        return {i: self.ciphertexts.get(i, {}) for i in shared}

    # stage 2 -> 3
    def accept_masked(self, replies: dict[int, tuple[np.ndarray, int]]) -> dict[int, dict]:
        """Masked vectors in; per survivor, which neighbours survived / dropped."""
        for site, (vector, clipped) in replies.items():
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
            self.clipped += int(clipped)
        self._require(self.masked, "sent masked input")
        survivors = set(self.masked)
        dropped = self.shared - survivors
        return {i: {"survived": [j for j in self.graph[i] if j in survivors],
                    "dropped": [j for j in self.graph[i] if j in dropped]}
                for i in survivors}

    # stage 3 -> result
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
                    seed = agree(key, self.public[j][1], purpose="mask", round_=self.round_,
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
        masks, decode. The first piece carries the weight, so decoding never waits for the
        whole sum and no P-sized integer sum is ever allocated."""
        encoding = self.config.encoding
        average = np.empty(self.length - 1, dtype=np.float32)
        piece = np.empty(CHUNK, dtype=np.uint32)
        weight = 0
        for start in range(0, self.length, CHUNK):
            part = piece[:min(CHUNK, self.length - start)]
            np.copyto(part, inputs[0][start:start + part.size])
            for vector in inputs[1:]:
                np.add(part, vector[start:start + part.size], out=part)
            removal.add_to(part)
            if start == 0:
                weight = total_weight(part[0])
                part = part[1:]
            first = max(start, 1)
            decode_into(part, weight, encoding, average[first - 1:first - 1 + part.size])
        return average, weight

    def _require(self, present: dict | set, what: str) -> None:
        floor = max(self.threshold, 2)
        if len(present) < floor:
            raise SecAggError(f"secagg round {self.round_}: only {len(present)} sites "
                              f"{what}; at least {floor} needed (threshold {self.threshold}) - "
                              "nothing is unmasked for fewer")
