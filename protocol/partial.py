"""Partial sharing (FedBN-style) key rules: which parameter names stay at a site. Both the
server (what it aggregates) and the site (what it keeps and never sends) apply these."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase


def local_keys(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Parameter names matched by any of the fnmatch ``patterns``."""
    patterns = list(patterns)
    return [n for n in names if any(fnmatchcase(n, p) for p in patterns)]


def unmatched_patterns(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    names = list(names)
    return [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
