"""What a site's readers can read, as one digest: checked on every message, so it must cost
little more than a directory listing.

The digest covers path, size, mtime, ctime and inode of every file under the site's data
directory (links followed as the readers follow them), except the site's state folder and
hidden top-level folders (MedFed's own files, written every message). Touching, rewriting,
adding or removing a file changes it; no file is opened.

``os.scandir`` gives each entry's type from the directory listing itself (no ``stat`` to
tell a folder from a file), and the state folder is recognised by its device and inode,
taken once, not by resolving every folder's real path. The digest is the one the former
``os.walk`` + ``os.stat`` + ``os.path.realpath`` walk gave (tests/client/test_signature.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def data_signature(data_dir: Path | str, state_dir: Path | str | None = None) -> str:
    """The digest of what the readers under ``data_dir`` can read (module docstring),
    skipping the folder ``state_dir`` wherever it is reached."""
    root = str(data_dir)
    skip = None
    if state_dir is not None:
        try:
            st = os.stat(state_dir)
            skip = (st.st_dev, st.st_ino)
        except OSError:                  # no state folder yet: nothing to skip
            skip = None
    h = hashlib.sha256()
    _walk(root, "", skip, h, top=True)
    return h.hexdigest()


def _walk(folder: str, prefix: str, skip: tuple[int, int] | None, h, top: bool) -> None:
    """Files of ``folder`` (sorted, hashed), then its sub-folders (sorted) - os.walk's
    top-down order, following links to folders as os.walk did not but realpath-free."""
    try:
        entries = list(os.scandir(folder))
    except OSError:                      # unreadable or removed meanwhile: os.walk skipped it
        return
    files, dirs = [], []
    for entry in entries:
        try:
            is_dir = entry.is_dir()      # follows a link, as os.walk's classification does
        except OSError:
            is_dir = False
        (dirs if is_dir else files).append(entry)
    for entry in sorted(files, key=lambda e: e.name):
        try:
            st = os.stat(entry.path)     # links followed, as the readers follow them
        except OSError:                  # a dangling link, a file removed meanwhile
            continue
        rel = prefix + entry.name
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0"
                 f"{st.st_ino}\n".encode("utf-8", "surrogateescape"))
    for entry in sorted(dirs, key=lambda e: e.name):
        if top and entry.name.startswith("."):
            continue
        if entry.is_symlink():           # os.walk lists a linked folder, does not enter it
            continue
        if skip is not None:
            try:
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) == skip:
                    continue
            except OSError:
                continue
        _walk(entry.path, prefix + entry.name + os.sep, skip, h, top=False)
