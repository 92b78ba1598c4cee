"""Who is who in a SecAgg+ round, without trusting the server that relays the messages.

A malicious server can invent neighbours whose keys it holds, pick the neighbour graph, and
tell different sites different survivor sets. The active variant of the protocol (Bonawitz et
al. CCS 2017; Bell et al. CCS 2020) closes these with signatures by long-term identity keys
that every site knows in advance:

* **Identity keys** are the sites' registered SuperNode keys (EC P-384, OpenSSH; ``medfed site
  keygen`` / ``medfed certs``). A site signs with its own ``auth.key``.
* **The registration list** (``Registry``) is the federation's list of those public keys: the
  concatenated ``auth.pub`` lines (``ecdsa-sha2-nistp384 AAAA... medfed-site:<site>``), handed
  to every site out of band by the consortium - never by the coordinator during a run. A key
  the coordinator made up is not on it, so its signature fails.
* **Signed statements** carry a domain-separating prefix, the run, the round and every value
  they vouch for, so a statement is never valid in another run, round or role.
* **Simulation** derives each partition's key deterministically (``simulation_key``); the
  same code path runs, but a simulation is not the threat model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

_DOMAIN = b"medfed-secagg+/active/1"
SITE_COMMENT = "medfed-site:"            # the comment ``medfed site keygen`` writes
_P384_ORDER = int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
                  "581a0db248b0a77aecec196accc52973", 16)


class IdentityError(ValueError):
    """A registration list or identity key that cannot be used; the message says why."""


def _field(value) -> bytes:
    raw = value if isinstance(value, bytes) else str(value).encode()
    return len(raw).to_bytes(4, "big") + raw              # length-prefixed: unambiguous


def statement(kind: str, *, run: int, round_: int, values: list) -> bytes:
    """The bytes a site signs: the protocol, the kind of statement, run, round, values."""
    return b"".join([_field(_DOMAIN), _field(kind), _field(run), _field(round_),
                     *(_field(v) for v in values)])


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    return key.sign(message, ec.ECDSA(hashes.SHA384()))


def verify(public: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public.verify(bytes(signature), message, ec.ECDSA(hashes.SHA384()))
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class Registry:
    """Site id -> registered identity public key."""

    keys: dict[str, ec.EllipticCurvePublicKey]

    @classmethod
    def parse(cls, text: str) -> "Registry":
        """``auth.pub`` lines (blank lines and ``#`` comments ignored); each names its site
        in the ``medfed-site:<site>`` comment. Duplicate sites or keys are refused."""
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        seen: set[bytes] = set()
        for number, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            site = parts[2][len(SITE_COMMENT):] if len(parts) == 3 and \
                parts[2].startswith(SITE_COMMENT) else ""
            if not site:
                raise IdentityError(f"registration list line {number}: expected "
                                    f"'<key type> <base64> {SITE_COMMENT}<site>' (an auth.pub "
                                    "line)")
            try:
                key = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
            except (ValueError, TypeError, IndexError):
                raise IdentityError(f"registration list line {number}: not an OpenSSH public "
                                    "key") from None
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise IdentityError(f"registration list line {number}: not an EC key")
            raw = key.public_bytes(serialization.Encoding.X962,
                                   serialization.PublicFormat.UncompressedPoint)
            if site in keys or raw in seen:
                raise IdentityError(f"registration list line {number}: site {site!r} or its "
                                    "key is listed twice")
            keys[site], _ = key, seen.add(raw)
        if not keys:
            raise IdentityError("the registration list names no site")
        return cls(keys)

    def check(self, site: str, signature: bytes, message: bytes) -> bool:
        """True when ``site`` is registered and ``signature`` is its signature of ``message``."""
        key = self.keys.get(str(site))
        return key is not None and verify(key, signature, message)


def load_identity_key(raw: bytes) -> ec.EllipticCurvePrivateKey:
    """A site's identity key from its ``auth.key`` (OpenSSH) or a PEM file."""
    for loader in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            key = loader(raw, None)
        except (ValueError, TypeError):
            continue
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
    raise IdentityError("the identity key is not an unencrypted EC private key (auth.key)")


def simulation_key(site: str) -> ec.EllipticCurvePrivateKey:
    """A simulated site's identity key, derived from its name (simulation only: anyone can
    derive it)."""
    digest = hashlib.sha512(b"medfed-simulation-identity|" + site.encode()).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (_P384_ORDER - 1) + 1,
                                 ec.SECP384R1())


def simulation_registry(sites: list[str]) -> Registry:
    return Registry({s: simulation_key(s).public_key() for s in sites})
