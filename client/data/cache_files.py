"""The site cache's on-disk format (:mod:`client.data.cache`): one file per unit - its arrays,
then its index, then a footer - written under a temporary name and renamed into place,
checked when opened (a failing one raises :class:`CacheCorrupt`), memory-mapped back within
the process's map budget (:class:`UnitMaps`).

A unit file::

    [group 0 rows][pad to 64][group 1 rows]...   the arrays, row-major, at offsets that
                                                  follow from the index alone (_data_layout)
    index JSON                                    studies, groups, read counts
    [index length: 8 bytes LE][MAGIC: 8 bytes]    footer: a cut or extended file fails it

One file (not a directory of ``.npy`` files and an index) because a site's first ingest
writes thousands of units: each file created, written and renamed costs more than the bytes
in it. One map per unit, whatever its number of image shapes.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .cache_sync import fsync_dir, sync_filesystem

__all__ = ["CACHE_FORMAT", "INDEX", "TEMP_PREFIX", "MAX_MAPS", "CacheCorrupt", "UNUSABLE",
           "UnitMaps", "PROCESS_MAPS", "write_unit", "open_unit", "publish", "remove_entry",
           "assemble", "write_version", "image_nbytes", "fsync_dir", "sync_filesystem",
           "write_reason", "remove_temps"]

CACHE_FORMAT = 3                  # 3: one file per unit (2: a directory of .npy files)
INDEX = "index.json"              # a version's index (versions stay directories)
TEMP_PREFIX = ".tmp-"
MAGIC = b"MFUNIT03"
FOOTER = 16
ALIGN = 64                        # each group starts on a 64-byte boundary (SIMD loads)

Decoded = tuple[list, object]     # (list[Study], IngestReport) as the readers return them

# Memory maps this process may hold of cache files. Linux allows a process 65,530 maps
# (vm.max_map_count) for everything it maps: a site of 60,000 studies mapped every unit and
# failed, and two caches (or two served versions) each within a budget of their own could
# together pass it, hence one budget per process (PROCESS_MAPS).
MAX_MAPS = 32768


class CacheCorrupt(ValueError):
    """A cache file or directory failed its checks on opening (it is then rebuilt)."""


# What opening a damaged cache can raise (a malformed index: missing keys, wrong types).
UNUSABLE = (CacheCorrupt, OSError, ValueError, KeyError, TypeError, IndexError)


def write_reason(err: BaseException) -> str:
    """Why a write failed, safe to log and to send across processes: the exception type and
    the OS's text for its errno (an OSError's str names the file: a path stays out)."""
    if isinstance(err, OSError):
        return f"{type(err).__name__}: {err.strerror or 'error ' + str(err.errno)}"
    return type(err).__name__           # its message may quote a header value or a path


def remove_entry(path: Path) -> None:
    """Remove a unit file or a version directory (a directory is renamed away first, so no
    reader sees it half deleted)."""
    try:
        if not path.is_dir():
            path.unlink()
            return
        trash = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}-trash")
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def remove_temps(folder: Path, prefix: str) -> int:
    """Remove the files under ``folder`` whose names start with ``prefix`` (one ingest's
    temporary files: spills, units not renamed into place); how many were removed."""
    try:
        entries = [e.path for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:                     # no such folder: nothing was written
        return 0
    removed = 0
    for path in entries:
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            continue
    return removed


def assemble(results: list[Decoded]) -> Decoded:
    """The units' studies in study-key order (a whole-site decode's order) and the sum of
    their read counts."""
    from .site import IngestReport

    report = IngestReport()
    studies = []
    for unit_studies, unit_report in results:
        studies += unit_studies
        for name, value in unit_report.__dict__.items():
            if isinstance(value, Counter):
                getattr(report, name).update(value)
            else:
                setattr(report, name, getattr(report, name) + value)
    return sorted(studies, key=lambda s: s.key), report


def write_version(root: Path, fp: str, family: str, files: dict, units: list[dict], *,
                  durable: bool = True) -> None:
    """A version's index (its files and units), written under a temporary name and renamed;
    durable on return (unless not ``durable``: a throw-away cache, no fsync)."""
    temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))     # 0700
    try:
        index = {"format": CACHE_FORMAT, "fingerprint": fp, "family": family, "files": files,
                 "units": units}
        _write_bytes(temp / INDEX, json.dumps(index).encode(), durable=durable)
        if durable:
            fsync_dir(temp)
        publish(temp, root / fp)
        if durable:
            fsync_dir(root)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def publish(temp: Path, final: Path) -> None:
    """Rename a written temporary file or dir into place (a concurrent writer's copy of the
    same content may be there: units are named by what they hold)."""
    try:
        os.rename(temp, final)
    except OSError:
        if not final.exists():          # not a concurrent writer that won: real
            raise


def _write_bytes(path: Path, data: bytes, durable: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())


def _data_layout(groups: list[dict]) -> tuple[list[int], int]:
    """Each group's byte offset in a unit file and the bytes of all the arrays: the one
    place the writer and every check take them from."""
    offsets, end = [], 0
    for group in groups:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + int(np.prod(group["shape"], dtype=np.int64)) * np.dtype(group["dtype"]).itemsize
    return offsets, end


def write_unit(folder: Path, name: str, studies: list, report, *,
               durable: bool, prefix: str = TEMP_PREFIX) -> tuple[Path, dict]:
    """The studies' arrays and index in a new temporary file under ``folder`` (mode 0600),
    named ``prefix`` + ``name`` + this process's id: ``(its path, its index)``. ``durable``:
    fsynced (else the caller syncs before it publishes it). ``prefix``: the ingest's own
    (it removes what is left under it when it fails), starting with ``TEMP_PREFIX``."""
    rows: dict[tuple[str, tuple[int, ...]], list[np.ndarray]] = {}
    ids: dict[tuple[str, tuple[int, ...]], int] = {}
    index_studies = []
    for study in studies:
        places = {}
        for channel, array in study.images.items():
            array = np.ascontiguousarray(array)
            group = (array.dtype.str, array.shape)
            if group not in rows:
                rows[group], ids[group] = [], len(ids)
            places[channel] = [ids[group], len(rows[group])]
            rows[group].append(array)
        index_studies.append({"key": study.key, "patient_key": study.patient_key,
                              "images": places})
    groups = [{"dtype": dtype, "shape": [len(arrays), *shape]}
              for (dtype, shape), arrays in rows.items()]
    index = {"format": CACHE_FORMAT, "fingerprint": name, "groups": groups,
             "studies": index_studies, "report": _report_dict(report)}
    head = json.dumps(index).encode()
    offsets, end = _data_layout(groups)
    fd, temp = _create_temp(folder, name, prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            for offset, arrays in zip(offsets, rows.values()):
                f.write(b"\0" * (offset - f.tell()))
                for array in arrays:
                    f.write(array.data if array.flags.c_contiguous else array.tobytes())
            assert f.tell() == end, "unit arrays of another size than their layout"
            f.write(head + _footer(head))
            f.flush()
            if durable:
                os.fsync(f.fileno())
    except BaseException:
        os.unlink(temp)
        raise
    return Path(temp), index


def _create_temp(folder: Path, name: str, prefix: str) -> tuple[int, str]:
    """A new file (0600) for unit ``name``, under a temporary name of this process (a unit
    is made once per ingest; ``mkstemp``'s random names cost more than the unit's write)."""
    temp = os.path.join(folder, f"{prefix}{name}-{os.getpid()}")
    try:
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), temp
    except FileExistsError:             # a crashed writer of the same pid left it
        return tempfile.mkstemp(prefix=f"{prefix}{name}-", dir=folder)


def _footer(head: bytes) -> bytes:
    """The unit file's last bytes: its index's length and the format's magic."""
    return len(head).to_bytes(8, "little") + MAGIC


