"""Helpers for deployment tests: free loopback ports and child processes that are always
killed (own process group each, SIGTERM then SIGKILL) when the test ends."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfed.offline import offline_env

MEDFED = [sys.executable, "-m", "medfed.cli"]


# Ports are drawn below Linux's ephemeral range (32768-60999): a port the kernel handed out
# with bind(0) can be taken by any outgoing connection before the child binds it (CI saw a
# SuperNode fail with EADDRINUSE that way). Each xdist worker draws from its own slice, and
# no port is handed out twice by one process.
_PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    slices = 4
    low, high = _PORT_RANGE
    width = (high - low) // slices
    start = low + (int(worker) % slices if worker.isdigit() else 0) * width
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(start, start + width)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {start}-{start + width}")


def child_env(**extra: str) -> dict[str, str]:
    """Every child: one OpenMP/torch thread, offline, no telemetry (2-core CI box)."""
    return offline_env(dict(os.environ), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                       PYTHONUNBUFFERED="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **extra)


class Children:
    """Start processes in their own sessions; ``cleanup`` kills every group it started."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True, **kwargs)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def wait_for(self, name: str, text: str, timeout: float, count: int = 1,
                 poll: float = 0.5) -> None:
        """Wait until ``text`` is ``count`` times in the child's log (``timeout`` is a hang
        guard, not a timing assertion; ``poll``: how often the log is read)."""
        deadline = time.monotonic() + timeout
        while self.log(name).count(text) < count:
            proc = self.procs[name]
            assert proc.poll() is None, f"{name} exited ({proc.returncode}):\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{name}: no {text!r}:\n{self.log(name)[-3000:]}"
            time.sleep(poll)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.procs[name].pid, sig)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                self.kill(name, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.kill(name, signal.SIGKILL)      # the group: Flower's superexec/app children
            proc.wait(timeout=10)


@pytest.fixture()
def children(tmp_path):
    procs = Children(tmp_path)
    try:
        yield procs
    finally:
        procs.cleanup()


def run_medfed(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``medfed ARGS`` in a fresh process (hang guard ``timeout``)."""
    return subprocess.run([*MEDFED, *args], capture_output=True, text=True, env=child_env(),
                          timeout=timeout)
