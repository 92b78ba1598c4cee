"""Bounded disk use for the site cache (:mod:`client.data.cache`): which versions stay, which
units and temporary files go.

At most ``keep`` versions stay (least recently used removed: a hit touches its index), and
units no kept version uses are removed with them - except units a served version of this
process still maps when read (:meth:`client.data.cache_files.UnitMaps.lazy_units`): removing
one would fail that version mid-training. Temporary files older than an hour are a crashed
writer's (a live ingest removes its own on return, whatever failed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .cache_files import INDEX, TEMP_PREFIX, UnitMaps, remove_entry

UNITS = "units"                 # per-study units, shared by the versions that hold them
STALE_TEMP_SECONDS = 3600       # a writer that crashed left its temporary file behind


def versions(root: Path) -> list[Path]:
    """The complete version directories under ``root``, least recently used first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / INDEX).is_file()
             and not p.name.startswith(TEMP_PREFIX)]
    return sorted(found, key=lambda p: (p / INDEX).stat().st_mtime_ns)


def prune(root: Path, keep: int, maps: UnitMaps, current: str | None = None) -> int:
    """Remove all but the ``keep`` most recently used versions under ``root`` (never
    ``current``), the units none of the rest uses (but not those a live served version of
    this process maps when read: ``maps.lazy_units()``), and temporary files of writers that
    died; how many entries were removed."""
    removed = 0
    entries = [p for p in versions(root) if p.name != current]
    for old in entries[:max(0, len(entries) - (keep - (current is not None)))]:
        remove_entry(old)
        removed += 1
    used: set[str] = set()
    for entry in versions(root):
        try:
            used.update(str(u["name"]) for u in json.loads((entry / INDEX).read_bytes())["units"])
        except (OSError, ValueError, KeyError, TypeError):
            continue            # a damaged version: its units go unless another uses them
    units = root / UNITS
    served = maps.lazy_units()      # a live served version of this process reads them
    for unit in units.iterdir() if units.is_dir() else ():
        if not unit.name.startswith(TEMP_PREFIX) and unit.name not in used \
                and unit not in served:
            remove_entry(unit)
            removed += 1
    now = time.time()
    for temp in [*root.glob(f"{TEMP_PREFIX}*"), *units.glob(f"{TEMP_PREFIX}*")]:
        try:
            stale = now - temp.stat().st_mtime > STALE_TEMP_SECONDS
        except OSError:                 # its writer finished (renamed it) meanwhile
            continue
        if stale:
            remove_entry(temp)
            removed += 1
    return removed


def changed_since_newest(root: Path, files: dict[str, list[int]]) -> int | None:
    """How many of ``files`` differ from (or are missing in) the newest version's listing;
    None without a readable one (counts only)."""
    entries = versions(root)
    if not entries:
        return None
    try:
        old = json.loads((entries[-1] / INDEX).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None
    return sum(old.get(k) != v for k, v in files.items()) + len(old.keys() - files.keys())
