"""Decoding shared between the calling process and spawned helper processes.

Why the caller decodes too: a spawned process must start Python and import numpy and pydicom
(about 0.3 s of CPU) before its first file. A site's first ingest of a few thousand small
files takes about as long as that, so a pool the caller only waited on gave nothing with two
workers (``bench/ingest.py``: 0.66x bare pydicom with two, 0.67x with one). Here ``workers``
counts the *decoding processes, the caller among them*: it starts ``workers - 1`` helpers and
begins at once; every process claims the next task from one shared counter, so the helpers
take over part of the work when (and only if) they are up, and the caller never waits on a
helper that has not started.

Helpers are spawned, not forked: the caller may hold torch's threads. ``fn`` and the items
must pickle (a module-level function, or a ``functools.partial`` of one).

A job can also be handed to the helpers alone for a while (:meth:`SharedWorkers.submit`):
the caller does serial work of its own meanwhile (the site cache's sync and publish) and
joins the job when done (:meth:`Pending.map`), so the helpers do not sit idle through it.
"""

from __future__ import annotations

import os
import pickle
import queue
import sys
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import get_context
from typing import Any

# Imported by pydicom (``pydicom.data``, its test-file downloader) only to fetch files over
# the network, which a decode helper never does: kept out of the helpers' import of pydicom,
# whose start-up (Python, numpy, pydicom: ~0.3 s of CPU) runs while the caller decodes alone
# (~50 ms less). Blocked for that import only: other modules a helper imports later (a 3D
# layout's MONAI -> huggingface_hub) need them.
HELPER_UNNEEDED = ("requests", "tqdm")
POLL_SECONDS = 0.5          # how often a waiting caller checks that its helpers are alive
# Helpers run this much nicer than the caller: on a free core they run at full speed, but
# where the cores are busy (other jobs of the hospital's server) a helper starting up and
# decoding would take its CPU share from the caller, and two workers ran slower than one.
HELPER_NICE = 10


class WorkerDied(RuntimeError):
    """A helper process ended without returning its task's result."""


def _claim(counter, end: int) -> int | None:
    """The next task index below ``end``, or None; never moves the counter past ``end``, so
    a helper still holding a finished job's message cannot take the next job's tasks."""
    with counter.get_lock():
        index = counter.value
        if index >= end:
            return None
        counter.value = index + 1
    return index


def _helper(counter, taken, jobs, results) -> None:
    """A helper process: for each job message (counted in ``taken`` once out of the pipe),
    claim its tasks until none is left and send back ``(index, ok, value)``; None ends it."""
    _import_pydicom_alone()
    while (job := jobs.get()) is not None:
        with taken.get_lock():
            taken.value += 1
        base, end, fn, items = job
        while (c := _claim(counter, end)) is not None:
            # pickled here: a result that does not pickle would otherwise fail in the
            # queue's feeder thread, be dropped, and leave the caller waiting for good
            try:
                answer = pickle.dumps((c - base, True, fn(items[c - base])))
            except Exception as err:  # noqa: BLE001 - re-raised in the caller
                answer = pickle.dumps((c - base, False, _picklable(err)))
            results.put(answer)


