"""Which app releases a site approves: FAB digests and the site's allow-list.

A Flower app bundle (FAB) is identified by the SHA-256 of its bytes: that is how Flower names
it (``flwr run`` computes ``hashlib.sha256(fab_bytes).hexdigest()`` and the SuperNode stores
the FAB under that hash), and ``flwr build`` writes the zip deterministically (sorted files,
fixed timestamps), so the same release tree always has the same digest. ``medfed app digest``
prints it; the hospital's operator approves a release with ``medfed site --allow-app DIGEST``
or a line in an allow-list file. The site's runner (``medfed.deploy.runner``) recomputes the
digest from the bytes it received, never trusting the hash the coordinator announced.

An empty allow-list is legal and refuses every run: a site that approved nothing runs nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .preflight import DeployError

DIGEST = re.compile(r"^[0-9a-f]{64}$")
HINT = ("the site's operator approves a release with `medfed site --allow-app <digest>` "
        "(the digest comes from `medfed app digest`, run on the release they reviewed)")


class AppRefused(PermissionError):
    """The FAB of a run is not on this site's allow-list (nothing of it was installed or run)."""

    def __init__(self, digest: str, *, empty: bool):
        self.digest = digest
        what = ("this site approves no app yet" if empty
                else "it is not on this site's allow-list")
        super().__init__(f"app {digest[:12]} not approved by this site: {what}; {HINT}")


def fab_digest(content: bytes) -> str:
    """SHA-256 hex digest of a FAB's bytes (what Flower calls the FAB hash)."""
    return hashlib.sha256(content).hexdigest()


def parse_digest(text: str) -> str:
    """A digest as typed by an operator: 64 hex digits (case and surrounding space ignored)."""
    digest = text.strip().lower()
    if not DIGEST.match(digest):
        raise DeployError(f"--allow-app expects a 64-hex-digit SHA-256 digest from `medfed app "
                          f"digest`, got {text.strip()[:80]!r}")
    return digest


def digest_of(path: Path) -> str:
    """Digest of a ``.fab`` file, or of the FAB ``flwr build`` makes from a project folder."""
    if path.is_file():
        return fab_digest(path.read_bytes())
    if not (path / "pyproject.toml").is_file():
        raise DeployError(f"{path} is neither a .fab file nor a Flower app folder "
                          "(no pyproject.toml)")
    from flwr.cli.build import build_fab_from_disk

    return fab_digest(build_fab_from_disk(path))


@dataclass(frozen=True)
class AllowList:
    """The FAB digests a site approved.

    Parameters
    ----------
    digests : frozenset of str
        Lower-case SHA-256 hex digests; empty means every run is refused.
    """

    digests: frozenset[str] = frozenset()

    @classmethod
    def build(cls, allow_app: tuple[str, ...] | list[str] = (),
              files: tuple[Path, ...] | list[Path] = ()) -> AllowList:
        """Combine ``--allow-app`` values and allow-list files; a malformed entry raises."""
        digests = {parse_digest(d) for d in allow_app}
        for f in files:
            digests |= read_allow_file(f)
        return cls(frozenset(digests))

    def check(self, content: bytes) -> str:
        """The FAB's digest if approved; raises ``AppRefused`` otherwise."""
        digest = fab_digest(content)
        if digest not in self.digests:
            raise AppRefused(digest, empty=not self.digests)
        return digest

    def args(self) -> list[str]:
        """Command-line form (``--allow-app D`` per digest) for the launcher and runner."""
        return [a for d in sorted(self.digests) for a in ("--allow-app", d)]


def read_allow_file(path: Path) -> set[str]:
    """One digest per line; blank lines and ``#`` comments ignored; anything else is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DeployError(f"cannot read the allow-list {path}: {err.strerror}") from err
    digests = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not DIGEST.match(entry.lower()):
            raise DeployError(f"allow-list {path} line {number}: expected a 64-hex-digit "
                              f"SHA-256 digest (from `medfed app digest`), got {entry[:80]!r}")
        digests.add(entry.lower())
    return digests
