"""The site cache: a site's decoded studies written once to its own disk, memory-mapped back.

Decoding a site's DICOM (and, for a 3D layout, resampling it onto the grid) is the slow part
of every read; it depends only on the files under ``dicom/``, the layout, the pseudonym key
and the reader code. So a deployed site decodes once per change of those, writes the result
under its state dir, and every later message (or a restarted site process) maps it back:
seconds instead of minutes, and pages are read only when a study is used. Labels, reports,
masks and splits are not cached: they are joined afresh from the site's CSVs on each read
(cheap), so editing ``labels.csv`` costs no decoding.

A simulation's sites use the same cache in the simulation's own temp folder, one
subfolder a site, unsynced (``durable=False``; :meth:`client.runtime.SiteDataCache.for_simulation`).

On disk (``<state-dir>/cache``, 0700; files 0600)::

    <fingerprint>/index.json    one version of the site: every file's keyed path hash with
                                its size, mtime, ctime and inode, and the units it is
                                made of (with a copy of each unit's index: a hit reads
                                this one file)
    units/<unit>                one study's decoded images in one file (arrays, then an
                                index: pseudonymous study/patient keys, channel names, each
                                array's place, its read counts; then a footer), the format
                                of :mod:`client.data.cache_files`

A *unit* is a study (all files with one StudyInstanceUID; the files no header names a study
for form one more unit, as does a NIfTI manifest site as a whole). Its name is a keyed hash of
the reader, layout and key (the *family*) and of its files' paths, sizes, mtimes, ctimes and
inodes, so units are shared by every version of the site that holds the same files. When
files change, only the units whose files changed (or that a new file joins) are decoded
again; every other study is served from its unit as it was. Read counts are kept per unit
and summed, so the served report equals a fresh decode's.

Which study a new file belongs to comes from its header. A reader whose work is per file (the
brain reader: :class:`FileReader`) reads each new file once: the same read gives its study
and its pixels, which the reading process writes to a temporary spill file; units are then
put together from the spills (in every process) and written. Other readers (the layouts'
series matching) have the new files' headers read first, then decode unit by unit.

The fingerprint is an HMAC (under the site's pseudonym key; plain SHA-256 in simulation) of
the cache format, the reader and decoder versions, the layout, and every source file's path,
size, mtime, ctime and inode (a file replaced with its size and mtime kept is not served
stale). Nothing in a name or in an index is a path, a UID or a header value: file
paths and study UIDs enter only through keyed hashes (a folder named after a patient stays on
the PACS export).

Units are mapped within this process's map budget (:class:`client.data.cache_files.UnitMaps`,
one per process: Linux allows 65,530 maps a process): past half of it, a unit is mapped
when one of its images is read and unmapped least recently used first; its file is checked
(footer, size) when the version is opened and again when it is mapped.

Every unit and version is written under a temporary name and renamed into place, so a reader
sees a complete one or none. Durability is one filesystem sync per ingest before the units
are renamed (:mod:`client.data.cache_sync`), not an fsync per file; the spills are removed
before it (never written back). That pass - make, write, sync, rename, open, index - is
:mod:`client.data.cache_build`. One that fails its checks
on opening (unparsable index, a unit file cut, extended or missing, an index pointing outside
its arrays) is removed and decoded again. At most ``keep`` versions stay (least recently used
removed), and units no kept version uses are removed with them - except units a served
version of this process still maps when read - so disk use is bounded.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import stat
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pydicom

from .cache_build import build_units, read_order
from .cache_files import (CACHE_FORMAT, INDEX, PROCESS_MAPS, TEMP_PREFIX, UNUSABLE,
                          CacheCorrupt, Decoded, UnitMaps, assemble, fsync_dir, open_unit,
                          publish, read_unit_index, remove_entry, remove_temps, write_reason,
                          write_unit)
from .cache_prune import UNITS, changed_since_newest, prune, versions
from .cache_reads import FileReader, join_spilled, read_files, reread
from .dicom import values_unvalidated
from .workers import SharedWorkers, chunks

log = logging.getLogger(__name__)

CACHE_FOLDER = "cache"          # under the site's state dir
# Bump when a reader's output for the same files changes (a new intensity rule, a fixed bug),
# so caches written by the old code are not served as if current.
READER_VERSION = 1
DECODERS = ("pydicom", "numpy", "monai", "pylibjpeg", "python-gdcm")


@functools.lru_cache(maxsize=None)
def _versions() -> dict[str, str]:
    """The decoders' installed versions (read once: the running code is what was imported)."""
    out = {}
    for name in DECODERS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = ""
    return out