def _import_pydicom_alone() -> None:
    """Import pydicom with :data:`HELPER_UNNEEDED` blocked (an import of them fails there:
    pydicom does without), then unblock them: a None left in ``sys.modules`` would fail
    every later import of them in this helper (huggingface_hub logs each failure)."""
    blocked = [name for name in HELPER_UNNEEDED if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None
    try:
        import pydicom  # noqa: F401 - imported for its side effect: loaded without them
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def _picklable(err: Exception) -> Exception:
    """``err`` if it survives pickling, else a RuntimeError naming its type (no message: a
    message might quote a header value)."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"a decode worker raised {type(err).__name__}")


class SharedWorkers:
    """``workers`` decoding processes, this one among them, for one or more successive jobs
    (the helpers start on the first job that has two tasks or more and serve the later ones:
    one start-up per ingest, not one per phase). Use as a context manager.

    Parameters
    ----------
    workers : int
        Decoding processes in all, this one included; 1 runs everything here.
    """

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"decode workers must be >= 1, got {workers}")
        self.workers = workers
        self._helpers: list = []
        self._posted = 0            # job messages put for the helpers since they started
        self._pending: Pending | None = None

    @property
    def started(self) -> bool:
        """Whether helper processes are up (a job of two tasks or more started them)."""
        return bool(self._helpers)

    def _start(self) -> None:
        ctx = get_context("spawn")
        self._counter, self._jobs, self._results = ctx.Value("q", 0), ctx.Queue(), ctx.Queue()
        self._taken, self._posted = ctx.Value("q", 0), 0
        nice = os.getpriority(os.PRIO_PROCESS, 0) + HELPER_NICE
        self._helpers = []          # only started ones: close() may end them if one fails
        for _ in range(self.workers - 1):
            helper = ctx.Process(target=_helper, daemon=True,
                                 args=(self._counter, self._taken, self._jobs,
                                       self._results))
            helper.start()
            self._helpers.append(helper)
            try:                # at once, so its start-up (imports) runs niced too
                os.setpriority(os.PRIO_PROCESS, helper.pid, min(nice, 19))
            except OSError:     # not allowed here: it runs at the caller's priority
                pass

    def imap(self, fn: Callable[[Any], Any], items: Sequence) -> Iterator[tuple[int, Any]]:
        """``(index, fn(item))`` for every item, in the order the results arrive (about the
        items' order: tasks are claimed in order). ``fn`` and the items must pickle.

        Raises
        ------
        WorkerDied
            If a helper ends (killed, out of memory) while its task is unanswered.
        Exception
            Whatever ``fn`` raised, in whichever process it ran.
        RuntimeError
            If a submitted job (:meth:`submit`) is not joined yet.
        """
        self._check_idle()
        if self.workers == 1 or len(items) < 2:
            for i, item in enumerate(items):
                yield i, fn(item)
            return
        if not self._helpers:
            self._start()
        yield from self._run(fn, items, self._post(fn, items))

    def submit(self, fn: Callable[[Any], Any], items: Sequence) -> Pending:
        """Hand ``fn`` over ``items`` to the helpers now; this process takes its part only
        when it joins the job (:meth:`Pending.map`), after serial work of its own. Starts
        no helper: without running ones the whole job runs here, at the join. One job at a
        time: join it before the next."""
        self._check_idle()
        if not self._helpers or len(items) < 2:
            return Pending(self, fn, items, None)
        self._pending = Pending(self, fn, items, self._post(fn, items))
        return self._pending

    def _check_idle(self) -> None:
        if self._pending is not None:
            raise RuntimeError("a submitted decode job is not joined yet: call its map() "
                               "before starting another job")

    def _post(self, fn: Callable[[Any], Any], items: Sequence) -> tuple[int, int]:
        """Put a job message for each helper; the job's task indexes ``(base, end)``."""
        with self._counter.get_lock():
            base = self._counter.value
        end = base + len(items)
        for _ in self._helpers:
            self._jobs.put((base, end, fn, items))
        self._posted += len(self._helpers)
        return base, end

    def _run(self, fn: Callable[[Any], Any], items: Sequence, span: tuple[int, int],
             ) -> Iterator[tuple[int, Any]]:
        """This process's part of a posted job (claiming its tasks alongside the helpers),
        then the helpers' results until every task is answered."""
        base, end = span
        answered = 0
        try:
            while (c := _claim(self._counter, end)) is not None:
                yield c - base, fn(items[c - base])
                answered += 1
                if any(helper.exitcode not in (None, 0) for helper in self._helpers):
                    raise WorkerDied("a decode worker was killed (out of memory?)")
                while True:                 # what the helpers finished meanwhile
                    try:
                        item = self._results.get_nowait()
                    except queue.Empty:
                        break
                    answered += 1
                    yield _unpack(item)
            while answered < len(items):
                try:
                    item = self._results.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if all(helper.is_alive() for helper in self._helpers):
                        continue
                    try:                    # a last result may have landed meanwhile
                        item = self._results.get(timeout=POLL_SECONDS)
                    except queue.Empty:
                        raise WorkerDied("a decode worker ended without its result "
                                         "(killed, or out of memory?)") from None
                answered += 1
                yield _unpack(item)
        except BaseException:
            # An error or an abandoned job: results still on their way would be taken for
            # the next job's, so the helpers go (the next job starts fresh ones).
            self.close()
            raise

    def map(self, fn: Callable[[Any], Any], items: Sequence) -> list:
        """``[fn(item) for item in items]``, in order, computed as :meth:`imap` does."""
        out: list = [None] * len(items)
        for i, value in self.imap(fn, items):
            out[i] = value
        return out

    def close(self) -> None:
        """Stop the helpers. Every result is in (or the job failed): they are idle or still
        starting, so they are ended at once rather than waited for (a helper still starting
        would otherwise outlive the queues it was given)."""
        helpers, self._helpers = self._helpers, []
        self._pending = None
        for helper in helpers:
            helper.terminate()
        for helper in helpers:
            helper.join()
        if not helpers:
            return
        # This process is now the job pipe's only reader: empty it, or the thread feeding it
        # blocks for good on a job message a helper never read (one still starting), and
        # the queue's finalizer would wait on that thread. When the helpers took every
        # message out of the pipe there is nothing to empty (the usual end: no 20 ms wait).
        if self._taken.value < self._posted:
            try:
                while True:
                    self._jobs.get(timeout=0.02)
            except queue.Empty:
                pass
        self._jobs.cancel_join_thread()
        self._jobs.close()
        self._results.close()

    def __enter__(self) -> SharedWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Pending:
    """A job handed to the helpers by :meth:`SharedWorkers.submit`, joined by :meth:`map`."""

    def __init__(self, pool: SharedWorkers, fn: Callable[[Any], Any], items: Sequence,
                 span: tuple[int, int] | None):
        self._pool, self._fn, self._items, self._span = pool, fn, items, span

    def map(self) -> list:
        """``[fn(item) for item in items]``, in order: this process claims the tasks the
        helpers have not, then waits for theirs (errors as :meth:`SharedWorkers.imap`)."""
        if self._span is None:
            return [self._fn(item) for item in self._items]
        if self._pool._pending is not self:
            raise RuntimeError("this decode job was joined already, or its helpers ended")
        out: list = [None] * len(self._items)
        try:
            for i, value in self._pool._run(self._fn, self._items, self._span):
                out[i] = value
        finally:
            self._pool._pending = None
        return out


def _unpack(item: bytes) -> tuple[int, Any]:
    i, ok, value = pickle.loads(item)
    if not ok:
        raise value
    return i, value


def imap_shared(fn: Callable[[Any], Any], items: Sequence, workers: int,
                ) -> Iterator[tuple[int, Any]]:
    """One job of :class:`SharedWorkers`: ``(index, fn(item))`` as results arrive."""
    with SharedWorkers(workers) as pool:
        yield from pool.imap(fn, items)


def map_shared(fn: Callable[[Any], Any], items: Sequence, workers: int) -> list:
    """One job of :class:`SharedWorkers`: ``[fn(item) for item in items]``, in order."""
    with SharedWorkers(workers) as pool:
        return pool.map(fn, items)


def chunks(items: Sequence, workers: int, *, most: int = 64, least: int = 4) -> list:
    """``items`` cut into consecutive chunks for :class:`SharedWorkers`: each about an eighth
    of what is left per process (at most ``most``, at least ``least`` items), so the tasks
    shrink towards the end and no process is left waiting long on another's last one."""
    out, i = [], 0
    while i < len(items):
        size = max(least, min(most, -(-(len(items) - i) // (8 * workers))))
        out.append(items[i:i + size])
        i += size
    return out
