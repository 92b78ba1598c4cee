"""A round's MLflow writes off the round loop: a background worker with a bounded queue and a
journal in the run folder, so that neither a slow registry nor a crash costs a round.

Each round hands the worker one :class:`RoundWrites`: its metrics and run tags (one batch),
the sites' ingest counts the first time they report them, and, with ``tracking.log_models``,
the global model to export, log and register as a version.
Exporting and registering a model takes seconds; training the next round does not wait for
it. The queue is bounded (:data:`MAX_QUEUED`): a registry slower than the rounds holds the
round loop back instead of piling up models in memory. The run's end waits for the queue.

Nothing is lost when the server dies with writes queued. Before a round's writes are queued
they are journalled (``<run_dir>/registrations/round-NNNN.json``: metrics, tags, the version's
tags and its weights' digest, never the weights); the worker deletes the entry once all of it
is in MLflow. A version is created with all its tags in one call, after its files, so a
version either exists complete or not at all. On resume, :func:`recover` makes MLflow agree
with the checkpoints before training continues:

- a journalled round at or before the newest checkpoint is written again, its model from that
  round's checkpoint (whose weights must have the journalled digest); a version half-made
  for it is deleted first;
- a round after the newest checkpoint runs again: its journal entry is dropped and any
  version this MLflow run registered for it is deleted.

So after a resume every checkpointed round has exactly one version, with the checkpoint's
weights. Checkpoints keep more rounds (``Checkpointer.keep``) than can be journalled at once
(the queued ones, the one being written and the one waiting for a place).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("medfed.server")

JOURNAL_DIR = "registrations"
MAX_QUEUED = 1          # rounds waiting behind the one being written
# How much nicer than the round loop the worker thread runs (Linux schedules threads, and a
# thread's nice value is its own): in a simulation, or a server sharing cores with a site,
# the sites' training comes first and the registry's writes take the idle moments.
WRITER_NICENESS = 10


@dataclass
class RoundWrites:
    """One round's MLflow writes: metrics and run tags, and a model version (or none)."""

    round: int
    metrics: dict[str, float] = field(default_factory=dict)
    run_tags: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, dict] = field(default_factory=dict)   # artifact path -> JSON content
    model: torch.nn.Module | None = None      # built on the round loop's thread (its RNG)
    multi_label: bool = False                 # the model's head scores independent findings
    version_tags: dict[str, str] = field(default_factory=dict)
    arrays_sha256: str = ""

    def journal_entry(self) -> dict:
        return {"round": self.round, "metrics": self.metrics, "run_tags": self.run_tags,
                "artifacts": self.artifacts,
                "version": self.model is not None, "version_tags": self.version_tags,
                "arrays_sha256": self.arrays_sha256}


def journal_path(run_dir: Path, rnd: int) -> Path:
    return Path(run_dir) / JOURNAL_DIR / f"round-{rnd:04d}.json"


def journalled(run_dir: Path) -> list[dict]:
    """The journal entries left in ``run_dir`` (rounds whose writes did not all complete)."""
    return [json.loads(p.read_text())
            for p in sorted((Path(run_dir) / JOURNAL_DIR).glob("round-*.json"))]


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


