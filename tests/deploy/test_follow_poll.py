"""A site asks for its next message soon after it handled one, slowly when idle (issue 27):
``FollowPoll``, used by the SuperNode's idle poll and the launcher's claim poll."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from medfed.deploy import follow, launcher, supernode
from medfed.deploy.allowlist import AllowList
from medfed.deploy.follow import FOLLOW_POLL, FOLLOW_WINDOW, FollowPoll


@pytest.fixture
def clock(monkeypatch):
    """``follow``'s monotonic clock, moved by hand."""
    now = [100.0]
    monkeypatch.setattr(follow, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_follow_within_the_window_after_a_touch_else_idle(clock):
    poll = FollowPoll(0.5, follow=0.1, window=3.0)
    assert poll.interval() == 0.5                     # nothing handled yet
    poll.touch()
    assert poll.interval() == 0.1
    clock[0] += 2.9
    assert poll.interval() == 0.1
    clock[0] += 0.1
    assert poll.interval() == 0.5                     # 3 s after the last message
    poll.touch()
    assert poll.interval() == 0.1


def test_the_follow_poll_is_never_slower_than_the_idle_one_and_window_0_turns_it_off(clock):
    assert FollowPoll(0.05, follow=0.1).follow == 0.05
    off = FollowPoll(0.5, window=0)
    off.touch()
    assert off.interval() == 0.5


@pytest.mark.parametrize("kwargs", [dict(idle=0), dict(idle=0.5, follow=0),
                                    dict(idle=0.5, window=-1)])
def test_nonsense_polls_are_refused(kwargs):
    with pytest.raises(ValueError):
        FollowPoll(**kwargs)


def test_the_supernode_polls_fast_only_after_it_sent_a_reply(monkeypatch, clock):
    """Flower's loop: pull; nothing there -> ``time.sleep(3)``; a message -> run it and
    ``_push_messages`` (send the reply), then pull again. After ``install`` the 3 s sleep is
    ``FOLLOW_POLL`` for ``FOLLOW_WINDOW`` s after a reply was sent, ``--poll-interval`` else."""
    import flwr.supernode.start_client_internal as loop

    for name in ("time", "pull_objects", "_push_messages", "get_fused_config_from_fab"):
        monkeypatch.setattr(loop, name, getattr(loop, name))
    sent = []
    monkeypatch.setattr(loop, "_push_messages", lambda **kw: sent.append(kw))
    supernode.install(0.5)
    supernode.install(0.5)                       # a second install does not wrap it twice
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    loop.time.sleep(3)                           # idle, no reply sent yet
    loop._push_messages(state="s")               # a reply goes out
    loop.time.sleep(3)
    clock[0] += FOLLOW_WINDOW
    loop.time.sleep(3)
    assert sent == [{"state": "s"}]
    assert slept == [0.5, FOLLOW_POLL, 0.5]
    assert FOLLOW_POLL < 0.5 and FOLLOW_WINDOW <= 10


class _Worker:
    """A ready runner that finishes each task at its next ``wait``; an idle ``wait`` moves the
    clock on by 1 s."""

    def __init__(self, clock, waits):
        self.clock, self.waits, self.task, self.ready = clock, waits, None, True

    def start(self):
        pass

    def alive(self):
        return True

    @property
    def idle(self):
        return self.task is None

    def submit(self, token, task):
        self.task = task
        return True

    def wait(self, timeout):
        self.waits.append(timeout)
        if self.task is not None:
            self.task = None
            return [0]
        self.clock[0] += 1.0
        return []

    def stop(self, grace=5.0):
        pass


def test_the_launcher_claims_fast_only_after_the_runner_finished_a_task(clock, monkeypatch):
    from flwr.proto.runtime_pb2 import AcquireTaskResponse  # pylint: disable=E0611
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611

    waits: list[float] = []
    tokens = ["a" * 256]

    class _Node:
        def AcquireTask(self, _request):  # noqa: N802 - Flower's method name
            if len(waits) >= 6:
                raise StopIteration
            if tokens:
                return AcquireTaskResponse(task=Task(task_id=1, run_id=1), token=tokens.pop())
            return AcquireTaskResponse()

        def close(self):
            pass

    monkeypatch.setattr(launcher, "acquire_client", lambda *a, **k: _Node())
    monkeypatch.setattr(launcher, "SiteWorker", lambda command: _Worker(clock, waits))
    with pytest.raises(StopIteration):
        launcher.serve("127.0.0.1:1", AllowList(), site_id="a", secret=b"s", poll=0.2,
                       supernode_pid=Path("unused"),
                       command=["unused"])
    c = launcher.CLAIM_FOLLOW
    # the task in hand at the idle poll; then 3 s of fast claims; then idle again
    assert waits == [0.2, c, c, c, 0.2, 0.2]
