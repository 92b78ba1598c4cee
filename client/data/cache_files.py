"""The site cache's on-disk format (:mod:`client.data.cache`): directories of ``.npy`` arrays
and an ``index.json``, written under a temporary name and renamed into place, checked when
opened (a failing one raises :class:`CacheCorrupt`), removed by renaming away first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import json
import os
import shutil
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

CACHE_FORMAT = 2
INDEX = "index.json"
TEMP_PREFIX = ".tmp-"

Decoded = tuple[list, object]     # (list[Study], IngestReport) as the readers return them

# Memory maps one served cache may hold at once. Linux allows a process 65,530 maps
# (vm.max_map_count) for everything it maps, and a unit maps one file per image shape: a
# site of 60,000 studies mapped every one of them and failed. Half are mapped for good as
# the units are opened (as before: they outlive their names), the rest are mapped when
# read and closed least recently used first.
MAX_MAPS = 32768


class CacheCorrupt(ValueError):
    """A cache directory failed its checks on opening (it is then rebuilt)."""


# What opening a damaged cache can raise (a malformed index: missing keys, wrong types).
UNUSABLE = (CacheCorrupt, OSError, ValueError, KeyError, TypeError, IndexError)


def remove_dir(folder: Path) -> None:
    """Remove a cache directory (renamed away first, so no reader sees it half deleted)."""
    trash = folder.with_name(f"{TEMP_PREFIX}{folder.name}-{os.getpid()}-trash")
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


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


def write_version(root: Path, fp: str, family: str, files: dict, units: list[dict]) -> None:
    """A version's index (its files and units), written under a temporary name and renamed."""
    temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))     # 0700
    try:
        index = {"format": CACHE_FORMAT, "fingerprint": fp, "family": family, "files": files,
                 "units": units}
        write_bytes(temp / INDEX, json.dumps(index).encode())
        fsync_dir(temp)
        try:
            os.rename(temp, root / fp)
        except OSError:
            if not (root / fp).is_dir():          # not a concurrent writer that won: real
                raise
        fsync_dir(root)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def write_dir(root: Path, fp: str, studies: list, report, files: dict) -> None:
    """Write the studies' arrays and index into a temporary dir, then rename it to ``fp``."""
    temp = write_temp(root, fp, studies, report, files, durable=True)
    try:
        fsync_dir(temp)
        publish(temp, root / fp)
        fsync_dir(root)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def publish(temp: Path, final: Path) -> None:
    """Rename a written temporary dir into place (a concurrent writer's copy may be there)."""
    try:
        os.rename(temp, final)
    except OSError:
        if not final.is_dir():          # not a concurrent writer that won: real
            raise


def write_temp(root: Path, fp: str, studies: list, report, files: dict, *,
                durable: bool) -> Path:
    """The studies' arrays and index in a new temporary dir under ``root`` (its path);
    ``durable``: each file fsynced (else the caller syncs before publishing it)."""
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
            write_npy(temp / name, np.dtype(dtype), (len(rows), *shape), rows, durable)
            index_groups.append({"file": name, "dtype": dtype, "shape": [len(rows), *shape]})
        index = {"format": CACHE_FORMAT, "fingerprint": fp, "groups": index_groups,
                 "studies": index_studies, "report": report_dict(report), "files": files}
        write_bytes(temp / INDEX, json.dumps(index).encode(), durable)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return temp


