"""Durability for the site cache (:mod:`client.data.cache`): one filesystem sync per ingest
instead of one fsync per file.

A first ingest writes thousands of unit files; an fsync each cost more than decoding them.
The writers leave them unsynced under temporary names, the caller makes the whole
filesystem durable once (:func:`sync_filesystem`) and only then renames them into place: a
crash before the sync leaves temporary files (removed later) and no unit under its name,
so a unit found under its name is complete on disk if the disk honoured the sync. The
checks on opening catch little more: a file cut short or extended fails the footer and
size checks and is decoded again, but nothing is checksummed, so a disk that returns other
bytes of the right length (one that lied about a sync, or bit rot) goes unnoticed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path


@functools.lru_cache(maxsize=None)
def _syncfs():
    """libc's ``syncfs``, or None where there is none (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


def sync_filesystem(path: Path) -> None:
    """Make everything written under ``path``'s filesystem durable: Linux ``syncfs`` on that
    filesystem only (``os.sync`` would flush every disk of the hospital's server), else
    ``os.sync``. Raises OSError as a write would."""
    syncfs = _syncfs()
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
