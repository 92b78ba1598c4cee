"""Run one Flower daemon (SuperLink or SuperNode) as a supervised child process.

The child's output is re-logged line by line under a tag (the site id, or ``coordinator``) so
every line of a site's log says which site wrote it; Flower's colour codes are dropped. The
first line that matches a known fatal pattern becomes the one-line error ``medfed`` exits with.
SIGTERM/SIGINT are forwarded to the child, which shuts down gracefully; after ``grace``
seconds it is killed.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..offline import offline_env
from .preflight import DeployError

log = logging.getLogger("medfed.deploy")

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FLOWER_PREFIX = re.compile(r"^(INFO|WARNING|ERROR|DEBUG)\s*:\s*")
# Routine successful HTTP polls (every site asks every few seconds): debug level only.
ROUTINE = re.compile(r"uvicorn\.access\].*\" (200|204)$")


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower daemons: offline, one thread, state under ``flwr_home``, and
    this interpreter's ``bin`` first on PATH (Flower starts ``flower-superexec`` and
    ``flwr-serverapp``/``flwr-clientapp`` by name; they must come from the same install)."""
    bin_dir = str(Path(sys.executable).parent)
    env = offline_env(dict(os.environ), FLWR_HOME=str(flwr_home), PYTHONUNBUFFERED="1",
                      PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    return env | (extra or {})


def flower_bin(name: str) -> str:
    """Path of a Flower console script next to this interpreter (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class Daemon:
    """A supervised Flower daemon.

    Parameters
    ----------
    command : list of str
        The daemon's command line.
    tag : str
        Prefix of every re-logged line (a site id, ``coordinator``).
    env : dict
        Its environment (see ``flower_env``).
    fatal : dict
        Regex -> one-line error, most specific first: if the daemon fails, the first pattern
        any of its lines matched gives the error ``medfed`` exits with.
    cwd : Path, optional
        Working directory (the coordinator's state directory: run directories land there).
    """

    def __init__(self, command: list[str], *, tag: str, env: dict[str, str],
                 fatal: dict[str, str] | None = None, cwd: Path | None = None,
                 on_line: Callable[[str], None] | None = None):
        self.command, self.tag, self.env, self.cwd = command, tag, env, cwd
        self.fatal = [(re.compile(k), v) for k, v in (fatal or {}).items()]
        self.on_line = on_line
        self._matched: set[int] = set()
        self.stopping = False
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._pump, name=f"{self.tag}-log", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = FLOWER_PREFIX.sub("", ANSI.sub("", raw.rstrip()))
            if not line.strip():
                continue
            log.log(logging.DEBUG if ROUTINE.search(line) else logging.INFO, "[%s] %s",
                    self.tag, line)
            self._matched |= {i for i, (pattern, _) in enumerate(self.fatal)
                              if pattern.search(line)}
            if self.on_line is not None:
                self.on_line(line)

    @property
    def error(self) -> str | None:
        """The one-line error of the most specific fatal pattern seen (dict order)."""
        return self.fatal[min(self._matched)][1] if self._matched else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; the exit code."""
        self.stopping = True
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("[%s] did not stop within %.0f s; killing it", self.tag, grace)
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.proc.returncode

    def wait(self, until: Callable[[], bool] | None = None, *, timeout: float | None = None,
             poll: float = 0.2) -> bool:
        """Wait until ``until()`` is true (True), the child exits or ``timeout`` passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if until is not None and until():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return False

    def supervise(self) -> int:
        """Block until the child exits; SIGTERM/SIGINT stop it gracefully. Its exit code."""
        stopping = threading.Event()

        def forward(signum, _frame):
            if not stopping.is_set():
                stopping.set()
                self.stopping = True
                log.info("[%s] %s received: shutting down", self.tag, signal.Signals(signum).name)
                threading.Thread(target=self.stop, daemon=True).start()

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.wait()
            assert self.proc is not None
            code = self.proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if stopping.is_set():
            log.info("[%s] stopped", self.tag)
            return 0
        return code


def sleep_unless_stopped(seconds: float) -> bool:
    """Sleep ``seconds`` between two children (main thread); False when SIGTERM/SIGINT
    arrived meanwhile, so the caller stops instead of starting the next one."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda _signum, _frame: stop.set())
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return not stop.wait(seconds)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def supervised(daemon: Daemon | None) -> int:
    """Supervise a started ``daemon`` until it exits; a failure it recognised in its output
    (``daemon.error``) becomes a one-line DeployError, anything else is the exit code."""
    if daemon is None:
        raise RuntimeError("supervise() before start()")
    code = daemon.supervise()
    if code and daemon.error:
        raise DeployError(daemon.error)
    return code
