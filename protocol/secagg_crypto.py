"""Cryptography of SecAgg+ (Bell et al., CCS 2020), from ``cryptography`` primitives.

* Key agreement: X25519, the raw shared secret run through HKDF-SHA256 with a context string
  that names the protocol, the round and both parties (a key is never reused across rounds
  or purposes).
* Shares travel encrypted with AES-256-GCM; the associated data binds sender, receiver and
  round, so a share replayed from another round or redirected to another site fails to decrypt.
* Masks: a 32-byte seed keys AES-128 in counter mode (key = its first 16 bytes, nonce = the
  next 12), whose keystream read as uint32 is the mask. The stream is produced by OpenSSL's
  AES-GCM encryptor on zeros: GCM's ciphertext *is* the CTR keystream (32-bit counter from
  nonce || 2, NIST SP 800-38D), the tag is never formed or used, and OpenSSL runs GCM on
  VAES/AVX-512 where its plain CTR path uses AES-NI only: ~0.21 ns per element here instead
  of ~0.36 (a site expands 1 + k streams per parameter). A stream is capped at GCM's 2^36 - 32
  bytes (OpenSSL refuses more); a vector of 2^34 - 8 words. AES-128 matches the ~128-bit
  security of X25519, the weakest link; AES-256 cost 30% more per mask. Flower's legacy
  SecAgg+ instead folds each seed to 32 bits and expands it with NumPy's MT19937, which is not
  a cryptographic PRG.
* Secret sharing: Shamir over the prime field GF(2^521 - 1) (a Mersenne prime; any 32-byte
  secret is a field element), coefficients from ``secrets``. Flower's pycryptodome-based
  implementation works in GF(2^128) in pure Python and took ~3 ms per 32-byte secret to
  recover (the server recovers one per site per round); this takes microseconds.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
CHUNK = 1 << 16                     # words per streamed piece: 256 KiB, stays in L2 cache
_PRIME = 2**521 - 1                 # Shamir's field
_SHARE_VALUE_BYTES = 66             # a field element, little-endian
_PROTOCOL = b"medfed-secagg+/2"     # /2: GCM-keystream masks; a /1 peer fails to decrypt


class InvalidShare(ValueError):
    """A ciphertext did not authenticate: tampered, replayed, or meant for someone else."""


def generate_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def load_private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, *, purpose: str, round_: int,
          a: int, b: int) -> bytes:
    """A 32-byte key shared by parties ``a`` and ``b`` (order-independent) for one purpose
    (``"encryption"`` or ``"mask"``) in one round."""
    if len(peer_public) != 32:
        raise InvalidShare(f"a public key has 32 bytes, got {len(peer_public)}")
    secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    lo, hi = sorted((int(a), int(b)))
    info = b"|".join([_PROTOCOL, purpose.encode(), str(round_).encode(),
                      str(lo).encode(), str(hi).encode()])
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(secret)


def _associated(sender: int, receiver: int, round_: int) -> bytes:
    return b"|".join([_PROTOCOL, b"share", str(round_).encode(), str(sender).encode(),
                      str(receiver).encode()])


def encrypt(key: bytes, plaintext: bytes, *, sender: int, receiver: int, round_: int) -> bytes:
    """AES-256-GCM with a random 96-bit nonce (prefixed to the ciphertext)."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _associated(sender, receiver, round_))


def decrypt(key: bytes, ciphertext: bytes, *, sender: int, receiver: int, round_: int) -> bytes:
    if len(ciphertext) < 12 + 16:
        raise InvalidShare("ciphertext too short")
    try:
        return AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:],
                                   _associated(sender, receiver, round_))
    except InvalidTag:
        raise InvalidShare(f"share from {sender} to {receiver} for round {round_} does not "
                           "authenticate (tampered, replayed or misdirected)") from None