class SiteCache:
    """Decoded studies of one site, kept under ``root`` (the site's ``<state-dir>/cache``).

    Parameters
    ----------
    root:
        The cache folder; created 0700. Must be on the site's own disk, never shared.
    keep:
        How many fingerprints (site versions x layouts) stay on disk; older ones are removed.
    maps:
        The memory-map budget (:class:`client.data.cache_files.UnitMaps`); default: this
        process's one, shared by every cache of the process.
    durable:
        Sync what is written before it is renamed into place (a deployed site's cache). False
        for a throw-away cache (a simulation's temp folder, ``client.runtime``): no sync, a
        crash there loses nothing the next run needs.
    make_parents:
        Make the folders above ``root`` when missing (a deployed site's state folder). False
        for a site's folder inside a simulation's temp folder: a process still serving a site
        when the simulation removed it writes nothing (the studies are served from memory)
        rather than make the removed folder again, left behind.

    After :meth:`decoded`, ``last`` says what happened: ``hit``, ``miss`` (first decode or a
    change), ``rebuilt`` (a corrupt cache was removed) or ``unwritable`` (decoded data served
    from memory, the write failed: ``write_error`` says why, type and OS text, no path),
    ``changed_files`` how many files differ from the newest previous cache (counts only),
    ``decoded_units``/``reused_units`` how many studies were decoded and how many served
    unchanged from earlier versions, and ``current`` the served cache's folder, where
    datasets keep their prepared rows (:mod:`client.data.rows`; None when unwritable).
    """

    def __init__(self, root: Path | str, *, keep: int = 4, maps: UnitMaps | None = None,
                 durable: bool = True, make_parents: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.durable = durable
        self.make_parents = make_parents
        self.maps = PROCESS_MAPS if maps is None else maps
        self.last: str | None = None
        self.write_error: str | None = None
        self.changed_files: int | None = None
        self.decoded_units = self.reused_units = 0
        self.current: Path | None = None     # the served cache's folder (prepared rows go there)

    def describe(self) -> str:
        """What the last read did, for the site log (counts and error types only)."""
        if self.last is None:
            return "unused"
        changed = "" if self.changed_files is None else f", {self.changed_files} files changed"
        units = "" if self.last == "hit" else \
            f", {self.decoded_units} studies decoded, {self.reused_units} reused"
        error = "" if self.write_error is None else f" ({self.write_error})"
        return f"{self.last}{error}{changed}{units}"
    # -- fingerprint -----------------------------------------------------------------------
    @staticmethod
    def _hash(key: bytes | None, text: str) -> str:
        if key is None:
            return hashlib.sha256(text.encode()).hexdigest()
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()

    def listing(self, root: Path, key: bytes | None, paths: list[Path] | None = None,
                ) -> dict[str, tuple[str, list[int]]]:
        """Keyed hash of each file's path under ``root`` -> ``(path, [size, mtime_ns,
        ctime_ns, inode])``; ``paths``: the files to list (default: every file under
        ``root``). Size and mtime alone miss a file replaced by one of the same size with
        its mtime kept (``cp -p``, ``rsync -a``, a restore); its inode or ctime differ (ctime
        cannot be set back), so it is decoded again. A chmod or a move to another disk also
        changes them: decoded again, never served stale."""
        root = str(root)
        if paths is None:           # os.walk on strings: a site has tens of thousands of files
            paths = [os.path.join(top, name) for top, _, names in os.walk(root)
                     for name in names]
        files = {}
        for path in sorted(map(str, paths)):
            try:
                st = os.stat(path)
            except OSError:             # removed while we walked: not part of this version
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            files[self._hash(key, f"file:{rel}")[:24]] = (
                path, [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        return files

    def manifest(self, root: Path, key: bytes | None, paths: list[Path] | None = None,
                 ) -> dict[str, list[int]]:
        """Keyed hash of each file's path under ``root`` -> ``[size, mtime_ns, ctime_ns,
        inode]`` (:meth:`listing`)."""
        return {h: sig for h, (_, sig) in self.listing(root, key, paths).items()}

    def family(self, layout, key: bytes | None, source: str = "dicom") -> str:
        """Everything a unit depends on besides its files: format, reader, decoders,
        ``source`` reader, layout, key."""
        spec = {"format": CACHE_FORMAT, "reader": READER_VERSION, "decoders": dict(_versions()),
                "source": source, "layout": None if layout is None else layout.to_dict()}
        return self._hash(key, json.dumps(spec, sort_keys=True))[:32]

    def fingerprint(self, files: dict[str, list[int]], layout, key: bytes | None,
                    source: str = "dicom") -> str:
        """The cache's name for these files read by the ``source`` reader (dicom, manifest)
        through ``layout`` under ``key``."""
        spec = {"family": self.family(layout, key, source), "files": files}
        return self._hash(key, json.dumps(spec, sort_keys=True))[:32]

    def _unit_name(self, family: str, files: dict[str, list[int]], key: bytes | None) -> str:
        return self._hash(key, json.dumps({"family": family, "files": files},
                                          sort_keys=True))[:32]

    # -- the one entry point ---------------------------------------------------------------
    def decoded(self, root: Path, layout, key: bytes | None,
                decode_files: Callable[[list[Path]], Decoded], *,
                paths: list[Path] | None = None, source: str = "dicom",
                by_study: bool = True, workers: int = 1,
                reader: FileReader | None = None,
                pool: SharedWorkers | None = None,
                meanwhile: Callable[[], None] | None = None) -> Decoded:
        """The studies and read counts of the files (``paths``, or all under ``root``) read
        through ``layout`` under ``key``: from the cache when it holds this version, else
        decoded now - only the studies whose files changed - and written.

        ``decode_files(files)``: the reader on a subset of the files (whole studies), which
        returns what it read without raising when nothing usable is among them; with
        ``workers > 1`` units are decoded in that many processes (it must pickle).
        ``reader``: the same reader per file (:class:`FileReader`), when it has that form:
        then each new file is read once, not once for its study and once to decode it.
        ``by_study``: units are studies (DICOM: by StudyInstanceUID); else one unit.
        ``pool``: decode processes the caller keeps for more work (else ``workers`` new
        ones, ended on return). ``meanwhile()``: called once the studies to decode are
        decoded, before this call's serial rest (sync, renames, opening, the index), so
        the caller can hand ``pool`` more work for that time (not called on a hit); it
        needs ``pool``: work handed to this call's own processes would be cut off when they
        end on return, before the caller could join it.
        """
        if workers < 1:
            raise ValueError(f"decode workers must be >= 1, got {workers}")
        if meanwhile is not None and pool is None:
            raise ValueError("a meanwhile hook needs the caller's pool (pool=SharedWorkers): "
                             "this call's own decode processes end on return; pass the pool "
                             "the hook hands its work to")
        listing = self.listing(root, key, paths)
        files = {h: sig for h, (_, sig) in listing.items()}
        fp = self.fingerprint(files, layout, key, source)
        folder = self.root / fp
        self.changed_files = self.current = self.write_error = None
        self.decoded_units = self.reused_units = 0
        if folder.exists():
            try:
                out = self._open_version(folder, fp)
                os.utime(folder / INDEX)              # recently used: pruned last
                self.last, self.current = "hit", folder
                return out
            except UNUSABLE:
                log.warning("site cache: a cached version failed its checks; rebuilding it")
                remove_entry(folder)
                self.last = "rebuilt"
        else:
            self.last = "miss"
            self.changed_files = changed_since_newest(self.root, files)
        with SharedWorkers(workers) if pool is None else nullcontext(pool) as pool:
            out = self._update(listing, fp, self.family(layout, key, source), key,
                               decode_files, reader if by_study else None, by_study, pool,
                               meanwhile)
        if self.last != "unwritable":
            self.prune(current=fp)
            self.current = folder
        return out

    def _update(self, listing: dict, fp: str, family: str, key: bytes | None,
                decode_files: Callable[[list[Path]], Decoded], reader: FileReader | None,
                by_study: bool, pool: SharedWorkers,
                meanwhile: Callable[[], None] | None = None) -> Decoded:
        """A new version ``fp``: its units reused where they exist, the others decoded and
        written, then its index; served from memory (``last = unwritable``) when writing
        fails. Every temporary file of this ingest (spills, units not renamed into place)
        carries its own prefix and is removed on return, whatever failed."""
        files = {h: sig for h, (_, sig) in listing.items()}
        units_dir = self.root / UNITS
        try:
            self._make_root(UNITS)
            writable = True
        except OSError as err:
            writable, self.write_error = False, write_reason(err)
        # this ingest's own: another process ingesting the same site keeps its temporaries
        prefix = f"{TEMP_PREFIX}{uuid.uuid4().hex[:16]}-"
        shares: dict[str, tuple] = {}          # file hash -> (share, arrays or refs, spill)
        try:
            groups = self._groups(listing, family, key, by_study, pool, reader,
                                  units_dir if writable else None, prefix, shares)
            units, results, todo = [], [], []
            present = set(os.listdir(units_dir)) if units_dir.is_dir() else set()
            for group, members in sorted(groups.items()):
                sigs = {h: files[h] for h in sorted(members)}
                name = self._unit_name(family, sigs, key)
                units.append({"name": name, "group": group, "files": sigs})
                try:
                    if name not in present:
                        raise CacheCorrupt("no such unit")
                    index = read_unit_index(units_dir / name, name)
                    results.append(open_unit(units_dir / name, name, index, self.maps))
                    units[-1]["index"] = index
                    self.reused_units += 1
                except UNUSABLE:
                    remove_entry(units_dir / name)          # absent, or failed its checks
                    results.append(None)
                    todo.append(len(units) - 1)
            orders = [read_order(units[i]["files"], listing) for i in todo]
            if reader is None:
                make = redo = decode_files
                jobs = sources = [[Path(listing[h][0]) for h in order] for order in orders]
            else:
                # a unit is read again from its files only if its published copy fails
                sources = [[listing[h][0] for h in order] for order in orders]
                redo = partial(reread, reader)
                # files of a changed unit that were not new (known to an older version)
                rest = [h for i in todo for h in units[i]["files"] if h not in shares]
                self._read(rest, listing, reader, pool, units_dir if writable else None,
                           prefix, shares)
                make = partial(join_spilled, reader.join)
                jobs = [[shares[h] for h in order] for order in orders]
            # a unit whose arrays the disk refused (not spilled) is made here: sent to the
            # helpers, it would travel to every one of them with the whole job
            here = {j for j, i in enumerate(todo) if reader is not None and any(
                shares[h][2] is None and shares[h][1] for h in units[i]["files"])}
            built = build_units(
                self.root, units_dir, units, results, todo,
                list(zip((units[i]["name"] for i in todo), jobs)), sources, here, make=make,
                redo=redo, writable=writable, fp=fp, family=family, files=files, pool=pool,
                prefix=prefix, maps=self.maps, error=self.write_error,
                made_one=self._made_one, meanwhile=meanwhile, durable=self.durable)
            self.write_error = built.write_error
            if not built.written:
                self.last = "unwritable"
            return built.decoded
        finally:
            remove_temps(units_dir, prefix)

    def _made_one(self) -> None:
        self.decoded_units += 1         # as each is complete: a failing pass counted them

    def _groups(self, listing: dict, family: str, key: bytes | None, by_study: bool,
                pool: SharedWorkers, reader: FileReader | None, spill_dir: Path | None,
                prefix: str, shares: dict) -> dict[str, list[str]]:
        """File hashes by unit: by study (a keyed hash of its StudyInstanceUID), taken for an
        unchanged file from the newest version of this family that lists it, else from the
        file's header - read alone, or with ``reader`` read whole once (its share kept in
        ``shares``); one unit of everything when not ``by_study``."""
        if not by_study:
            return {"all": list(listing)}
        known: dict[str, tuple[list[int], str]] = {}
        for entry in reversed(self.entries()):                # newest first
            try:
                index = json.loads((entry / INDEX).read_bytes())
                if index.get("family") != family:
                    continue
                for unit in index["units"]:
                    for h, sig in unit["files"].items():
                        known.setdefault(h, (sig, unit["group"]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        groups: dict[str, list[str]] = {}
        unknown = []
        for h, (path, sig) in listing.items():
            hit = known.get(h)
            if hit is not None and hit[0] == sig:
                groups.setdefault(hit[1], []).append(h)
            else:
                unknown.append(h)
        if reader is None:
            parts = pool.map(_study_uids, chunks([listing[h][0] for h in unknown],
                                                 pool.workers))
            uids = [uid for part in parts for uid in part]
        else:
            uids = self._read(unknown, listing, reader, pool, spill_dir, prefix, shares)
        for h, uid in zip(unknown, uids):
            group = self._hash(key, f"study:{uid}")[:24] if uid else "none"
            groups.setdefault(group, []).append(h)
        return groups

    @staticmethod
    def _read(hashes: list[str], listing: dict, reader: FileReader, pool: SharedWorkers,
              spill_dir: Path | None, prefix: str, shares: dict) -> list[str]:
        """Read these files through ``reader`` in ``pool`` (their arrays spilled to disk by
        the process that read them, under the ingest's ``prefix``); their shares into
        ``shares``; their study UIDs."""
        parts = pool.map(partial(read_files, reader.read, spill_dir, prefix),
                         chunks([listing[h][0] for h in hashes], pool.workers))
        uids, it = [], iter(hashes)
        for spill, reads in parts:
            for (uid, share, arrays), h in zip(reads, it):
                shares[h] = (share, arrays, spill)
                uids.append(uid)
        return uids

    def _open_version(self, folder: Path, fp: str) -> Decoded:
        """A version's studies from its units; CacheCorrupt if any part fails its checks
        (a failing unit is removed, so it is decoded again)."""
        try:
            index = json.loads((folder / INDEX).read_bytes())
        except (OSError, ValueError) as err:
            raise CacheCorrupt("unreadable index") from err
        if index.get("format") != CACHE_FORMAT or index.get("fingerprint") != fp:
            raise CacheCorrupt("index of another format or fingerprint")
        results = []
        for unit in index["units"]:
            name, copy = str(unit["name"]), unit.get("index")
            if not isinstance(copy, dict):
                raise CacheCorrupt("version without its units' indexes")
            try:
                results.append(open_unit(self.root / UNITS / name, name, copy, self.maps))
            except UNUSABLE:
                remove_entry(self.root / UNITS / name)
                raise
        return assemble(results)

    def side_entry(self, source: str, root: Path, paths: list[Path], key: bytes | None,
                   decode: Callable[[], Decoded]) -> Decoded:
        """Data read from other files than the images (the lesion masks), kept inside the
        served cache's folder (pruned with it, not counted against ``keep``) under a name
        of its own fingerprint; same format, checks and atomic write. Call after
        :meth:`decoded`; without a written cache it is just ``decode()``."""
        if self.current is None:
            return decode()
        name = f"{source}-{self.fingerprint(self.manifest(root, key, paths), None, key, source)}"
        path = self.current / name
        if path.exists():
            try:
                return open_unit(path, name)
            except UNUSABLE:
                remove_entry(path)
        out = decode()
        try:
            temp, index = write_unit(self.current, name, *out, durable=self.durable)
            try:
                publish(temp, path)
                if self.durable:
                    fsync_dir(self.current)
            finally:
                if temp.exists():
                    temp.unlink()
            out = open_unit(path, name, index)
        except UNUSABLE:
            return out
        for old in self.current.glob(f"{source}-*"):      # an older version of this data
            if old.name != name:
                remove_entry(old)
        return out

    # -- housekeeping ----------------------------------------------------------------------
    def _make_root(self, sub: str | None = None) -> None:
        self.root.mkdir(parents=self.make_parents, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        if sub is not None:
            (self.root / sub).mkdir(exist_ok=True, mode=0o700)
            os.chmod(self.root / sub, 0o700)

    def entries(self) -> list[Path]:
        """Complete cache directories, least recently used first."""
        return versions(self.root)

    def prune(self, current: str | None = None) -> int:
        """Remove all but the ``keep`` most recently used caches (never ``current``), the
        units none of the rest uses (but not those a live served version of this process
        maps when read), and temporary files of writers that died; how many entries were
        removed (:func:`client.data.cache_prune.prune`)."""
        return prune(self.root, self.keep, self.maps, current)


@values_unvalidated()       # no header value (or path) in a log, in the helper too
def _study_uids(paths: list[str]) -> list[str]:
    """:func:`_study_uid` of each path (one task of the header pass)."""
    return [_study_uid(path) for path in paths]


def _study_uid(path: str) -> str:
    """The file's StudyInstanceUID from its header ("" when unreadable or absent); stays
    at the site: only a keyed hash of it is kept."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        return str(ds.get("StudyInstanceUID", "") or "").strip()
    except Exception:  # noqa: BLE001 - not DICOM or unreadable: the reader counts it
        return ""
