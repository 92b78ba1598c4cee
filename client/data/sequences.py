"""Map vendor series descriptions to the four canonical MRI sequences."""

from __future__ import annotations

import re

SEQUENCES: tuple[str, ...] = ("T1", "T1ce", "T2", "FLAIR")

# Order matters: FLAIR is a T2-weighted inversion recovery, and post-contrast T1 is a T1.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("FLAIR", re.compile(r"flair|dark[-_ ]?fluid|tirm")),
    ("T1ce", re.compile(r"t1.*(post|\+c|\bce\b|ce$|_ce|gd|gad|contrast|mprage_post)|t1ce")),
    ("T2", re.compile(r"t2")),
    ("T1", re.compile(r"t1")),
)


def sequence_of(*descriptions: str) -> str | None:
    """Canonical sequence name for a series, or None when no rule matches.

    Parameters
    ----------
    descriptions : str
        SeriesDescription, then ProtocolName; the first one that matches a rule wins.
    """
    for text in descriptions:
        lowered = text.lower().strip()
        if not lowered:
            continue
        for name, pattern in _RULES:
            if pattern.search(lowered):
                return name
    return None
