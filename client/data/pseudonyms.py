"""Keyed pseudonyms: a site's study, patient and series identifiers become HMAC-SHA256 values
under a secret that never leaves the site.

Why keyed: identifiers are guessable. A PatientID is a short hospital number and UIDs are
known to everyone who saw the study (the PACS, the referring hospital, a coordinator holding
the synthetic generator's list). An unkeyed hash of them can be recomputed by anyone, so a
pseudonym - or the manifest fingerprint a site reports, which hashes them - could be linked
back to a patient or tested against a guessed cohort. Under a site secret it cannot, and two
sites holding the same patient produce unlinkable pseudonyms.

The secret is 32 random bytes in ``<state-dir>/pseudonym.key`` (mode 0600), created by the
site on first use. A deployed site always uses it. A simulation (one machine, data it was
given, nothing persisted or reported outside the process) uses ``key=None``: the unkeyed
hash, so seeded demos and resumes reproduce bit for bit.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

KEY_FILE = "pseudonym.key"
KEY_BYTES = 32


class PseudonymKeyError(ValueError):
    """The site's pseudonym key file is unusable (permissions, size)."""


def pseudonym(kind: str, value: str, key: bytes | None = None) -> str:
    """Pseudonym of an identifier of ``kind`` (study, patient, series), 16 hex digits.

    ``key``: the site's secret (deployed sites); None only in simulation (see module doc).
    Used only inside the site, never sent.
    """
    message = f"medfed:{kind}:{value}".encode()
    if key is None:
        return hashlib.sha256(message).hexdigest()[:16]
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:16]


def site_key(state_dir: Path) -> bytes:
    """The site's pseudonym secret in ``state_dir``, created (0600) on first use.

    Creation is atomic (written to a private temporary file, then hard-linked into place),
    so two ClientApp processes starting at once agree on one key.

    Raises
    ------
    PseudonymKeyError
        If the file can be read or written by group or others, or is not 32 bytes.
    """
    path = Path(state_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass                        # another process made it first: use theirs
        finally:
            tmp.unlink()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PseudonymKeyError(f"pseudonym key {path} has mode {mode:04o}: group or others "
                                f"can reach it; run `chmod 600 {path}`")
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise PseudonymKeyError(f"pseudonym key {path} must hold {KEY_BYTES} bytes, "
                                f"has {len(key)}; move it away to make a new one (changes "
                                "the site's splits)")
    return key