def _report_dict(report) -> dict:
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in report.__dict__.items()}


def _read_footer(path: Path) -> tuple[int, int, int]:
    """``(file size, index length, index offset)`` from the unit file's footer."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < FOOTER:
                raise CacheCorrupt("unit file shorter than its footer")
            f.seek(size - FOOTER)
            footer = f.read(FOOTER)
    except OSError as err:
        raise CacheCorrupt("unreadable unit") from err
    if footer[8:] != MAGIC:
        raise CacheCorrupt("unit file without its footer (cut or extended)")
    length = int.from_bytes(footer[:8], "little")
    if length > size - FOOTER:
        raise CacheCorrupt("unit index longer than its file")
    return size, length, size - FOOTER - length


def read_unit_index(path: Path, name: str) -> dict:
    """The unit file's own index; CacheCorrupt if unreadable or not ``name``'s."""
    _, length, start = _read_footer(path)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            index = json.loads(f.read(length))
    except (OSError, ValueError) as err:
        raise CacheCorrupt("unreadable unit index") from err
    _check_index(index, name)
    return index


def _check_index(index, name: str) -> None:
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT \
            or index.get("fingerprint") != name:
        raise CacheCorrupt("index of another format or unit")


def _map_data(path: Path, data_bytes: int) -> np.ndarray:
    """The unit file's arrays, mapped read-only as bytes: a plain array over an ``mmap``
    (an ``np.memmap`` resolves its path and makes every view a memmap with its attributes
    copied, 0.2 ms a unit: a third of opening a first ingest's units). The map lives as long
    as any array over it (their base)."""
    try:
        with open(path, "rb") as f:
            region = mmap.mmap(f.fileno(), data_bytes, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as err:
        raise CacheCorrupt("unreadable unit") from err
    return np.frombuffer(region, dtype=np.uint8)


def _read_data(path: Path, data_bytes: int) -> np.ndarray:
    """The unit file's arrays read into memory as bytes (read-only, as a map would be)."""
    try:
        data = np.fromfile(path, dtype=np.uint8, count=data_bytes)
    except (OSError, ValueError) as err:
        raise CacheCorrupt("unreadable unit") from err
    if data.size != data_bytes:
        raise CacheCorrupt("unit file cut short")
    data.flags.writeable = False
    return data


class UnitMaps:
    """The memory maps this process holds of site-cache unit files, at most ``max_maps`` at
    once, and the units its served versions will still read.

    The first half of the budget maps units at once and for good (a small site's all are:
    no lookup per image); a slot comes back when nothing holds that unit's arrays any more
    (an old served version dropped). Past it, units are mapped when an image of theirs is
    read, least recently used unmapped first (:class:`MappedImages`). Shared by every
    :class:`client.data.cache.SiteCache` of the process (:data:`PROCESS_MAPS`): a budget
    per cache let two caches, or two served versions, pass the kernel's limit together.

    ``lazy_units()`` names the unit files a live served version maps only when read: the
    cache's prune keeps them (removing one would fail that version mid-training).
    ``mapped``: maps made so far (counts only).
    """

    def __init__(self, max_maps: int = MAX_MAPS):
        if max_maps < 2:
            raise ValueError(f"max_maps must be >= 2, got {max_maps}")
        self.pinned_max = max_maps // 2
        self.recent_max = max_maps - max_maps // 2
        self.pinned = 0
        self._recent: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._lazy: weakref.WeakSet[LazyUnit] = weakref.WeakSet()
        self.mapped = 0

    def pin(self, path: Path, data_bytes: int) -> np.ndarray | None:
        """The unit's arrays mapped now and for good while anything holds them, or None when
        the pinned half of the budget is taken."""
        if self.pinned >= self.pinned_max:
            return None
        data = _map_data(path, data_bytes)
        self.pinned += 1
        self.mapped += 1
        weakref.finalize(data.base, self._unpin)     # the map's buffer: every image holds it
        return data

    def _unpin(self) -> None:
        self.pinned -= 1

    def lazy(self, unit: LazyUnit) -> None:
        """Register a unit a served version maps when read (kept by prune while it lives)."""
        self._lazy.add(unit)

    def lazy_units(self) -> set[Path]:
        """The unit files live served versions of this process map when read."""
        return {unit.path for unit in list(self._lazy)}

    def data(self, unit: LazyUnit) -> np.ndarray:
        """The lazy unit's arrays, mapped now if it is not among the recent ones."""
        data = self._recent.get(unit.path)
        if data is None:
            if _read_footer(unit.path)[0] != unit.size:
                raise CacheCorrupt("unit file changed since it was opened")
            data = _map_data(unit.path, unit.data_bytes)
            self.mapped += 1
            self._recent[unit.path] = data
            while len(self._recent) > self.recent_max:
                self._recent.popitem(last=False)       # unmapped once no image holds it
        self._recent.move_to_end(unit.path)
        return data


# This process's one map budget (the owner of every cache map the process makes): a
# process-wide limit needs one counter per process. SiteCache uses it unless given another
# (tests give small ones).
PROCESS_MAPS = UnitMaps(MAX_MAPS)


class LazyUnit:
    """A unit file a served version maps only when one of its images is read."""

    def __init__(self, path: Path, size: int, groups: list[dict], offsets: list[int],
                 data_bytes: int, maps: UnitMaps):
        self.path, self.size, self.groups, self.offsets = path, size, groups, offsets
        self.data_bytes, self.maps = data_bytes, maps
        maps.lazy(self)

    def row(self, g: int, row: int) -> np.ndarray:
        return _group_array(self.maps.data(self), self.groups[g], self.offsets[g])[row]


def _group_array(data: np.ndarray, group: dict, offset: int) -> np.ndarray:
    dtype, shape = np.dtype(group["dtype"]), tuple(group["shape"])
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return data[offset:offset + n].view(dtype).reshape(shape)


def _image_nbytes(group: dict) -> int:
    return int(np.prod(group["shape"][1:], dtype=np.int64)) * np.dtype(group["dtype"]).itemsize


class MappedImages(Mapping):
    """A cached study's images by channel, each a row of its unit file mapped when read
    (:class:`UnitMaps`); read-only, as a served study's images are."""

    def __init__(self, unit: LazyUnit, places: dict):
        self._unit, self._places = unit, places

    def __getitem__(self, channel: str) -> np.ndarray:
        g, row = self._places[channel]
        return self._unit.row(g, row)

    def nbytes(self) -> int:
        """The images' bytes, from the index (nothing mapped)."""
        return sum(_image_nbytes(self._unit.groups[g]) for g, _ in self._places.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._places)

    def __len__(self) -> int:
        return len(self._places)


def image_nbytes(images: Mapping) -> int:
    """Bytes of a study's images; a lazily mapped study's counted from its index, so
    counting maps nothing."""
    if isinstance(images, MappedImages):
        return images.nbytes()
    return sum(a.nbytes for a in images.values())


def open_unit(path: Path, name: str, index: dict | None = None,
              maps: UnitMaps | None = None, *, transient: bool = False) -> Decoded:
    """The unit's studies (images memory-mapped, read-only) and report; CacheCorrupt if the
    file is not a complete unit ``name``. ``index``: its index as already known (a version
    keeps a copy of each unit's; the writer returns it): then only the footer is read.
    ``maps``: the process's map budget; past it the unit is mapped when read (None: mapped
    now, outside any budget: the small side entries). ``transient``: the file is removed
    once opened (a unit that could not be published, served this time only): past the
    budget its arrays are read into memory, as a map made when read would find no file."""
    from .site import IngestReport, Study

    if index is None:
        index = read_unit_index(path, name)
        size, _, start = _read_footer(path)
    else:
        _check_index(index, name)
        size, _, start = _read_footer(path)
    groups = index["groups"]
    offsets, data_bytes = _data_layout(groups)
    if start != data_bytes:
        raise CacheCorrupt("unit file of the wrong size for its index")
    report = IngestReport(**{k: Counter(v) if isinstance(v, dict) else v
                             for k, v in index["report"].items()})
    data = lazy = None
    if groups:
        data = _map_data(path, data_bytes) if maps is None else maps.pin(path, data_bytes)
        if data is None and transient:
            data = _read_data(path, data_bytes)
        elif data is None:
            lazy = LazyUnit(path, size, groups, offsets, data_bytes, maps)
    arrays = [_group_array(data, g, o) for g, o in zip(groups, offsets)] if data is not None \
        else []
    studies = []
    for entry in index["studies"]:
        places = entry["images"]
        try:
            for g, row in places.values():
                if g < 0 or not 0 <= row < groups[g]["shape"][0]:
                    raise IndexError(g)
        except (IndexError, ValueError, TypeError) as err:
            raise CacheCorrupt("index points outside its groups") from err
        if lazy is None:
            images = {ch: arrays[g][row] for ch, (g, row) in places.items()}
        else:
            images = MappedImages(lazy, places)
        studies.append(Study(entry["key"], entry["patient_key"], images))
    return studies, report
