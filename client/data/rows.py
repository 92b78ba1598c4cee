"""Prepared model inputs on the site's disk, read back one row at a time.

A dataset at 224² x 4 channels is 800 KB a study: 5,000 studies are 4 GB, more than a site
process should hold. :class:`RowFile` keeps them in a ``.npy`` (float32 ``[N, *shape]``) next
to the site cache's decoded studies (:mod:`client.data.cache`) and reads a row with ``pread``
when the data loader asks for it. Not a memory map: a training pass touches every row, and
mapped pages count against the process's resident memory until the kernel reclaims them;
read pages sit in the page cache, shared and reclaimable, not in the process.

A row file is written once (under a temporary name, renamed into place, mode 0600) and
reopened by every later message or process that prepares the same studies the same way (its
name hashes the study keys and the preparation); a file that fails its header or size check
is rewritten. At most :data:`MAX_ROW_FILES` stay per cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

PREFIX = "rows-"
MAX_ROW_FILES = 8       # per cache directory: image sizes x splits x tasks in use
DTYPE = np.dtype("<f4")


def row_file_name(spec: dict) -> str:
    """File name for rows prepared as ``spec`` says (JSON-able; pseudonymous keys only)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
    return f"{PREFIX}{digest}.npy"


class RowFile:
    """``n`` float32 rows of ``shape`` in a ``.npy`` file, each read as a fresh tensor."""

    def __init__(self, path: Path, n: int, shape: tuple[int, ...]):
        self.path, self.n, self.shape = Path(path), n, tuple(shape)
        self.row_bytes = int(np.prod(shape)) * DTYPE.itemsize
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            header = read(f)                                     # (shape, fortran, dtype)
            self.offset = f.tell()
        if (header[0] != (n, *self.shape) or header[1] or header[2] != DTYPE
                or self.path.stat().st_size != self.offset + n * self.row_bytes):
            raise ValueError("row file of another shape, order, dtype or size")
        # Opened now: the cache may be pruned by another site process later; an open file
        # stays readable after its name is removed.
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        buf = bytearray(self.row_bytes)
        got = os.preadv(self._fd, [buf], self.offset + i * self.row_bytes)
        if got != self.row_bytes:
            raise OSError("row file cut short")
        return torch.frombuffer(buf, dtype=torch.float32).reshape(self.shape)

    def read_all(self) -> torch.Tensor:
        """Every row at once, ``[n, *shape]`` (one read; an empty file gives an empty tensor:
        ``torch.frombuffer`` refuses an empty buffer)."""
        if self.n == 0:
            return torch.empty((0, *self.shape), dtype=torch.float32)
        buf = bytearray(self.n * self.row_bytes)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            if f.readinto(buf) != len(buf):
                raise OSError("row file cut short")
        return torch.frombuffer(buf, dtype=torch.float32).reshape(self.n, *self.shape)

    def __getstate__(self) -> dict:          # a data-loader worker opens its own descriptor
        return self.__dict__ | {"_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def open_rows(folder: Path, name: str, n: int, shape: tuple[int, ...],
              rows: Iterable[torch.Tensor], *, durable: bool = True) -> RowFile:
    """The row file ``folder/name``: reopened if complete, else ``rows`` (consumed lazily,
    one in memory at a time) written to it first (fsynced unless not ``durable``: a
    throw-away cache). OSError if ``folder`` is not writable."""
    path = Path(folder) / name
    try:
        out = RowFile(path, n, shape)
        os.utime(path)                                   # recently used: pruned last
        return out
    except (OSError, ValueError):
        pass
    temp = path.with_name(f".tmp-{name}-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False,
                    "shape": (n, *shape)})
            written = 0
            for row in rows:
                array = np.ascontiguousarray(torch.as_tensor(row).numpy(), dtype=DTYPE)
                if array.shape != tuple(shape):
                    raise ValueError(f"row of shape {array.shape}, expected {tuple(shape)}")
                f.write(array.tobytes())
                written += 1
            if written != n:
                raise ValueError(f"{written} rows written, expected {n}")
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    _prune(Path(folder), keep=path)
    return RowFile(path, n, shape)


def _prune(folder: Path, keep: Path) -> None:
    files = sorted((p for p in folder.glob(f"{PREFIX}*.npy") if p != keep),
                   key=lambda p: p.stat().st_mtime_ns)
    for old in files[:max(0, len(files) - (MAX_ROW_FILES - 1))]:
        old.unlink(missing_ok=True)
