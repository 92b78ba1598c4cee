"""The unit-building pass of the site cache (:mod:`client.data.cache`): the units an ingest
must decode are made in the decode processes, each written (unsynced) by the process that
made it under the ingest's temporary prefix; then one filesystem sync, then every unit is
renamed into place and opened back memory-mapped, then the version's index is written.

Order matters twice. The sync comes before any rename, so a unit found under its name is
complete on disk. The ingest's spill files (the pixels of the one read pass,
:mod:`client.data.cache_reads`) are removed *before* that sync: every unit has been made
from them by then, and a temporary file removed before the kernel wrote it back costs no
disk write and no block freed (on a ``discard`` mount each freed block is trimmed: removing
the spills after the sync was 6-9% of a first ingest). A unit whose published copy then
fails its checks (a racing writer's bad copy) is read again from its source files, not from
a spill.

Everything after the units are made (spill removal, sync, renames, opening, the index) is
this process's alone: the caller's ``meanwhile()`` hands the helpers other work for that
time (the site's masks and reports, :class:`client.data.site.SideReads`), so they do not sit
idle through it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .cache_files import (UNUSABLE, Decoded, UnitMaps, assemble, fsync_dir, open_unit,
                          publish, remove_temps, sync_filesystem, write_reason, write_unit,
                          write_version)
from .cache_reads import SPILL
from .workers import SharedWorkers

log = logging.getLogger(__name__)


@dataclass
class Built:
    """What a unit-building pass did: the version's studies and read counts, whether its
    units and index are on disk, and why not (type and OS text); the units it made are
    counted as each is complete (``made_one``)."""

    decoded: Decoded
    written: bool
    write_error: str | None


def read_order(hashes, listing: dict) -> list[str]:
    """File hashes in the order a fresh decode reads their files: by ``Path`` (part by
    part), as :func:`client.data.dicom.read_directory` sorts; as strings ``ser-2/1.dcm``
    would come before ``ser/1.dcm``, and slices of equal instance number would swap."""
    return sorted(hashes, key=lambda h: Path(listing[h][0]))


def build_units(root: Path, units_dir: Path, units: list[dict], results: list,
                todo: list[int], jobs: list[tuple[str, object]], sources: list[list],
                here: set[int], *, make: Callable, redo: Callable[[list], Decoded],
                writable: bool, fp: str, family: str, files: dict, pool: SharedWorkers,
                prefix: str, maps: UnitMaps, error: str | None = None,
                made_one: Callable[[], None] | None = None,
                meanwhile: Callable[[], None] | None = None, durable: bool = True) -> Built:
    """Make the ``todo`` units (``jobs[j]``: a unit's name and what ``make`` takes) in
    ``pool`` - each process writes the units it makes, only their names and indexes come
    back - except the jobs in ``here`` (their files' arrays in memory: sent to the helpers
    they would travel to every one), made in this process. Then the spills go, one sync
    makes the units durable before any is renamed into place, and the version's index
    ``fp`` is written under ``root``. ``redo(sources[j])``: unit ``j`` read again from its
    files. ``results``: the version's units, the reused ones already open. ``error``: why
    the cache is not ``writable`` already, when it is not. ``made_one()``: called as each
    unit is complete (a pass failing part-way has counted what it made). ``meanwhile()``:
    called once every unit is made, before the serial rest (sync, renames, opening, the
    index): the caller hands the helpers other work there (:meth:`SharedWorkers.submit`).
    ``durable=False`` (a throw-away cache: the simulation's temp folder): no sync at all."""
    build = partial(_make_unit, make, units_dir if writable else None, prefix)
    remote = [j for j in range(len(jobs)) if j not in here]
    made = itertools.chain(
        ((remote[k], out) for k, out in pool.imap(build, [jobs[j] for j in remote])),
        ((j, build(jobs[j])) for j in sorted(here)))
    pending = []
    for j, (temp, index, out, why) in made:
        i = todo[j]
        if made_one is not None:
            made_one()
        if temp is None:               # not written (disk full, read-only): kept in memory
            writable = False
            error = error or why
            results[i] = out
        else:
            units[i]["index"] = index
            pending.append((i, j, Path(temp)))
    if meanwhile is not None:
        meanwhile()
    # every unit is made: the spills are needed no more, and gone before the sync they are
    # never written back (see the module docstring)
    remove_temps(units_dir, prefix + SPILL)
    pending.sort()
    published = set()
    if pending and writable:
        try:
            if durable:
                sync_filesystem(units_dir)
            for i, _, temp in pending:
                publish(temp, units_dir / units[i]["name"])
                published.add(i)
            if durable:
                fsync_dir(units_dir)
        except OSError as err:
            writable, error = False, write_reason(err)
    for i, j, temp in pending:
        name, index = units[i]["name"], units[i]["index"]
        try:
            if i in published:
                results[i] = open_unit(units_dir / name, name, index, maps)
            else:                      # mapped now (or read): its name goes next
                results[i] = open_unit(temp, name, index, maps, transient=True)
        except UNUSABLE:               # a racing writer's bad copy: read its files again
            writable = False
            error = error or "CacheCorrupt: a unit failed its checks"
            results[i] = redo(sources[j])
        if i not in published and temp.exists():    # maps outlive the name
            temp.unlink()
    if writable:
        try:
            write_version(root, fp, family, files, units, durable=durable)
        except OSError as err:
            writable, error = False, write_reason(err)
    if not writable:
        log.warning("site cache: could not write the decoded studies (%s); serving them "
                    "from memory this time", error or "unknown error")
    return Built(assemble(results), writable, error)


def _make_unit(make: Callable[[object], Decoded], units_dir: Path | None, prefix: str,
               job: tuple[str, object]) -> tuple[str | None, dict | None, Decoded | None,
                                                 str | None]:
    """Make one unit (``make(payload)``) and write it under a temporary name (``prefix``:
    the ingest's) in ``units_dir`` (in whichever process made it): ``(its path, its index,
    None, None)``; when it could not be written (or ``units_dir`` is None) ``(None, None,
    the unit, why)`` - the reason (type and OS text, no path) goes back to the caller."""
    name, payload = job
    out = make(payload)
    if units_dir is None:
        return None, None, out, None
    try:
        temp, index = write_unit(units_dir, name, *out, durable=False, prefix=prefix)
        return str(temp), index, None, None
    except UNUSABLE as err:             # disk full, read-only: served from memory
        return None, None, out, write_reason(err)
