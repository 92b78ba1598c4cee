"""The site cache: a site's decoded studies written once to its own disk, memory-mapped back.

Decoding a site's DICOM (and, for a 3D layout, resampling it onto the grid) is the slow part
of every read; it depends only on the files under ``dicom/``, the layout, the pseudonym key
and the reader code. So a deployed site decodes once per change of those, writes the result
under its state dir, and every later message (or a restarted site process) opens it with
``np.load(mmap_mode="r")``: seconds instead of minutes, and pages are read only when a study
is used. Labels, reports, masks and splits are not cached: they are joined afresh from the
site's CSVs on each read (cheap), so editing ``labels.csv`` costs no decoding.

On disk (``<state-dir>/cache``, 0700; files 0600)::

    <fingerprint>/index.json    pseudonymous study/patient keys, channel names, the read
                                counts, each array's place; keyed hashes of the file paths
    <fingerprint>/g000.npy ...  one array per (dtype, shape) group: [N, *shape]

The fingerprint is an HMAC (under the site's pseudonym key; plain SHA-256 in simulation) of
the cache format, the reader and decoder versions, the layout, and every source file's path,
size and mtime (DICOM: every file under ``dicom/``; a NIfTI manifest site: the manifest and
the files it lists). Nothing in a name or in the index is a path, a UID or a header value: file
paths enter only through that keyed hash (a folder named after a patient stays on the PACS
export). A changed file, layout, key or reader gives a new fingerprint: the whole site is
decoded again (not only the changed studies: series matching and volume assembly span files);
the index records per-file hashes so the site log can say how many files changed.

A directory is written under a temporary name and renamed into place, so a reader sees a
complete cache or none; a cache that fails its checks on opening (unparsable index, a group
file missing, truncated or of another shape) is removed and rebuilt. At most ``keep``
fingerprints stay (least recently used removed), so disk use is bounded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CACHE_FOLDER = "cache"          # under the site's state dir
CACHE_FORMAT = 1
# Bump when a reader's output for the same files changes (a new intensity rule, a fixed bug),
# so caches written by the old code are not served as if current.
READER_VERSION = 1
INDEX = "index.json"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600       # a writer that crashed left its temporary dir behind
DECODERS = ("pydicom", "numpy", "monai", "pylibjpeg", "python-gdcm")

Decoded = tuple[list, object]     # (list[Study], IngestReport) as the readers return them


class CacheCorrupt(ValueError):
    """A cache directory failed its checks on opening (it is then rebuilt)."""


# What opening a damaged cache can raise (a malformed index: missing keys, wrong types).
UNUSABLE = (CacheCorrupt, OSError, ValueError, KeyError, TypeError, IndexError)


def _versions() -> dict[str, str]:
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

    After :meth:`decoded`, ``last`` says what happened: ``hit``, ``miss`` (first decode or a
    change), ``rebuilt`` (a corrupt cache was removed) or ``unwritable`` (decoded data served
    from memory, the write failed), ``changed_files`` how many files differ from the newest
    previous cache (counts only), and ``current`` the served cache's folder, where datasets
    keep their prepared rows (:mod:`client.data.rows`; None when unwritable).
    """

    def __init__(self, root: Path | str, *, keep: int = 4):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.last: str | None = None
        self.changed_files: int | None = None
        self.current: Path | None = None     # the served cache's folder (prepared rows go there)

    def describe(self) -> str:
        """What the last read did, for the site log (counts only)."""
        if self.last is None:
            return "unused"
        changed = "" if self.changed_files is None else f", {self.changed_files} files changed"
        return f"{self.last}{changed}"

    # -- fingerprint -----------------------------------------------------------------------
    @staticmethod
    def _hash(key: bytes | None, text: str) -> str:
        if key is None:
            return hashlib.sha256(text.encode()).hexdigest()
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()

    def manifest(self, root: Path, key: bytes | None, paths: list[Path] | None = None,
                 ) -> dict[str, list[int]]:
        """Keyed hash of each file's path under ``root`` -> ``[size, mtime_ns]``; ``paths``:
        the files to list (default: every file under ``root``)."""
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
            files[self._hash(key, f"file:{rel}")[:24]] = [st.st_size, st.st_mtime_ns]
        return files

    def fingerprint(self, files: dict[str, list[int]], layout, key: bytes | None,
                    source: str = "dicom") -> str:
        """The cache's name for these files read by the ``source`` reader (dicom, manifest)
        through ``layout`` under ``key``."""
        spec = {"format": CACHE_FORMAT, "reader": READER_VERSION, "decoders": _versions(),
                "source": source,
                "layout": None if layout is None else layout.to_dict(), "files": files}
        return self._hash(key, json.dumps(spec, sort_keys=True))[:32]

    # -- the one entry point ---------------------------------------------------------------
    def decoded(self, root: Path, layout, key: bytes | None, decode: Callable[[], Decoded],
                *, paths: list[Path] | None = None, source: str = "dicom") -> Decoded:
        """``decode()``'s studies and report: from the cache when the files (``paths``, or
        all under ``root``), ``layout``, ``key`` and ``source`` reader are those it was
        written for, else decoded now and written."""
        files = self.manifest(root, key, paths)
        fp = self.fingerprint(files, layout, key, source)
        folder = self.root / fp
        self.changed_files = self.current = None
        if folder.exists():
            try:
                out = _open(folder, fp)
                os.utime(folder / INDEX)              # recently used: pruned last
                self.last, self.current = "hit", folder
                return out
            except UNUSABLE:
                log.warning("site cache: a cached version failed its checks; rebuilding it")
                _remove(folder)
                self.last = "rebuilt"
        else:
            self.last = "miss"
            self.changed_files = self._changed_since_newest(files)
        studies, report = decode()
        try:
            self._make_root()
            _write(self.root, fp, studies, report, files)
            out = _open(folder, fp)       # serve the mapped copy: the decoded arrays go
        except UNUSABLE:                  # disk full, read-only, a racing writer's bad copy
            log.warning("site cache: could not write the decoded studies; serving them "
                        "from memory this time")
            self.last = "unwritable"
            return studies, report
        self.prune(current=fp)
        self.current = folder
        return out

    def side_entry(self, source: str, root: Path, paths: list[Path], key: bytes | None,
                   decode: Callable[[], Decoded]) -> Decoded:
        """Data read from other files than the images (the lesion masks), kept inside the
        served cache's folder (pruned with it, not counted against ``keep``) under a name
        of its own fingerprint; same format, checks and atomic write. Call after
        :meth:`decoded`; without a written cache it is just ``decode()``."""
        if self.current is None:
            return decode()
        name = f"{source}-{self.fingerprint(self.manifest(root, key, paths), None, key, source)}"
        folder = self.current / name
        if folder.exists():
            try:
                return _open(folder, name)
            except UNUSABLE:
                _remove(folder)
        out = decode()
        try:
            _write(self.current, name, *out, files={})
            out = _open(folder, name)
        except UNUSABLE:
            return out
        for old in self.current.glob(f"{source}-*"):      # an older version of this data
            if old.name != name:
                _remove(old)
        return out

    # -- housekeeping ----------------------------------------------------------------------
    def _make_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    def entries(self) -> list[Path]:
        """Complete cache directories, least recently used first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and (p / INDEX).is_file()
                 and not p.name.startswith(TEMP_PREFIX)]
        return sorted(found, key=lambda p: (p / INDEX).stat().st_mtime_ns)

    def prune(self, current: str | None = None) -> int:
        """Remove all but the ``keep`` most recently used caches (never ``current``) and
        temporary dirs of writers that died; how many directories were removed."""
        removed = 0
        entries = [p for p in self.entries() if p.name != current]
        for old in entries[:max(0, len(entries) - (self.keep - (current is not None)))]:
            _remove(old)
            removed += 1
        now = time.time()
        for temp in self.root.glob(f"{TEMP_PREFIX}*"):
            try:
                stale = now - temp.stat().st_mtime > STALE_TEMP_SECONDS
            except OSError:                 # its writer finished (renamed it) meanwhile
                continue
            if stale:
                _remove(temp)
                removed += 1
        return removed

    def _changed_since_newest(self, files: dict[str, list[int]]) -> int | None:
        entries = self.entries()
        if not entries:
            return None
        try:
            old = json.loads((entries[-1] / INDEX).read_text())["files"]
        except (OSError, ValueError, KeyError):
            return None
        return sum(old.get(k) != v for k, v in files.items()) + len(old.keys() - files.keys())


def _remove(folder: Path) -> None:
    """Remove a cache directory (renamed away first, so no reader sees it half deleted)."""
    trash = folder.with_name(f"{TEMP_PREFIX}{folder.name}-{os.getpid()}-trash")
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _write(root: Path, fp: str, studies: list, report, files: dict) -> None:
    """Write the studies' arrays and index into a temporary dir, then rename it to ``fp``."""
    temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))     # 0700
    try:
        groups: dict[tuple[str, tuple[int, ...]], list[np.ndarray]] = {}
        ids: dict[tuple[str, tuple[int, ...]], int] = {}
        index_studies = []
        for study in studies:
            places = {}
            for channel, array in study.images.items():
                array = np.ascontiguousarray(array)
                group = (array.dtype.str, array.shape)
                if group not in groups:
                    groups[group] = []
                    ids[group] = len(ids)
                places[channel] = [ids[group], len(groups[group])]
                groups[group].append(array)
            index_studies.append({"key": study.key, "patient_key": study.patient_key,
                                  "images": places})
        index_groups = []
        for g, ((dtype, shape), rows) in enumerate(groups.items()):
            name = f"g{g:03d}.npy"
            _write_npy(temp / name, np.dtype(dtype), (len(rows), *shape), rows)
            index_groups.append({"file": name, "dtype": dtype, "shape": [len(rows), *shape]})
        index = {"format": CACHE_FORMAT, "fingerprint": fp, "groups": index_groups,
                 "studies": index_studies, "report": _report_dict(report), "files": files}
        _write_bytes(temp / INDEX, json.dumps(index).encode())
        _fsync_dir(temp)
        try:
            os.rename(temp, root / fp)
        except OSError:
            if not (root / fp).is_dir():          # not a concurrent writer that won: real
                raise
        _fsync_dir(root)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def _write_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...], rows) -> None:
    """A ``.npy`` of ``shape`` streamed row by row (no stacked copy in memory), mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": shape})
        for row in rows:
            f.write(row.astype(dtype, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _report_dict(report) -> dict:
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in report.__dict__.items()}


def _open(folder: Path, fp: str) -> Decoded:
    """The cached studies (images memory-mapped, read-only) and report; CacheCorrupt if the
    directory is not a complete cache of ``fp``."""
    from .site import IngestReport, Study

    try:
        index = json.loads((folder / INDEX).read_bytes())
    except (OSError, ValueError) as err:
        raise CacheCorrupt("unreadable index") from err
    if index.get("format") != CACHE_FORMAT or index.get("fingerprint") != fp:
        raise CacheCorrupt("index of another format or fingerprint")
    arrays = []
    for group in index["groups"]:
        try:
            array = np.load(folder / group["file"], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:           # missing, truncated header or data
            raise CacheCorrupt("unreadable group") from err
        if array.dtype.str != group["dtype"] or list(array.shape) != group["shape"]:
            raise CacheCorrupt("group of another dtype or shape")
        if (folder / group["file"]).stat().st_size != array.offset + array.nbytes:
            raise CacheCorrupt("group file of the wrong size")
        arrays.append(array)
    report = IngestReport(**{k: Counter(v) if isinstance(v, dict) else v
                             for k, v in index["report"].items()})
    studies = []
    for entry in index["studies"]:
        try:
            images = {ch: arrays[g][row] for ch, (g, row) in entry["images"].items()}
        except (IndexError, ValueError, TypeError) as err:
            raise CacheCorrupt("index points outside its groups") from err
        studies.append(Study(entry["key"], entry["patient_key"], images))
    return studies, report