def write_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...], rows,
               durable: bool = True) -> None:
    """A ``.npy`` of ``shape`` streamed row by row (no stacked copy in memory), mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": shape})
        for row in rows:
            f.write(row.astype(dtype, copy=False).tobytes())
        f.flush()
        if durable:
            os.fsync(f.fileno())


def write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())


def sync_filesystem(path: Path) -> None:
    """Make everything written under ``path``'s filesystem durable: Linux ``syncfs`` on that
    filesystem only (``os.sync`` would flush every disk of the hospital's server), else
    ``os.sync``. Raises OSError as a write would."""
    global _SYNCFS
    if _SYNCFS is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _SYNCFS = libc.syncfs
        except (OSError, AttributeError):       # not Linux / no syncfs: the whole system
            _SYNCFS = False
    if not _SYNCFS:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


_SYNCFS = None       # libc's syncfs once looked up; False where there is none


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def report_dict(report) -> dict:
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in report.__dict__.items()}


def read_index(folder: Path, fp: str) -> dict:
    """The directory's parsed index; CacheCorrupt if unreadable or not ``fp``'s."""
    try:
        index = json.loads((folder / INDEX).read_bytes())
    except (OSError, ValueError) as err:
        raise CacheCorrupt("unreadable index") from err
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT \
            or index.get("fingerprint") != fp:
        raise CacheCorrupt("index of another format or fingerprint")
    return index


def _map_group(path: Path, group: dict) -> np.ndarray:
    """A group file memory-mapped read-only; CacheCorrupt unless it is the index's."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:           # missing, truncated header or data
        raise CacheCorrupt("unreadable group") from err
    if array.dtype.str != group["dtype"] or list(array.shape) != group["shape"]:
        raise CacheCorrupt("group of another dtype or shape")
    if path.stat().st_size != array.offset + array.nbytes:
        raise CacheCorrupt("group file of the wrong size")
    return array


def _npy_size(group: dict) -> int:
    """Bytes of the group's ``.npy`` as :func:`write_npy` writes it (header and data)."""
    dtype, shape = np.dtype(group["dtype"]), tuple(int(n) for n in group["shape"])
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": shape})
    return len(header.getvalue()) + int(np.prod(shape)) * dtype.itemsize


class GroupMaps:
    """The memory maps of one served cache, at most ``max_maps`` at once: the first half of
    the groups opened are mapped at once and for good (they outlive their names, as a
    small site's all do), every later one when an image of it is read, in a least recently
    used set of the other half. ``mapped``: maps made so far (counts only)."""

    def __init__(self, max_maps: int = MAX_MAPS):
        if max_maps < 2:
            raise ValueError(f"max_maps must be >= 2, got {max_maps}")
        self.pinned_left = max_maps // 2
        self.recent_max = max_maps - max_maps // 2
        self._recent: OrderedDict[Path, np.ndarray] = OrderedDict()
        self.mapped = 0

    def pin(self) -> bool:
        """Whether the next group is mapped now and for good (budget left)."""
        if self.pinned_left > 0:
            self.pinned_left -= 1
            return True
        return False

    def array(self, path: Path, group: dict) -> np.ndarray:
        """The group file's array, mapped now if it is not among the recent ones."""
        array = self._recent.get(path)
        if array is None:
            array = _map_group(path, group)
            self.mapped += 1
            self._recent[path] = array
            while len(self._recent) > self.recent_max:
                self._recent.popitem(last=False)       # unmapped once no image holds it
        self._recent.move_to_end(path)
        return array


class MappedImages(Mapping):
    """A cached study's images by channel, each a row of a group file mapped when read
    (:class:`GroupMaps`); read-only, as a served study's images are."""

    def __init__(self, folder: Path, groups: list[dict], places: dict, maps: GroupMaps):
        self._folder, self._groups, self._places, self._maps = folder, groups, places, maps

    def __getitem__(self, channel: str) -> np.ndarray:
        g, row = self._places[channel]
        group = self._groups[g]
        return self._maps.array(self._folder / group["file"], group)[row]

    def __iter__(self) -> Iterator[str]:
        return iter(self._places)

    def __len__(self) -> int:
        return len(self._places)


def open_dir(folder: Path, fp: str, index: dict | None = None,
             maps: GroupMaps | None = None) -> Decoded:
    """The cached studies (images memory-mapped, read-only) and report; CacheCorrupt if the
    directory is not a complete cache of ``fp``. ``index``: its index as already read (a
    version keeps a copy of each unit's: one file read fewer per study on a hit).
    ``maps``: the served cache's map budget; past it the group files are checked by size
    now and mapped when read (None: all mapped now)."""
    from .site import IngestReport, Study

    if index is None:
        index = read_index(folder, fp)
    elif index.get("format") != CACHE_FORMAT or index.get("fingerprint") != fp:
        raise CacheCorrupt("index copy of another format or fingerprint")
    arrays: list[np.ndarray | None] = []
    for group in index["groups"]:
        if maps is None or maps.pin():
            arrays.append(_map_group(folder / group["file"], group))
            continue
        try:
            size = (folder / group["file"]).stat().st_size
        except OSError as err:
            raise CacheCorrupt("unreadable group") from err
        if size != _npy_size(group):
            raise CacheCorrupt("group file of the wrong size")
        arrays.append(None)
    report = IngestReport(**{k: Counter(v) if isinstance(v, dict) else v
                             for k, v in index["report"].items()})
    studies = []
    for entry in index["studies"]:
        places = entry["images"]
        try:
            for g, row in places.values():
                if not 0 <= row < index["groups"][g]["shape"][0] or g < 0:
                    raise IndexError(g)
        except (IndexError, ValueError, TypeError) as err:
            raise CacheCorrupt("index points outside its groups") from err
        if all(arrays[g] is not None for g, _ in places.values()):
            images = {ch: arrays[g][row] for ch, (g, row) in places.items()}
        else:
            images = MappedImages(folder, index["groups"], places, maps)
        studies.append(Study(entry["key"], entry["patient_key"], images))
    return studies, report
