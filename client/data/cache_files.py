"""The site cache's on-disk format (:mod:`client.data.cache`): directories of ``.npy`` arrays
and an ``index.json``, written under a temporary name and renamed into place, checked when
opened (a failing one raises :class:`CacheCorrupt`), removed by renaming away first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

CACHE_FORMAT = 2
INDEX = "index.json"
TEMP_PREFIX = ".tmp-"

Decoded = tuple[list, object]     # (list[Study], IngestReport) as the readers return them


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


def open_dir(folder: Path, fp: str, index: dict | None = None) -> Decoded:
    """The cached studies (images memory-mapped, read-only) and report; CacheCorrupt if the
    directory is not a complete cache of ``fp``. ``index``: its index as already read (a
    version keeps a copy of each unit's: one file read fewer per study on a hit)."""
    from .site import IngestReport, Study

    if index is None:
        index = read_index(folder, fp)
    elif index.get("format") != CACHE_FORMAT or index.get("fingerprint") != fp:
        raise CacheCorrupt("index copy of another format or fingerprint")
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