def keystream(seed: bytes):
    """The encryptor whose keystream (its encryption of zeros) is ``seed``'s mask: AES-128-CTR
    keyed by ``seed[:16]`` from the counter block ``seed[16:28] || 2`` (see the module notes).
    Each seed is derived for one round and one pair, so it keys one stream only."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed[:16]), modes.GCM(seed[16:28])).encryptor()


class Words:
    """A reusable buffer that reads the next ``n <= CHUNK`` keystream words of an encryptor
    (the keystream is the encryption of zeros; ``update_into`` wants 16 spare bytes)."""

    def __init__(self):
        self._raw = np.empty(4 * CHUNK + 16, dtype=np.uint8)
        self._view = memoryview(self._raw)
        self._words = self._raw[:4 * CHUNK].view(np.uint32)
        self._zeros = memoryview(bytes(4 * CHUNK))

    def next(self, encryptor, n: int) -> np.ndarray:
        """A view valid until the next call."""
        encryptor.update_into(self._zeros[:4 * n], self._view[:4 * n + 16])
        return self._words[:n]


class MaskSum:
    """``sum(sign * PRG(seed))`` over several seeds, added (mod 2^32) to consecutive pieces of
    a uint32 vector: every stream advances by the piece's length, so a caller that walks a
    vector piece by piece adds each mask while the piece is still in cache - one pass over
    memory for all masks instead of two per mask."""

    def __init__(self, masks: list[tuple[bytes, int]]):
        self._streams = [(keystream(seed), sign) for seed, sign in masks]
        self._words = Words()

    def add_to(self, part: np.ndarray) -> None:
        if part.size > CHUNK:
            raise ValueError(f"pieces of at most {CHUNK} words, got {part.size}")
        for encryptor, sign in self._streams:
            words = self._words.next(encryptor, part.size)
            if sign > 0:
                np.add(part, words, out=part)
            else:
                np.subtract(part, words, out=part)


def apply_masks(vector: np.ndarray, masks: list[tuple[bytes, int]]) -> np.ndarray:
    """``vector += sum(sign * expand_mask(seed))`` (mod 2^32) in place, streaming."""
    if vector.dtype != np.uint32:
        raise ValueError("masks apply to uint32 vectors")
    total = MaskSum(masks)
    for start in range(0, vector.size, CHUNK):
        total.add_to(vector[start:start + CHUNK])
    return vector


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32: the mask of ``seed`` on its own (tests and benchmarks; the
    protocol adds masks with ``MaskSum`` without materialising them)."""
    return apply_masks(np.zeros(length, dtype=np.uint32), [(seed, 1)])


def share_secret(secret: bytes, *, threshold: int, num: int) -> list[bytes]:
    """Shamir shares of ``secret`` (at most 65 bytes): any ``threshold`` of them recover it,
    fewer reveal nothing about it. A share is its 4-byte index (1..num) and the polynomial's
    value there."""
    if not 1 <= threshold <= num:
        raise ValueError(f"need 1 <= threshold <= shares, got {threshold} of {num}")
    if len(secret) > _SHARE_VALUE_BYTES - 1:
        raise ValueError(f"secrets of at most {_SHARE_VALUE_BYTES - 1} bytes, "
                         f"got {len(secret)}")
    coefficients = [int.from_bytes(secret, "little")] + [
        secrets.randbelow(_PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num + 1):
        y = 0
        for c in reversed(coefficients):            # Horner
            y = (y * x + c) % _PRIME
        shares.append(x.to_bytes(4, "little") + y.to_bytes(_SHARE_VALUE_BYTES, "little"))
    return shares


def parse_share(share: bytes) -> tuple[int, int]:
    """(index, value) of a well-formed share; anything else raises ``InvalidShare``."""
    if len(share) != 4 + _SHARE_VALUE_BYTES:
        raise InvalidShare(f"a share has {4 + _SHARE_VALUE_BYTES} bytes, got {len(share)}")
    x, y = int.from_bytes(share[:4], "little"), int.from_bytes(share[4:], "little")
    if x == 0 or y >= _PRIME:
        raise InvalidShare("a share with index 0 or a value outside the field")
    return x, y


def _lagrange_at(points: dict[int, int], at: int) -> int:
    """The interpolating polynomial through ``points``, evaluated at ``at``."""
    value = 0
    for x_j, y_j in points.items():
        num, den = 1, 1
        for x_m in points:
            if x_m != x_j:
                num = num * (x_m - at) % _PRIME
                den = den * (x_m - x_j) % _PRIME
        value = (value + y_j * num * pow(den, -1, _PRIME)) % _PRIME
    return value


def recover_secret(shares: list[bytes], length: int = SEED_BYTES,
                   threshold: int | None = None) -> bytes:
    """The ``length``-byte secret from its shares (Lagrange interpolation at 0).

    With ``threshold``, the first ``threshold`` shares fix the polynomial and every further
    share must lie on it: a wrong share - corrupted or sent on purpose - would otherwise give a
    wrong seed whose mask does not cancel, and a garbage aggregate nobody notices. Malformed,
    duplicated or inconsistent shares raise ``InvalidShare``; too few shares give a field
    element that almost never fits in ``length`` bytes (``InvalidShare`` too)."""
    points: dict[int, int] = {}
    for share in shares:
        x, y = parse_share(share)
        if x in points:
            raise InvalidShare(f"two shares with index {x}")
        points[x] = y
    basis = dict(list(points.items())[:threshold]) if threshold else points
    for x, y in points.items():
        if x not in basis and _lagrange_at(basis, x) != y:
            raise InvalidShare(f"the {len(points)} shares do not lie on one polynomial of "
                               f"degree {len(basis) - 1}: at least one is wrong")
    secret = _lagrange_at(basis, 0)
    if secret >= 1 << (8 * length):
        raise InvalidShare(f"the shares do not reconstruct a {length}-byte secret (too few "
                           "or inconsistent)")
    return secret.to_bytes(length, "little")
