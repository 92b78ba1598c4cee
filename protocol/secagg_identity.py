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
* **Run sessions** (``RunSession``): once per run, a site makes an EC P-256 signing key and
  signs ``(run, site, its public key)`` with its identity key (the *endorsement*); its
  per-round statements (round keys, survivor sets) are signed with that session key. A peer
  verifies an endorsement against the registration list the first time it meets that key in
  the run and remembers the verified key, so each round costs a P-256 check per statement
  (~0.07 ms here) instead of a P-384 one (~0.33 ms). The chain is the same - registered key
  -> endorsement of this run -> statement of this round - and P-256's ~128-bit security is
  that of X25519 and AES-128, the protocol's weakest links already. The session's private key
  lives where the round's secrets live (the site's node state), for one run.
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


def session_statement(*, run: int, site: str, public: bytes) -> bytes:
    """What an identity key signs once per run: this site's session key for that run."""
    return statement("session", run=run, round_=0, values=[site, public])


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


class RunSession:
    """A site's signing key for one run, endorsed by its identity key, and the peers'
    session keys it has already verified in that run (see the module notes)."""

    CURVE = ec.SECP256R1()

    def __init__(self):
        self.run: int | None = None
        self._key: ec.EllipticCurvePrivateKey | None = None
        self.public = b""                  # X9.62 compressed point
        self.endorsement = b""             # identity signature of ``session_statement``
        self._peers: dict[str, tuple[bytes, ec.EllipticCurvePublicKey]] = {}

    def start(self, *, run: int, site: str, identity_key: ec.EllipticCurvePrivateKey) -> None:
        """Make and endorse this run's key (once per run; another run starts afresh)."""
        if self.run == int(run) and self._key is not None:
            return
        self.run, self._key = int(run), ec.generate_private_key(self.CURVE)
        self.public = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
        self._peers = {str(site): (self.public, self._key.public_key())}     # itself
        self.endorsement = sign(identity_key, session_statement(run=self.run, site=site,
                                                                public=self.public))

    def sign(self, message: bytes) -> bytes:
        if self._key is None:
            raise IdentityError("no run session started")
        return sign(self._key, message)

    def peer(self, registry: Registry, site: str, public: bytes, endorsement: bytes
             ) -> ec.EllipticCurvePublicKey | None:
        """The session key registered site ``site`` endorsed for this run, or None when
        ``endorsement`` is not its identity signature of ``public`` for this run. Verified
        once per (site, key) and run; later rounds reuse the checked key."""
        site, public = str(site), bytes(public)
        cached = self._peers.get(site)
        if cached is not None and cached[0] == public:
            return cached[1]
        if self.run is None or not registry.check(
                site, endorsement, session_statement(run=self.run, site=site, public=public)):
            return None
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(self.CURVE, public)
        except ValueError:
            return None
        self._peers[site] = (public, key)
        return key

    def verified(self, site: str, public: bytes) -> ec.EllipticCurvePublicKey | None:
        """A session key already verified in this run (None: never met, or another key)."""
        cached = self._peers.get(str(site))
        return cached[1] if cached is not None and cached[0] == bytes(public) else None

    def to_state(self) -> dict:
        """Plain values for the node's state (the private key, like the round's secrets)."""
        if self._key is None:
            return {}
        sites = sorted(self._peers)
        return {"run": str(self.run), "key": self._key.private_bytes(
                    serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption()),
                "endorsement": self.endorsement, "peer-sites": sites,
                "peer-keys": [self._peers[s][0] for s in sites]}

    @classmethod
    def from_state(cls, state: dict) -> "RunSession":
        """The session ``to_state`` saved (the peers' keys were verified before saving)."""
        session = cls()
        if not state:
            return session
        key = serialization.load_der_private_key(bytes(state["key"]), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdentityError("the saved session key is not an EC key")
        session.run, session._key = int(state["run"]), key
        session.public = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
        session.endorsement = bytes(state["endorsement"])
        session._peers = {s: (bytes(p), ec.EllipticCurvePublicKey.from_encoded_point(
            cls.CURVE, bytes(p))) for s, p in zip(state["peer-sites"], state["peer-keys"])}
        return session


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
