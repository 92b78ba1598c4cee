"""One read per DICOM file for the site cache (:mod:`client.data.cache`).

A first ingest used to read every new file's header to learn its study (the unit it belongs
to), then read it again to decode it: 17% of the ingest. A reader whose work is per file
(:class:`FileReader`, the brain reader) reads each file once instead: the read gives the
file's study and its pixels. The pixels cannot wait in memory until every file of their study
is read (a site's whole first ingest would be held), and the files of one study land in
different processes' tasks, so each process writes the arrays it read to one temporary
*spill* file per task and sends back only where they are; the units are then put together
from the spills (:func:`join_spilled`, in every process) and written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache_files import CacheCorrupt, Decoded

SPILL = "spill-"                # after the ingest's prefix: its spill files


@dataclass(frozen=True)
class FileReader:
    """A reader whose work is per file, so the cache reads each new file once.

    ``read(path)`` gives ``(the file's StudyInstanceUID or "", its share, its arrays)``;
    ``join(shares)`` (each ``(share, arrays)``, in path order) gives the studies and read
    counts of those files, exactly what the reader gives for them as a whole. Both must
    pickle (module-level functions or ``functools.partial`` of them): they run in the
    decode processes.
    """

    read: Callable[[str], tuple[str, object, list[np.ndarray]]]
    join: Callable[[list[tuple[object, list[np.ndarray]]]], Decoded]


def read_files(read: Callable[[str], tuple[str, object, list[np.ndarray]]],
               spill_dir: Path | None, prefix: str, paths: list[str]) -> tuple[str | None, list]:
    """Read ``paths`` (one task of a :class:`FileReader`'s pass) and write their arrays to
    one temporary spill file in ``spill_dir``, named after the ingest's ``prefix`` (which
    removes what is left under it if the ingest fails before it could learn the spills'
    names): ``(its path, [(uid, share, refs)])`` with refs ``(offset, dtype, shape)``; the
    arrays themselves when they cannot be spilled."""
    reads = [read(path) for path in paths]
    if spill_dir is None:
        return None, reads
    out, spill = [], None
    try:                                # no inode or quota left: the arrays travel back
        fd, spill = tempfile.mkstemp(prefix=f"{prefix}{SPILL}", dir=spill_dir)   # 0600
        with os.fdopen(fd, "wb") as f:
            for uid, share, arrays in reads:
                refs = []
                for array in arrays:
                    array = np.ascontiguousarray(array)
                    refs.append((f.tell(), array.dtype.str, array.shape))
                    f.write(array.data)
                out.append((uid, share, refs))
    except OSError:                     # disk full: the arrays travel back instead
        if spill is not None:
            os.unlink(spill)
        return None, reads
    return spill, out


def join_spilled(join: Callable[[list], Decoded], shares: list[tuple]) -> Decoded:
    """A :class:`FileReader` unit from its files' shares, their arrays read back from the
    spill files their readers wrote."""
    fds: dict[str, int] = {}
    try:
        joined = []
        for share, arrays, spill in shares:
            if spill is not None:
                if spill not in fds:
                    fds[spill] = os.open(spill, os.O_RDONLY)
                loaded = []
                for offset, dtype, shape in arrays:
                    dtype = np.dtype(dtype)
                    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    data = os.pread(fds[spill], size, offset)
                    if len(data) != size:
                        raise CacheCorrupt("spill file cut short")
                    loaded.append(np.frombuffer(bytearray(data), dtype).reshape(shape))
                arrays = loaded
            joined.append((share, arrays))
        return join(joined)
    finally:
        for fd in fds.values():
            os.close(fd)


def reread(reader: FileReader, paths: list[str]) -> Decoded:
    """A :class:`FileReader` unit read again from its files (in path order), not from the
    spills: once the units are made the spills are gone."""
    return reader.join([(share, arrays) for _, share, arrays in
                        (reader.read(str(path)) for path in paths)])
