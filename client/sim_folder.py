"""The simulation's temp folder for the simulated sites' shared decode
(:meth:`client.runtime.SiteDataCache.for_simulation`), and the sweep of folders whose
simulation was killed.

A simulation removes its folder when it ends, also when it fails; a SIGKILL (an OOM kill, a
killed test) leaves it in ``TMPDIR`` with the decoded studies of every simulated site. Each
folder's name carries its owner's host (hashed) and process id, so the next simulation
started on that host removes the folders of this user whose owner no longer runs. A folder of
another user, a link, a name of another form, another host's (a container sharing ``/tmp``,
whose processes this one cannot see) or a live owner's is left alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

PREFIX = "medfed-sim-sites-"

log = logging.getLogger(__name__)


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # another user's process: alive
        return True
    return True


def sweep(tmp: str | Path | None = None) -> int:
    """Remove this user's simulation folders under ``tmp`` (default: ``TMPDIR``) whose owner
    process on this host is gone; how many were removed."""
    tmp = Path(tmp or tempfile.gettempdir())
    host, removed = _host(), 0
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return 0
    for entry in entries:
        parts = entry.name[len(PREFIX):].split("-", 2) if entry.name.startswith(PREFIX) else []
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or _alive(int(parts[1])):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += not os.path.lexists(entry.path)
    if removed:
        log.info("removed %d simulated sites' folder(s) left by killed simulations", removed)
    return removed


def make() -> Path:
    """A new private folder (0700) named for this host and process, after a sweep."""
    sweep()
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{_host()}-{os.getpid()}-"))