class BackgroundWriter:
    """Runs ``log_round`` (metrics and tags) then ``register`` (the version, if any) for each
    round on one worker thread, in round order, journalled in ``run_dir``.

    A write that fails stops the worker; the error is raised on the round loop at the next
    :meth:`submit` or at :meth:`drain`, so a broken registry fails the run, not silently.
    """

    def __init__(self, run_dir: Path, *, log_round: Callable[[RoundWrites], None],
                 register: Callable[[RoundWrites], str], max_queued: int = MAX_QUEUED,
                 on_start: Callable[[], None] = lambda: None):
        self.run_dir = Path(run_dir)
        self._log_round = log_round
        self._register = register
        self._on_start = on_start
        self._queue: queue.Queue[RoundWrites | None] = queue.Queue(maxsize=max_queued)
        self._error: BaseException | None = None
        self.versions: dict[int, str] = {}       # round -> registered version
        self._thread: threading.Thread | None = None
        self._ahead: Callable[[], None] | None = None     # see start()
        self.niceness: int | None = None          # the worker thread's, once it runs

    def start(self, ahead: Callable[[], None] | None = None) -> None:
        """Start the worker now (else the first :meth:`submit` does), running ``ahead`` on it
        before any round's writes: work that writes nothing to MLflow or the run folder (the
        phase's export template, ``server/tracking.py``), so a crash during it loses nothing.
        ``ahead`` handles its own errors; one it raises fails the run as a write would.

        Raises
        ------
        RuntimeError
            ``ahead`` given once the worker runs: it could only run after writes already
            queued, if at all, so it is refused rather than silently dropped."""
        if ahead is not None and self._thread is not None:
            raise RuntimeError("the MLflow writer is already running: work ahead of the "
                               "rounds' writes must be handed to the first start()")
        if self._thread is None:
            self._ahead = ahead         # not a thread argument: the thread would keep it
            self._thread = threading.Thread(target=self._work, name="medfed-mlflow-writer",
                                            daemon=True)
            self._thread.start()

    def submit(self, writes: RoundWrites) -> None:
        """Journal ``writes`` and queue them; blocks while the queue is full."""
        self._raise()
        _write_json(journal_path(self.run_dir, writes.round), writes.journal_entry())
        self.start()
        self._queue.put(writes)

    def drain(self, *, raise_error: bool = True) -> None:
        """Wait until everything queued is in MLflow (the end of a run)."""
        if self._thread is not None:
            self._queue.join()
        if raise_error:
            self._raise()

    def close(self) -> None:
        """Drain (errors are logged, not raised) and stop the worker."""
        self.drain(raise_error=False)
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        journal = self.run_dir / JOURNAL_DIR
        if journal.is_dir() and not any(journal.iterdir()):
            journal.rmdir()             # all written: a finished run keeps no empty folder

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing a round to MLflow failed: {self._error}") \
                from self._error

    def _work(self) -> None:
        self.niceness = lower_priority(WRITER_NICENESS)
        # what ``ahead`` holds (the phase's initial model) is not kept for the whole run
        ahead, self._ahead = self._ahead, None
        try:
            self._on_start()
            if ahead is not None:
                ahead()
        except BaseException as err:        # noqa: BLE001 - reported on the round loop
            self._error = err
        del ahead
        while (writes := self._queue.get()) is not None:
            try:
                if self._error is None:
                    write_round(self.run_dir, writes, self._log_round, self._register,
                                self.versions)
            except BaseException as err:    # noqa: BLE001 - reported on the round loop
                self._error = err
                log.error("writing round %d to MLflow failed: %s", writes.round, err)
            finally:
                writes.model = None           # the worker holds no model it is done with
                self._queue.task_done()
        self._queue.task_done()


def lower_priority(by: int) -> int | None:
    """Make the calling thread ``by`` nicer (Linux: ``setpriority`` on its thread id); its
    nice value after, or None where threads cannot be reniced (then it runs as it was)."""
    if not by or not hasattr(os, "setpriority"):
        return None
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as err:
        log.info("the MLflow writer runs at the round loop's priority: %s", err)
        return None


def write_round(run_dir: Path, writes: RoundWrites, log_round: Callable[[RoundWrites], None],
                register: Callable[[RoundWrites], str], versions: dict[int, str]) -> None:
    """Write one journalled round to MLflow and clear its journal entry: metrics first (the
    entry then says so, so a crash does not log them twice), then the version."""
    path = journal_path(run_dir, writes.round)
    entry = json.loads(path.read_text()) if path.is_file() else writes.journal_entry()
    if not entry.get("metrics_logged"):
        log_round(writes)
        _write_json(path, entry | {"metrics_logged": True, "metrics": {}, "artifacts": {}})
    if writes.model is not None:
        versions[writes.round] = register(writes)
    path.unlink(missing_ok=True)


def recover(run_dir: Path, *, checkpoint_round: int, versions_of_run: dict[int, list[str]],
            delete_version: Callable[[str], None], rewrite: Callable[[dict], RoundWrites],
            log_round: Callable[[RoundWrites], None], register: Callable[[RoundWrites], str],
            versions: dict[int, str]) -> list[int]:
    """Make the MLflow record of an interrupted phase agree with its newest checkpoint
    (module docstring); returns the rounds written again.

    ``versions_of_run``: round -> versions this MLflow run registered for it;
    ``rewrite``: a journal entry of a checkpointed round back as :class:`RoundWrites`, its
    model from that round's checkpoint; ``log_round``/``register``/``versions`` as for
    :class:`BackgroundWriter`.
    """
    for rnd, found in sorted(versions_of_run.items()):
        if rnd > checkpoint_round:      # this round runs again and registers again
            for version in found:
                log.info("round %d runs again after the resume: deleting its version %s",
                         rnd, version)
                delete_version(version)
    written = []
    for entry in journalled(run_dir):
        rnd = int(entry["round"])
        if rnd > checkpoint_round:
            journal_path(run_dir, rnd).unlink()
            continue
        if entry["version"]:
            for version in versions_of_run.get(rnd, []):
                delete_version(version)   # made before the crash; its files may be partial
        log.info("round %d: writing to MLflow what the interrupted run had queued", rnd)
        write_round(run_dir, rewrite(entry), log_round, register, versions)
        written.append(rnd)
    return written
