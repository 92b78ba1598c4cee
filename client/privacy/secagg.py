"""SecAgg+ at a site: keys, shares, the masked update and the site's checks at unmasking.

One ``SiteSecAgg`` per round (its secrets never outlive the round). The site refuses an unmask
request that asks, for any neighbour, for both the self-mask share and the masking-key share
(together they would unmask that neighbour's individual update), a second unmask request in
the same round, or one about sites that shared nothing with it. This is the semi-honest model
of the paper: a malicious server that tells different sites different survivor sets needs the
paper's signed consistency check, which is not implemented.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from protocol.secagg_crypto import (InvalidShare, agree, decrypt, encrypt,
                                      generate_private_key, load_private, private_bytes,
                                      public_bytes, share_secret)
from protocol.secagg_encoding import Encoding, encode
from protocol.secagg_protocol import pairwise_sign


class SecAggRefused(ValueError):
    """The site will not answer this request: it would break the protocol's guarantee."""


@dataclass
class SiteSecAgg:
    me: int
    round_: int
    encoding: Encoding

    def __post_init__(self):
        self._enc_key = generate_private_key()
        self._mask_key = generate_private_key()
        self._seed = os.urandom(32)
        self._neighbour_keys: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}        # neighbour -> (seed, key) shares
        self._threshold = 0
        self._answered = False

    def to_state(self) -> dict:
        """Plain values (bytes, str, int lists) for the node's state between stages."""
        nodes = sorted(self._neighbour_keys)
        held = sorted(self._held)
        return {"me": str(self.me), "round": self.round_,
                "encoding": [self.encoding.clip_range, float(self.encoding.max_sites),
                             float(self.encoding.max_weight)],
                "enc-key": private_bytes(self._enc_key), "mask-key": private_bytes(self._mask_key),
                "seed": self._seed, "threshold": self._threshold, "answered": self._answered,
                "nodes": [str(j) for j in nodes],
                "pk-enc": [self._neighbour_keys[j][0] for j in nodes],
                "pk-mask": [self._neighbour_keys[j][1] for j in nodes],
                "held": [str(j) for j in held], "held-seed": [self._held[j][0] for j in held],
                "held-key": [self._held[j][1] for j in held]}

    @classmethod
    def from_state(cls, state: dict) -> "SiteSecAgg":
        clip, sites, weight = state["encoding"]
        site = cls(int(state["me"]), int(state["round"]),
                   Encoding(clip_range=clip, max_sites=int(sites), max_weight=int(weight)))
        site._enc_key, site._mask_key = load_private(state["enc-key"]), \
            load_private(state["mask-key"])
        site._seed, site._threshold = state["seed"], int(state["threshold"])
        site._answered = bool(state["answered"])
        site._neighbour_keys = {int(j): (e, m) for j, e, m in
                                zip(state["nodes"], state["pk-enc"], state["pk-mask"])}
        site._held = {int(j): (s, k) for j, s, k in
                      zip(state["held"], state["held-seed"], state["held-key"])}
        return site

    # stage 0
    def advertise(self) -> tuple[bytes, bytes]:
        return public_bytes(self._enc_key), public_bytes(self._mask_key)

    # stage 1
    def share_keys(self, neighbours: dict[int, tuple[bytes, bytes]], threshold: int
                   ) -> dict[int, bytes]:
        if not 2 <= threshold <= len(neighbours):
            raise SecAggRefused(f"threshold {threshold} is not in [2, {len(neighbours)} "
                                "neighbours]")
        self._neighbour_keys = {int(j): keys for j, keys in neighbours.items()}
        self._threshold = threshold
        order = sorted(self._neighbour_keys)
        seed_shares = share_secret(self._seed, threshold=threshold, num=len(order))
        key_shares = share_secret(private_bytes(self._mask_key), threshold=threshold,
                                  num=len(order))
        out = {}
        for j, s_share, k_share in zip(order, seed_shares, key_shares):
            key = agree(self._enc_key, self._neighbour_keys[j][0], purpose="encryption",
                        round_=self.round_, a=self.me, b=j)
            payload = len(s_share).to_bytes(4, "little") + s_share + k_share
            out[j] = encrypt(key, payload, sender=self.me, receiver=j, round_=self.round_)
        return out

    # stage 2
    def masked_input(self, ciphertexts: dict[int, bytes], delta: np.ndarray,
                     num_examples: int, *, noise=None, sampler=None) -> tuple[np.ndarray, int]:
        """Decrypt and keep the shares sent to us, then encode and mask ``delta`` (with a
        distributed-DP ``noise`` share added before the masks: ``client.privacy.ddp``)."""
        for sender, ct in ciphertexts.items():
            sender = int(sender)
            if sender not in self._neighbour_keys:
                raise SecAggRefused(f"a share from {sender}, which is not a neighbour")
            key = agree(self._enc_key, self._neighbour_keys[sender][0], purpose="encryption",
                        round_=self.round_, a=self.me, b=sender)
            payload = decrypt(key, ct, sender=sender, receiver=self.me, round_=self.round_)
            size = int.from_bytes(payload[:4], "little")
            self._held[sender] = (payload[4:4 + size], payload[4 + size:])
        masks = [(self._seed, 1)]
        for j in self._held:                 # partners: neighbours that shared with us
            seed = agree(self._mask_key, self._neighbour_keys[j][1], purpose="mask",
                         round_=self.round_, a=self.me, b=j)
            masks.append((seed, pairwise_sign(self.me, j)))
        return encode(delta, num_examples, self.encoding, masks=masks, noise=noise,
                      sampler=sampler)

    # stage 3
    def unmask(self, survived: list[int], dropped: list[int]) -> dict[str, dict[int, bytes]]:
        survived, dropped = {int(j) for j in survived}, {int(j) for j in dropped}
        if self._answered:
            raise SecAggRefused("this round's unmask request was already answered")
        if survived & dropped:
            raise SecAggRefused(f"asked for both shares of {sorted(survived & dropped)}; "
                                "that would unmask an individual update")
        unknown = (survived | dropped) - set(self._held) - {self.me}
        if unknown:
            raise SecAggRefused(f"asked about {sorted(unknown)}, which shared nothing with us")
        self._answered = True
        return {"seed": {j: self._held[j][0] for j in survived if j in self._held},
                "key": {j: self._held[j][1] for j in dropped}}


__all__ = ["SiteSecAgg", "SecAggRefused", "InvalidShare"]
